"""Training: the one loop, checkpoints, precision, schedules."""
