"""Caption processing, kohya style (hdm-spec §5.4), plus caption dropout for classifier-free
guidance.

A caption file may hold three kinds of parts::

    keep tokens ||| group one tag, tag, tag %% group two tag, tag

* Everything before the last ``|||`` is *keep tokens*: split into tags, kept in order, never
  dropped.
  (The original crashed on a second ``|||``; here every ``|||`` but the last separates keep tokens.)
* The rest is split into *groups* by ``%%``; group order is shuffled (``shuffle_groups``).
* Each group is split into tags by ``tag_separator``; each tag is dropped with ``tag_dropout``, the
  kept tags are shuffled (``shuffle_tags``), and the whole group is dropped with ``group_dropout``.
* Everything is joined with ``joiner``.
* Finally, with probability ``caption_dropout`` the whole caption becomes "" (the unconditional
  caption the model learns for classifier-free guidance).

A natural-language caption without commas is a single tag, so it passes through unchanged unless
dropped. Write captions that must stay whole without the tag separator, or set
``shuffle_tags=False``.
"""

from __future__ import annotations

import codecs
import random

import torch

from homediff.data.options import CaptionConfig
from homediff.data.problems import Note


def _tags(text: str, separator: str) -> list[str]:
    return [tag for tag in (part.strip() for part in text.split(separator)) if tag]


def process_caption(text: str, config: CaptionConfig, generator: torch.Generator | None = None
                    ) -> str:
    """Apply keep tokens, group/tag shuffle and dropout, and caption dropout to ``text``."""
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    rng = random.Random(seed)
    if config.caption_dropout and rng.random() < config.caption_dropout:
        return ""
    text = config.prefix + text + config.suffix
    if config.keep_tokens and config.keep_separator not in text:  # kohya: the first N tags are kept
        tags = text.split(config.tag_separator)
        text = (config.tag_separator.join(tags[:config.keep_tokens]) + config.keep_separator
                + config.tag_separator.join(tags[config.keep_tokens:]))
    *keep, rest = text.split(config.keep_separator)
    out = [tag for part in keep for tag in _tags(part, config.tag_separator)]
    groups = rest.split(config.group_separator)
    if config.shuffle_groups:
        rng.shuffle(groups)
    for group in groups:
        tags = _tags(group, config.tag_separator)
        if config.tag_dropout:
            tags = [tag for tag in tags if rng.random() >= config.tag_dropout]
        if config.shuffle_tags:
            rng.shuffle(tags)
        if not config.group_dropout or rng.random() >= config.group_dropout:
            out.extend(tags)
    return config.joiner.join(out)


def decode_caption(data: bytes, notes: list[Note]) -> str:
    """Caption bytes to text: UTF-8 (a BOM is dropped; UTF-16 with a BOM is understood), else
    decoded with replacement characters and noted."""
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8):]
    elif data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        try:
            return data.decode("utf-16").strip()
        except UnicodeDecodeError:
            pass
    elif b"\x00" in data:  # no text has NULs: UTF-16 without a BOM (NULs in high or low bytes)
        order = "utf-16-le" if data[1::2].count(0) >= data[0::2].count(0) else "utf-16-be"
        try:
            text = data.decode(order)
        except UnicodeDecodeError:
            text = None
        if text is not None and "\x00" not in text:
            notes.append(("caption-utf16", f"no byte-order mark, decoded as {order.upper()}"))
            return text.strip()
        notes.append(("caption-not-utf8", "NUL bytes removed, decoded with replacement characters"))
        return data.replace(b"\x00", b"").decode("utf-8", errors="replace").strip()
    try:
        return data.decode("utf-8").strip()
    except UnicodeDecodeError:
        notes.append(("caption-not-utf8", "decoded with replacement characters"))
        return data.decode("utf-8", errors="replace").strip()
