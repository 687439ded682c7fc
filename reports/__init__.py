"""Study results -> tables (pandas) and figures (matplotlib). Knows nothing of torch."""
