"""The run directory (`--out-dir`): one run at a time, never reused silently, and a metrics file that survives
a kill at any moment.

- `claim` refuses to start a fresh run in a directory that already holds one (metrics.jsonl, config.json or
  checkpoints) unless the run continues it (`--resume`) or the user asked for `--overwrite`, which deletes
  exactly the files and directories archc writes there and nothing else. It then holds an exclusive
  `fcntl.flock` on `OUT/.archc.lock` for the life of the run, so a second `archc train` into the same
  directory stops with an error instead of deleting the first one's checkpoints in flight. The kernel drops
  the lock when the process dies (SIGKILL included): a killed run never leaves it held.
- `MetricsLog` appends one JSON line per step and flushes it. On resume it keeps the lines up to the
  checkpoint's step by writing a new file and `os.replace`-ing the old one, so a kill during the rewrite
  leaves the old file or the new one, never an empty or half one. A torn last line (a kill in the middle of
  an append) is dropped with a notice on stderr; a damaged line anywhere else stops the run with file:line.
  It is opened with O_NOFOLLOW: a metrics.jsonl that is a symbolic link is refused, never read or appended
  through (the other files of a run are replaced whole, which replaces a link rather than following it).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

from archc.training.config import TrainError

LOCK = ".archc.lock"
# What a run leaves in its directory: a fresh run refuses a directory holding one of the first five, and
# --overwrite deletes all of these and the replica_*/ directories of fault-tolerant groups (and nothing else).
RUN_MARKERS = ("metrics.jsonl", "config.json", "checkpoints", "dcp", "diloco")
RUN_FILES = RUN_MARKERS + ("loss.png", "sample.txt", "sync_schedule.json", "tokenizer.json", ".ft")


def notice(message: str) -> None:
    """A line on stderr about something the run recovered from (the run goes on)."""
    print(f"notice: {message}", file=sys.stderr, flush=True)


def write_atomic(path: Path, text: str) -> None:
    """Replace `path` with `text` in one step: a reader (or a crash) sees the old file or the new one."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def used(out_dir: Path) -> list[str]:
    """The files of an earlier run in `out_dir` (empty when a fresh run may start there)."""
    return [name for name in RUN_MARKERS if (out_dir / name).exists()]


def check_fresh(out_dir: Path, overwrite: bool) -> None:
    """Refuse (or with `overwrite`, clear) a directory that holds an earlier run."""
    earlier = used(out_dir) if out_dir.is_dir() else []
    if not earlier:
        return
    if not overwrite:
        raise TrainError(f"--out-dir {out_dir} already holds a run ({', '.join(earlier)}); continue it with "
                         "--resume, start over with --overwrite (deletes its checkpoints and metrics), or choose "
                         "another --out-dir")
    for name in RUN_FILES:
        path = out_dir / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
    for path in out_dir.glob("replica_*"):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)


@contextlib.contextmanager
def lock(out_dir: Path) -> Iterator[None]:
    """Hold an exclusive lock on `out_dir` while the block runs; a second holder gets a TrainError."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / LOCK
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
            raise TrainError(f"--out-dir {out_dir} is in use by another archc run (pid {holder}, lock {path}); "
                             "wait for it to finish or choose another --out-dir") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


@contextlib.contextmanager
def claim(out_dir: Path, *, resume: bool, overwrite: bool) -> Iterator[None]:
    """Lock `out_dir` for a run; a fresh run (not `resume`) also needs it unused, or `overwrite` to clear it."""
    if resume and overwrite:
        raise TrainError("--resume continues the run in --out-dir and --overwrite deletes it; choose one")
    with lock(out_dir):
        if not resume:
            check_fresh(out_dir, overwrite)
        yield


class MetricsLog:
    """metrics.jsonl: one JSON object per line, each with its `step`."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def fresh(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._replace([])

    def resume(self, step: int) -> None:
        """Keep the lines of steps up to `step` (the resumed run writes the rest again)."""
        self._replace([line for line, record in self._read() if record["step"] <= step])

    def append(self, record: dict) -> None:
        fd = _open_no_follow(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        with os.fdopen(fd, "a") as handle:
            handle.write(json.dumps(record) + "\n")

    def records(self) -> list[dict]:
        return [record for _line, record in self._read()]

    def _read(self) -> list[tuple[str, dict]]:
        if not self.path.exists() and not self.path.is_symlink():
            return []
        with os.fdopen(_open_no_follow(self.path, os.O_RDONLY), encoding="utf-8", errors="replace") as handle:
            lines = handle.read().split("\n")
        tail = lines.pop()  # after the last newline: "" unless the last append was cut short
        out = [(line, _record(line, self.path, number)) for number, line in enumerate(lines, 1) if line]
        if tail:
            try:
                out.append((tail, _record(tail, self.path, len(lines) + 1)))  # whole, only its newline missing
            except TrainError:
                notice(f"{self.path}: dropped a torn last line ({tail[:60]!r}), left by a run stopped while "
                       "writing it")
        return out

    def _replace(self, lines: list[str]) -> None:
        write_atomic(self.path, "".join(line + "\n" for line in lines))


def _open_no_follow(path: Path, flags: int) -> int:
    """os.open that refuses a symbolic link: a run reads and appends its own metrics file, never one a link
    points to elsewhere."""
    try:
        return os.open(path, flags | os.O_NOFOLLOW, 0o644)
    except OSError:
        if path.is_symlink():
            raise TrainError(f"{path} is a symbolic link (to {os.readlink(path)}); archc does not follow links for "
                             "its metrics: remove the link (the run rewrites the file)") from None
        raise


def _record(line: str, path: Path, number: int) -> dict:
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        record = None
    if not isinstance(record, dict) or not isinstance(record.get("step"), int):
        raise TrainError(f"{path}:{number}: not a metrics record ({line[:60]!r}); the file was changed outside "
                         "archc: repair or remove that line")
    return record
