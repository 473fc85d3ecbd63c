"""Checkpoint file digests: recorded in archc's own JSON when a checkpoint is saved, checked before it is read.

A checkpoint is trusted only if every file in its directory is one that the save wrote, with the size and
sha256 recorded then. This is what makes a torch.distributed.checkpoint directory safe to load (its reader
unpickles `.metadata`, so a replaced file would run code) and what tells a damaged or truncated safetensors
checkpoint from a good one, so a resume can fall back to the newest good checkpoint.
"""

from __future__ import annotations

import hashlib
from pathlib import Path


def _sha256(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def record(directory: Path, exclude: tuple[str, ...] = ()) -> dict[str, dict]:
    """{file name: {"bytes": size, "sha256": hex}} for every file in `directory` but `exclude`."""
    return {p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)}
            for p in sorted(directory.iterdir()) if p.name not in exclude}


def mismatch(directory: Path, recorded: object, exclude: tuple[str, ...] = ()) -> str | None:
    """Why the files of `directory` are not the recorded ones (None when they are): "incomplete: ...",
    "damaged: ..." or "changed: ...", naming the file."""
    if not isinstance(recorded, dict) or not all(isinstance(v, dict) for v in recorded.values()):
        return "damaged: its digest record is not a {file: {bytes, sha256}} table"
    present = {p.name: p for p in directory.iterdir() if p.name not in exclude}
    for name in sorted(recorded):
        if name not in present:
            return f"incomplete: {name} is missing"
    for name, path in sorted(present.items()):
        want = recorded.get(name)
        if want is None:
            return f"changed: {name} was not written by the save (it is not in the digest record)"
        if not path.is_file() or path.is_symlink():
            return f"changed: {name} is not a plain file"
        if path.stat().st_size != want.get("bytes"):
            return f"damaged: {name} has {path.stat().st_size} bytes, the save wrote {want.get('bytes')}"
        if _sha256(path) != want.get("sha256"):
            return f"changed: {name} differs from the file the save wrote (sha256 mismatch)"
    return None
