"""Bad input: the reasons a sample is skipped or fixed, and a log that reports each file once.

A *skip* (``BadSample``) means the sample cannot be used and is replaced by another one:

    empty           zero-byte image file
    unreadable      the file cannot be read, or its pixels are corrupt
    truncated       the image data ends early
    not-an-image    an image extension, but no image format Pillow knows
    too-large       more pixels than the limit (a decompression bomb is refused before decoding)
    extreme-aspect  long side over ``max_aspect`` times the short one (a 20000×1 strip)
    file-too-big    more bytes than ``max_file_bytes`` (image) or 1 MiB (caption)
    not-a-file      a FIFO, device or socket with an image or caption name: never read
    outside-root    a link to a file outside the data set's folder (``allow_outside_links``)
    too-small       short side under the configured minimum
    no-caption      no caption file, and the config says to skip such images
    no-image        a shard sample without an image member
    bad-shard       a tar shard that cannot be read (the rest of it is skipped)

A *fix* is applied and the sample is used:

    converted         CMYK, L, LA, P, I;16, RGBA... made RGB (alpha composited on white)
    exif-rotated      the EXIF orientation was applied
    upscaled          short side under the crop size, upscaled
    missing-caption   no caption file: empty caption
    caption-not-utf8  caption bytes decoded with replacement characters
    caption-utf16     a UTF-16 caption without a byte-order mark, decoded as UTF-16
"""

from __future__ import annotations

import logging
from collections import Counter

from homediff.errors import HomediffError

logger = logging.getLogger("homediff.data")

Note = tuple[str, str]
"""A fix applied to a sample: (kind, detail)."""


class BadSample(HomediffError):
    """A sample that cannot be used; ``kind`` is one of the skip reasons above."""

    def __init__(self, kind: str, detail: str):
        super().__init__(f"{kind}: {detail}")
        self.kind = kind
        self.detail = detail

    def __reduce__(self):  # picklable across processes (check workers)
        return BadSample, (self.kind, self.detail)


class ProblemLog:
    """Counts skips and fixes by kind and logs each (path, kind) once (per process)."""

    def __init__(self):
        self.counts: Counter[str] = Counter()
        self._seen: set[tuple[str, str]] = set()

    def note(self, path: str, kind: str, detail: str, skipped: bool = False) -> None:
        self.counts[kind] += 1
        if (path, kind) in self._seen:
            return
        self._seen.add((path, kind))
        if skipped:
            logger.warning("%s: skipped (%s: %s)", path, kind, detail)
        else:
            logger.info("%s: %s: %s", path, kind, detail)
