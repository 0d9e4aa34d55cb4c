"""Training: the trainer, optimizer and schedule, checkpoints of training state, memory stats and planning."""
