"""The training loop and its parts (steps, optimizer, checkpoints, reference cache)."""
