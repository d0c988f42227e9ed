"""A published directory counts only when its manifest lists every file, sizes and hashes."""

from __future__ import annotations

from pathlib import Path

import pytest

from finetune_trainer import manifest as mf


def _tree(root: Path) -> Path:
    (root / "sub").mkdir(parents=True)
    (root / "model.safetensors").write_bytes(b"w" * 1000)
    (root / "config.json").write_text("{}")
    (root / "sub" / "rank-1.distcp").write_bytes(b"shard")
    return root


def test_written_manifest_lists_every_file_and_verifies(tmp_path: Path) -> None:
    directory = _tree(tmp_path / "ckpt")
    written = mf.write_manifest(directory)
    assert [entry.path for entry in written.files] == ["config.json", "model.safetensors", "sub/rank-1.distcp"]
    assert written.total_size == 1000 + 2 + 5
    assert mf.verify(directory) == written
    assert mf.read_manifest(directory) == written
    assert written.sha256 == mf.file_sha256(directory / mf.MANIFEST_NAME)


def test_unfinished_or_altered_directories_do_not_verify(tmp_path: Path) -> None:
    directory = _tree(tmp_path / "ckpt")
    with pytest.raises(mf.ManifestMismatchError, match="did not finish"):
        mf.verify(directory)
    mf.write_manifest(directory)
    (directory / "model.safetensors").write_bytes(b"x" * 1000)
    mf.verify(directory, hashes=False)
    with pytest.raises(mf.ManifestMismatchError, match=r"model\.safetensors does not match"):
        mf.verify(directory)
    (directory / "config.json").unlink()
    with pytest.raises(mf.ManifestMismatchError, match=r"config\.json is missing"):
        mf.verify(directory, hashes=False)


def test_parts_of_several_writers_merge_into_the_whole(tmp_path: Path) -> None:
    directory = _tree(tmp_path / "ckpt")
    parts = [
        mf.build_manifest(directory, only=lambda path: path.startswith("sub/")),
        mf.build_manifest(directory, only=lambda path: not path.startswith("sub/")),
    ]
    assert mf.merge(parts) == mf.build_manifest(directory)
    changed = mf.Manifest(files=(mf.FileEntry(path="config.json", size=3, sha256="0" * 64),))
    with pytest.raises(mf.ManifestMismatchError, match="listed twice"):
        mf.merge([*parts, changed])
