"""Fine-tuning: the recipe and its loop, run state, checkpoints, optimizer, metrics, distributed strategy."""
