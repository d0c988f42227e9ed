"""Atomic directory writes: a checkpoint or model directory is either whole or absent.

A kill (SIGKILL after the grace period, an evicted pod) in the middle of a save must never
leave a directory that looks complete. Everything is written into a hidden sibling
temporary directory, flushed, and renamed into place; a previous directory of the same name
is moved aside first and removed only after the new one is in place.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

TEMP_PREFIX = ".tmp-"
"""Names of unfinished writes: readers (resume, checkpoint listing) skip them."""
_OLD_MARK = "-old-"


def _fsync_tree(root: Path) -> None:
    for directory, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(directory, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    _fsync_dir(root)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_file(target: Path, data: bytes) -> None:
    """Write one small file whole or not at all: a hidden sibling, flushed, renamed into place."""
    temporary = target.parent / f".{target.name}.tmp"
    with temporary.open("wb") as stream:
        stream.write(data)
        stream.flush()
        os.fsync(stream.fileno())
    os.replace(temporary, target)
    _fsync_dir(target.parent)


def is_temporary(path: Path) -> bool:
    """True for a leftover of an interrupted write (never a real checkpoint)."""
    return path.name.startswith(TEMP_PREFIX)


def remove_leftovers(parent: Path, only: str | None = None) -> list[Path]:
    """Clean up after an interrupted write under `parent`; returns what was removed.

    Unfinished new directories are deleted. A previous directory that was moved aside but
    whose replacement never arrived (a kill between the two renames) is put back. With ``only``,
    just the leftovers of writes to ``parent / only``: another process may be writing its own
    sibling there right now (each rank its activation cache).
    """
    removed = []
    if parent.is_dir():
        for child in sorted(parent.iterdir()):
            if not is_temporary(child):
                continue
            name, sep, _ = child.name[len(TEMP_PREFIX) :].rpartition(_OLD_MARK)
            target = name if sep else child.name[len(TEMP_PREFIX) :].rpartition("-")[0]
            if only is not None and target != only:
                continue
            if sep and not (parent / name).exists():
                os.replace(child, parent / name)
                continue
            shutil.rmtree(child, ignore_errors=True)
            removed.append(child)
    return removed


@contextmanager
def atomic_directory(target: Path) -> Iterator[Path]:
    """Yield a temporary directory to fill; on success it becomes `target` in one rename.

    On an exception the temporary directory is removed and `target` is left as it was.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f"{TEMP_PREFIX}{target.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        _fsync_tree(tmp)
        old = None
        if target.exists():
            old = target.parent / f"{TEMP_PREFIX}{target.name}{_OLD_MARK}{uuid.uuid4().hex[:8]}"
            os.replace(target, old)
        os.replace(tmp, target)
        _fsync_dir(target.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
