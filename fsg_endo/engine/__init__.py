"""Training engine: joins data, models and tracking into one run (recipe, loop, evaluation, checkpoints, DDP)."""
