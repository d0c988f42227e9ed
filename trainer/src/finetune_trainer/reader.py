"""Read a dataset's local files and check them against the spec: the shared reader under `data`.

Torch-free (pyarrow only, about 0.2 s to import), so `preflight` reports a missing file, column or
bad label before the training stack is imported; the tables it reads are the ones training uses.
The checks also take a hub split (a ``datasets.Dataset``): anything with ``column_names`` and columns.
"""

from __future__ import annotations

import glob
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow  # type: ignore[import-untyped]
import pyarrow.csv  # type: ignore[import-untyped]
import pyarrow.json  # type: ignore[import-untyped]
import pyarrow.parquet  # type: ignore[import-untyped]

from finetune_trainer.config import RuntimeEnv, local_path
from finetune_trainer.errors import ConfigError, DataError
from finetune_trainer.spec import TrainingSpec

FORMATS = {".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv", ".parquet": "parquet"}


@dataclass
class RawSplit:
    """Rows as read (a pyarrow Table from local files, a ``datasets.Dataset`` from the hub), a short name for
    messages (a file name or an hf split), the folder image paths are relative to, and the checked labels."""

    rows: Any
    name: str
    base: Path | None
    labels: list[int] | None = None
    """Class indices, one per row, once `check_split` has checked a classification split."""

    @property
    def columns(self) -> list[str]:
        return list(self.rows.column_names)

    def values(self, column: str) -> list[Any]:
        """One column as Python values (what ``datasets`` hands out for the same rows)."""
        if isinstance(self.rows, pyarrow.Table):
            values: list[Any] = self.rows.column(column).to_pylist()
            return values
        return list(self.rows[column])

    def __len__(self) -> int:
        return len(self.rows)


def is_hub(spec: TrainingSpec) -> bool:
    """An ``hf://datasets`` source: read by ``datasets`` (a download), not here."""
    return spec.dataset.source.startswith("hf://")


def _read_file(path: Path, fmt: str) -> Any:
    """A pyarrow table, read in memory (no datasets cache: the pod's root filesystem is read-only)."""
    try:
        if fmt == "jsonl":
            return pyarrow.json.read_json(str(path))
        if fmt == "csv":
            return pyarrow.csv.read_csv(str(path))
        return pyarrow.parquet.read_table(str(path))
    except Exception as exc:  # pyarrow raises several unrelated types
        raise DataError(f"dataset: cannot read {path.name} as {fmt}: {str(exc).splitlines()[0]}") from exc


def _blank(path: Path) -> bool:
    """Empty or whitespace-only (pyarrow refuses to read those; they simply have no rows)."""
    size = path.stat().st_size
    return size == 0 or (size < 4096 and not path.read_bytes().strip())


def read_local(spec: TrainingSpec, env: RuntimeEnv, pattern: str, where: str) -> RawSplit:
    """The files matching ``pattern`` under the dataset's local source, as one table with at least one row."""
    base = local_path(spec.dataset.source, env.pvc_root)
    if not base.is_dir():
        raise DataError(f"dataset.source: {spec.dataset.source} not found ({base} is not a directory)")
    files = sorted(Path(p) for p in glob.glob(str(base / pattern), recursive=True) if Path(p).is_file())
    if not files:
        raise DataError(f"{where}: no file matches {pattern!r} in {spec.dataset.source}")
    tables = []
    name = files[0].name if len(files) == 1 else f"{pattern} ({len(files)} files)"
    for path in files:
        fmt = spec.dataset.format or FORMATS.get(path.suffix.lower())
        if fmt is None:
            raise ConfigError(f"dataset.format: cannot infer the format of {path.name}; set jsonl, csv or parquet")
        if not _blank(path):
            tables.append(_read_file(path, fmt))
    if not tables:
        raise DataError(f"{where}: {name} has no rows")
    try:
        table = pyarrow.concat_tables(tables, promote_options="default")
    except pyarrow.ArrowInvalid as exc:
        raise ConfigError(f"{where}: files matching {pattern!r} have different columns: {exc}") from exc
    return require_rows(RawSplit(table, name, base), where)


def require_rows(split: RawSplit, where: str) -> RawSplit:
    if len(split) == 0:
        raise DataError(f"{where}: {split.name} has no rows")
    return split


def required_columns(spec: TrainingSpec) -> dict[str, str]:
    """Spec field name → column name the task reads."""
    fields = spec.dataset.fields
    task = spec.model.task
    if task == "causal-lm":
        return {"messages": fields.messages} if fields.messages else {"text": fields.text}
    needed = {"image": fields.image} if task == "image-classification" else {"text": fields.text}
    if task == "sequence-classification" and fields.text_pair:
        needed["textPair"] = fields.text_pair
    needed["label"] = fields.label
    return needed


def check_columns(spec: TrainingSpec, split: RawSplit) -> None:
    """Every column the task reads is there, and its values have the right shape (row and file named)."""
    columns = split.columns
    required = required_columns(spec)
    for key, column in required.items():
        if column not in columns:
            raise DataError(
                f"dataset.fields.{key}: column {column!r} not in {split.name} (columns: {', '.join(columns)})"
            )
        if key in ("text", "textPair"):
            check_text_column(split, key, column)
        elif key == "messages":
            check_messages(split, column, need_assistant=spec.dataset.assistant_only_loss)


def check_text_column(split: RawSplit, key: str, column: str) -> None:
    """Every value a string: a CSV column of numbers or a null would otherwise become the text "5" or "None"."""
    for row, value in enumerate(split.values(column)):
        if not isinstance(value, str):
            found = "null" if value is None else f"a {type(value).__name__} ({value!r})"
            kind = " (the column holds numbers, not text)" if isinstance(value, int | float) else ""
            raise DataError(
                f"dataset.fields.{key}: row {row} of {split.name}: column {column!r} is {found}, "
                f"expected a string{kind}"
            )


def check_messages(split: RawSplit, column: str, need_assistant: bool) -> None:
    """Each value a non-empty list of {role: str, content: str} mappings (with an assistant turn, if learned)."""
    for row, value in enumerate(split.values(column)):
        problem = None
        if not isinstance(value, list) or not value:
            problem = "is not a non-empty list of messages"
        else:
            for i, message in enumerate(value):
                if not isinstance(message, dict):
                    problem = f"message {i} is not a mapping"
                elif not isinstance(message.get("role"), str):
                    problem = f"message {i} has no string 'role'"
                elif not isinstance(message.get("content"), str):
                    problem = f"message {i} has no string 'content'"
                if problem:
                    break
            if problem is None and need_assistant and all(m.get("role") != "assistant" for m in value):
                problem = "has no assistant message to learn from (or set dataset.assistantOnlyLoss: false)"
        if problem:
            raise DataError(
                f"dataset.fields.messages: row {row} of {split.name}: column {column!r} {problem} "
                "(expected [{role: ..., content: ...}, ...])"
            )


def label_ids(spec: TrainingSpec, split: RawSplit) -> list[int]:
    """Labels as class indices: integers in [0, numLabels) or names from labelNames."""
    num_labels = spec.model.effective_num_labels or 0
    names = {name: i for i, name in enumerate(spec.model.label_names or [])}
    out = []
    for row, value in enumerate(split.values(spec.dataset.fields.label)):
        if isinstance(value, bool) or value is None:
            index = -1
        elif isinstance(value, int):
            index = value
        elif isinstance(value, float) and value.is_integer():
            index = int(value)
        elif isinstance(value, str) and value in names:
            index = names[value]
        elif isinstance(value, str) and value.strip().lstrip("-").isdigit() and not names:
            index = int(value)
        else:
            known = f" (labelNames: {', '.join(names)})" if names else ""
            raise DataError(f"dataset: label {value!r} in row {row} of {split.name} is not a class{known}")
        if not 0 <= index < num_labels:
            raise DataError(
                f"dataset: label {value!r} in row {row} of {split.name} is outside numLabels {num_labels} "
                f"(expected 0..{num_labels - 1})"
            )
        out.append(index)
    return out


def check_image_paths(spec: TrainingSpec, split: RawSplit) -> None:
    """Every image the split names exists (images themselves are decoded lazily, while training)."""
    root = split.base or Path()
    for value in split.values(spec.dataset.fields.image):
        path = root / str(value)
        if not path.is_file():
            raise DataError(f"dataset.fields.image: {path} not found (image paths are relative to dataset.source)")


def check_values(spec: TrainingSpec, splits: list[RawSplit]) -> None:
    """After the columns: the labels of a classification split (kept on it), then the image files it names."""
    if spec.model.task != "causal-lm":
        for split in splits:
            split.labels = label_ids(spec, split)
    if spec.model.task == "image-classification":
        for split in splits:
            check_image_paths(spec, split)
