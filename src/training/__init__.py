"""The training loop and what it owns: evaluation, the training-state file, the LR schedule, result records,
seeding."""
