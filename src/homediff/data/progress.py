"""Progress bars for long passes over a data set (scan, check, pack): on stderr when it is a
terminal, absent in logs and tests."""

from __future__ import annotations

import sys


def progress(description: str, total: int | None, unit: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=description, unit=f" {unit}s", disable=None, file=sys.stderr)
