"""Data: reading files, TFDS builders, training targets, augmentation and the grain input pipeline."""
