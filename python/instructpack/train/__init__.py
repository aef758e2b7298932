"""Training: launcher, worker, loop, checkpoints, metrics."""
