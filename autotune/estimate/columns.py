"""The parts of an estimate, by name: what `estimate_frame` writes as columns (mem_<part>_bytes,
time_<part>_s, compute_<kind>_s) and `Estimate` holds as dicts (<part>_bytes, <part>_s)."""

GiB = 2**30
MEMORY = ("params", "grads", "master", "optimizer", "param_copies", "activations", "logits", "comm", "context", "workspace",
          "allocator")
MODEL_STATES = ("params", "grads", "master", "optimizer")
DYNAMIC_MEMORY = ("param_copies", "activations", "logits", "comm")  # what the allocator's slack grows with
TIME = ("forward", "backward", "recompute", "optimizer", "dp_comm", "overlap", "tp_comm", "pp_bubble", "pp_comm", "offload",
        "overhead")
COMPUTE = ("matmul", "attention", "memory")  # forward + backward + recompute by kind of work
