"""Assembling and running the Trainer from what recipe, model and data built: arguments, loss,
recompute, sequence parallelism, launch, and the preflight checks `pi-lora validate` runs."""
