"""Manifests: a published directory counts only when its manifest, written last, lists every file.

A checkpoint or a final model is many files, and object storage has no rename: an upload cut
short leaves some of them behind. So every published directory carries ``MANIFEST_NAME``, the
list of its files with their sizes and sha256, written after everything it lists. A reader
trusts a directory only when the manifest is there and the files match it; the manifest's own
sha256 is the artifact's identity (``status.artifacts[].sha256``).

Several writers (the ranks of a sharded checkpoint, each with its own files) each describe
their part with ``build_manifest(directory, only=...)``; rank 0 ``merge``s the parts and writes
the whole manifest once every part is in place. Torch-free and I/O-light: only hashing.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Final

from pydantic import BaseModel, ConfigDict

from finetune_trainer.atomic import atomic_file

__all__ = [
    "MANIFEST_NAME",
    "FileEntry",
    "Manifest",
    "ManifestMismatchError",
    "build_manifest",
    "file_sha256",
    "merge",
    "read_manifest",
    "verify",
    "write_manifest",
]

MANIFEST_NAME: Final = "finetune-manifest.json"
"""The manifest's file name inside the directory it describes."""
_CHUNK: Final = 4 * 1024 * 1024


class FileEntry(BaseModel):
    """One file of a published directory: its path relative to the directory, size and hash."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    path: str
    size: int
    sha256: str


class Manifest(BaseModel):
    """Every file of a published directory, sorted by path (so equal contents serialise equally)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    version: int = 1
    files: tuple[FileEntry, ...] = ()

    @property
    def total_size(self) -> int:
        return sum(entry.size for entry in self.files)

    def serialise(self) -> bytes:
        """The exact bytes written to disk and hashed: sorted keys, no whitespace variance."""
        return (json.dumps(self.model_dump(mode="json"), sort_keys=True, indent=1) + "\n").encode()

    @property
    def sha256(self) -> str:
        """The directory's identity: the hash of the manifest's bytes."""
        return hashlib.sha256(self.serialise()).hexdigest()


class ManifestMismatchError(Exception):
    """A directory's files differ from its manifest (or it has none): it is not complete."""


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        while chunk := stream.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _files(directory: Path) -> Iterable[Path]:
    for root, dirs, names in os.walk(directory):
        dirs.sort()
        for name in sorted(names):
            path = Path(root) / name
            if path.parent == directory and name == MANIFEST_NAME:
                continue
            yield path


def build_manifest(directory: Path, only: Callable[[str], bool] | None = None) -> Manifest:
    """Describe the files under ``directory`` (those whose relative path ``only`` accepts)."""
    entries = []
    for path in _files(directory):
        relative = path.relative_to(directory).as_posix()
        if only is not None and not only(relative):
            continue
        entries.append(FileEntry(path=relative, size=path.stat().st_size, sha256=file_sha256(path)))
    return Manifest(files=tuple(entries))


def merge(parts: Iterable[Manifest]) -> Manifest:
    """One manifest from the parts several writers built; a path listed twice must agree."""
    by_path: dict[str, FileEntry] = {}
    for part in parts:
        for entry in part.files:
            seen = by_path.setdefault(entry.path, entry)
            if seen != entry:
                raise ManifestMismatchError(f"{entry.path} is listed twice with different contents")
    return Manifest(files=tuple(by_path[path] for path in sorted(by_path)))


def write_manifest(directory: Path, manifest: Manifest | None = None) -> Manifest:
    """Write ``directory``'s manifest last (flushed, then renamed into place); returns it."""
    manifest = manifest if manifest is not None else build_manifest(directory)
    atomic_file(directory / MANIFEST_NAME, manifest.serialise())
    return manifest


def read_manifest(directory: Path) -> Manifest | None:
    """The manifest of ``directory``, or None when it has none (an unfinished publication)."""
    path = directory / MANIFEST_NAME
    try:
        return Manifest.model_validate_json(path.read_bytes())
    except FileNotFoundError:
        return None
    except ValueError as error:
        raise ManifestMismatchError(f"{path} is not a manifest: {error}") from error


def verify(directory: Path, *, hashes: bool = True) -> Manifest:
    """The manifest of a complete directory; ManifestMismatchError names the first difference.

    With ``hashes=False`` only presence and sizes are checked (cheap, for listing checkpoints).
    """
    manifest = read_manifest(directory)
    if manifest is None:
        raise ManifestMismatchError(f"{directory} has no {MANIFEST_NAME}: its publication did not finish")
    for entry in manifest.files:
        path = directory / entry.path
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise ManifestMismatchError(f"{directory}: {entry.path} is missing") from None
        if size != entry.size:
            raise ManifestMismatchError(f"{directory}: {entry.path} has {size} bytes, the manifest says {entry.size}")
        if hashes and file_sha256(path) != entry.sha256:
            raise ManifestMismatchError(f"{directory}: {entry.path} does not match its sha256")
    return manifest
