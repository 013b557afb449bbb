"""Training CuMo: the three stages, their data, losses, LoRA, upcycling and checkpoints."""
