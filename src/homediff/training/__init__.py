"""Training: config, optimisers, checkpoints, the batch stream, the loss, the builders of each part,
precision choices, sharding, the monitor and the loop."""
