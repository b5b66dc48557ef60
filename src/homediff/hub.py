"""Hub ids wherever a path is taken: ``owner/repo`` (the repository) or ``owner/repo/path/in/repo``
(one file or folder of it), fetched through huggingface_hub into its cache. Offline
(``HF_HUB_OFFLINE=1``) only the cache is read; an id not in it is an error naming the id.
"""

from __future__ import annotations

import re
from pathlib import Path

from homediff.errors import CheckpointError

#: owner/repo, then an optional path inside the repository; names as the hub allows them.
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*(/[^/].*)?$")


def is_hub_id(spec: str | Path) -> bool:
    return isinstance(spec, str) and bool(HUB_ID.match(spec)) and ".." not in spec.split("/")


def resolve(spec: str | Path, what: str = "model") -> Path:
    """``spec`` as a local path: an existing path as given, else a hub id's files in the cache
    (downloaded first unless offline). ``what`` names the thing in error messages."""
    path = Path(spec).expanduser()
    if path.exists() or not is_hub_id(str(spec)):
        if not path.exists():
            raise CheckpointError(f"{what} {spec}: no such file or folder (nor a hub id owner/repo)")
        return path
    import huggingface_hub as hub  # a dependency of transformers and diffusers

    owner, repo, *inside = str(spec).split("/")
    inside = "/".join(inside)
    patterns = [inside, f"{inside}/*"] if inside else None
    try:
        snapshot = Path(hub.snapshot_download(f"{owner}/{repo}", allow_patterns=patterns))
    except Exception as err:  # huggingface_hub raises many kinds (offline, not found, HTTP)
        where = "the local hub cache (offline: HF_HUB_OFFLINE is set)" if hub.constants.HF_HUB_OFFLINE \
            else "the hub"
        raise CheckpointError(f"{what} {spec}: not a local path, and {where} has no {owner}/{repo} "
                              f"({type(err).__name__}: {err})") from None
    target = snapshot / inside if inside else snapshot
    if not target.exists():
        raise CheckpointError(f"{what} {spec}: the hub repository {owner}/{repo} has no {inside!r}")
    return target
