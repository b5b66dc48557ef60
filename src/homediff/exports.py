"""Lazy re-exports for a package's ``__init__``: ``from homediff.data import DataConfig`` keeps
working, while importing one light module of the package (its options, read by every config) does
not import the heavy ones (torch, Pillow)."""

from __future__ import annotations

import importlib


def lazy_exports(package: str, exports: dict[str, list[str]]):
    """``__getattr__`` and ``__dir__`` for ``package`` that import ``module`` on the first use of
    one of its names; ``exports`` maps a module (relative to the package) to the names it exports."""
    owner = {name: f"{package}.{module}" for module, names in exports.items() for name in names}

    def __getattr__(name: str):
        if name not in owner:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(owner[name]), name)

    def __dir__() -> list[str]:
        return sorted(owner)

    return __getattr__, __dir__
