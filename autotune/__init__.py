"""autotune: profile a model and a cluster, predict every plan, confirm the best with real runs."""
