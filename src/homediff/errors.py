"""Errors that mean the user has something to fix; their message says what and how."""


class HomediffError(Exception):
    """Base class of every error homediff raises for a user mistake."""


class ConfigError(HomediffError, ValueError):
    """A configuration value or key is wrong."""


class CheckpointError(HomediffError):
    """A weights file cannot be read or does not fit the model."""
