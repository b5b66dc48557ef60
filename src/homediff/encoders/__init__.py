"""Frozen encoders around the backbone: text encoders and autoencoders (VAE or pixels)."""
