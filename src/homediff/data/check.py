"""``homediff data check``: decode every sample of a folder or of shards and list every problem."""

from __future__ import annotations

import functools
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from homediff.data.folder import Entry, missing_captions, read_entry, scan_folder
from homediff.data.problems import BadSample, Note
from homediff.data.progress import progress
from homediff.data.shards import IMAGE_MEMBERS, shard_list
from homediff.data.transform import DataConfig, load
from homediff.extras import require


@dataclass(frozen=True)
class Finding:
    path: str
    kind: str
    detail: str
    skipped: bool  # True: the sample is unusable; False: fixed on load


@dataclass
class CheckReport:
    samples: int = 0
    usable: int = 0
    findings: list[Finding] = field(default_factory=list)
    warning: str | None = None  # about the set as a whole (e.g. most captions missing)

    def counts(self) -> Counter[str]:
        return Counter(f.kind for f in self.findings)

    def add(self, path: str, result: tuple[list[Note], BadSample | None], bar=None) -> None:
        notes, bad = result
        self.samples += 1
        self.usable += bad is None
        if bar is not None:
            bar.update()
            if self.samples % 100 == 0 or bad is not None:
                bar.set_postfix(usable=self.usable, skipped=self.samples - self.usable, refresh=False)
        self.findings.extend(Finding(path, kind, detail, False) for kind, detail in notes)
        if bad is not None:
            self.findings.append(Finding(path, bad.kind, bad.detail, True))


def _check(read, config: DataConfig, size: int | None) -> tuple[list[Note], BadSample | None]:
    notes: list[Note] = []
    try:
        load(*read(), config, notes, size)
    except BadSample as bad:
        return notes, bad
    return notes, None


def _check_entry(root: Path, config: DataConfig, size: int | None, entry: Entry):
    return _check(functools.partial(read_entry, root, entry, config), config, size)


def check_folder(root: str | Path, config: DataConfig | None = None, size: int | None = None,
                 workers: int = 1, cache: bool | str | Path = True) -> CheckReport:
    """Check every image under ``root`` (see ``problems`` for the kinds). ``size``: the crop size
    to check against (too-small, upscaled), or None to skip size checks."""
    root, config = Path(root), config or DataConfig()
    entries = scan_folder(root, cache, config.caption_extension, config.allow_outside_links)
    report = CheckReport(warning=missing_captions(entries, config))
    check = functools.partial(_check_entry, root, config, size)
    with progress(f"checking {root}", len(entries), "image") as bar:
        if workers > 1 and len(entries) > 1:
            with ProcessPoolExecutor(workers) as pool:
                for entry, result in zip(entries, pool.map(check, entries, chunksize=64)):
                    report.add(str(root / entry.image), result, bar)
        else:
            for entry in entries:
                report.add(str(root / entry.image), check(entry), bar)
    return report


def check_shards(shards, config: DataConfig | None = None, size: int | None = None) -> CheckReport:
    """Check every sample of tar shards (a folder of .tar files, a glob or a list)."""
    tariterators = require("webdataset.tariterators", "data", "webdataset")
    config, report = config or DataConfig(), CheckReport()

    def bad_shard(err: Exception) -> bool:
        where = next((str(a) for a in reversed(err.args) if isinstance(a, str)), "a shard")
        report.findings.append(Finding(where, "bad-shard", f"{type(err).__name__}", True))
        return True

    def read(raw: dict):
        image = next((raw[m] for m in IMAGE_MEMBERS if m in raw), None)
        if image is None:
            raise BadSample("no-image", f"no image member ({', '.join(IMAGE_MEMBERS)})")
        return image, raw.get("txt")

    with progress(f"checking {shards}", None, "sample") as bar:
        for raw in tariterators.tarfile_samples([{"url": u} for u in shard_list(shards)],
                                                handler=bad_shard):
            key = raw.get("path", b"").decode(errors="replace") or raw["__key__"]
            report.add(f"{raw['__url__']}:{key}", _check(functools.partial(read, raw), config, size), bar)
    return report
