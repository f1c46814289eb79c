"""H-Net building blocks."""
