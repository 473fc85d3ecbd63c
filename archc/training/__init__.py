"""Training, evaluation, data, optimizers, checkpoints and the distributed strategies."""
