"""Training: the one training loop and its callbacks, evaluation, device/seed/RNG state, learning-rate schedules."""
