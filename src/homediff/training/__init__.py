"""Training: config, optimisers, checkpoints, caches, the batch stream, the monitor, the loop."""
