"""Training: diffusion pretraining, the shared fine-tuning machinery, checkpoints and logs."""
