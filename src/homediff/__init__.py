"""homediff: train a text-to-image diffusion model from scratch on hardware you own."""

from homediff.errors import CheckpointError, ConfigError, HomediffError

__version__ = "0.1.0"

__all__ = ["CheckpointError", "ConfigError", "HomediffError", "__version__"]
