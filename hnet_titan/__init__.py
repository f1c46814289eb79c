"""hnet-titan: a TorchTitan-style trainer for the H-Net byte-level language model."""
