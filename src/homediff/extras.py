"""Optional dependencies (the extras in pyproject.toml), imported where used, with an install hint.

The one guard for them: ``require("webdataset", "data")``. Core dependencies (torch, Pillow,
transformers, tensorboard, …) are imported directly."""

from __future__ import annotations

import importlib
from types import ModuleType

from homediff.errors import HomediffError


class MissingDependency(HomediffError, ImportError):
    """An optional package is not installed; the message says which extra brings it."""


def require(module: str, extra: str, package: str | None = None) -> ModuleType:
    """Import ``module`` or raise MissingDependency naming ``pip install 'homediff[extra]'``."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        name = package or module.split(".")[0]
        raise MissingDependency(
            f"this needs the Python package {name!r}, which is not installed: "
            f"pip install 'homediff[{extra}]'") from err
