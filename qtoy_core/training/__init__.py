"""Training: run configuration, the Trainer loop, run folders and checkpoints."""
