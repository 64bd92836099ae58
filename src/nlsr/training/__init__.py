"""The training loop and what it owns: evaluation, the training-state file, the LR schedule, the weight
average, seeding."""
