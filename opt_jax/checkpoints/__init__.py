"""Checkpoints: HF directories, PyTorch/metaseq files and orbax, in and out."""
