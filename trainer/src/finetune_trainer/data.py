"""Read the dataset named by the spec, check it against the spec, and turn it into model inputs."""

from __future__ import annotations

import glob
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import pyarrow  # type: ignore[import-untyped]
import pyarrow.csv  # type: ignore[import-untyped]
import pyarrow.json  # type: ignore[import-untyped]
import pyarrow.parquet  # type: ignore[import-untyped]
import torch
from datasets import ClassLabel, Dataset, load_dataset
from PIL import Image
from torchvision.transforms import v2 as transforms
from transformers import DataCollatorWithFlattening, DataCollatorWithPadding

from finetune_trainer.config import RuntimeEnv, local_path
from finetune_trainer.errors import ConfigError, DataError
from finetune_trainer.spec import Augmentation, DatasetSpec, TrainingSpec
from finetune_trainer.token_cache import cached_encode

FORMATS = {".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv", ".parquet": "parquet"}


@dataclass
class PreparedData:
    """Model-ready splits plus the collator that batches them."""

    train: Dataset
    validation: Dataset | None
    collator: Callable[[list[dict[str, Any]]], dict[str, Any]]
    cached_splits: tuple[str, ...] = ()
    """Splits whose tokens came from the cache on the output volume (see token_cache)."""


@dataclass
class RawSplit:
    """Rows as read, and a short name for messages (a file name or an hf split)."""

    rows: Dataset
    name: str
    base: Path | None


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


def _read_local(spec: TrainingSpec, env: RuntimeEnv, pattern: str, where: str) -> RawSplit:
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
    return RawSplit(Dataset(table), name, base)


def _read_hub(spec: TrainingSpec, env: RuntimeEnv, split: str, where: str) -> RawSplit:
    repo = spec.dataset.source[len("hf://datasets/") :]
    try:
        rows = load_dataset(repo, split=split, token=env.hf_token)
    except Exception as exc:  # hub, network and format errors all mean "cannot get this data"
        raise DataError(
            f"{where}: cannot load split {split!r} of {spec.dataset.source}: {str(exc).splitlines()[0]}"
        ) from exc
    return RawSplit(rows, f"{split} split", None)


def read_split(spec: TrainingSpec, env: RuntimeEnv, pattern: str, where: str) -> RawSplit:
    if spec.dataset.source.startswith("hf://"):
        split = _read_hub(spec, env, pattern, where)
    else:
        split = _read_local(spec, env, pattern, where)
    if len(split.rows) == 0:
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
    columns = list(split.rows.column_names)
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
    for row, value in enumerate(split.rows[column]):
        if not isinstance(value, str):
            found = "null" if value is None else f"a {type(value).__name__} ({value!r})"
            kind = " (the column holds numbers, not text)" if isinstance(value, int | float) else ""
            raise DataError(
                f"dataset.fields.{key}: row {row} of {split.name}: column {column!r} is {found}, "
                f"expected a string{kind}"
            )


def check_messages(split: RawSplit, column: str, need_assistant: bool) -> None:
    """Each value a non-empty list of {role: str, content: str} mappings (with an assistant turn, if learned)."""
    for row, value in enumerate(split.rows[column]):
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
    for row, value in enumerate(split.rows[spec.dataset.fields.label]):
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


def _with_labels(spec: TrainingSpec, split: RawSplit) -> Dataset:
    ids = label_ids(spec, split)
    rows = (
        split.rows.remove_columns([spec.dataset.fields.label]) if spec.dataset.fields.label != "labels" else split.rows
    )
    if "labels" in rows.column_names:
        rows = rows.remove_columns(["labels"])
    names = spec.model.label_names or [str(i) for i in range(spec.model.effective_num_labels or 0)]
    return rows.add_column("labels", ids).cast_column("labels", ClassLabel(names=names))


def assistant_spans(processor: Any, messages: list[dict[str, Any]], text: str) -> list[tuple[int, int]]:
    """Character spans of ``text`` (the rendered chat) that assistant turns produced, end-of-turn markup included.

    A turn is what rendering ``messages[: i + 1]`` adds to rendering ``messages[:i]``; for a template whose
    renderings are not prefixes of each other, the turn's content.
    """
    spans = []
    previous = ""
    cursor = 0
    for i, message in enumerate(messages):
        rendered = processor.apply_chat_template(messages[: i + 1], tokenize=False)
        if rendered.startswith(previous) and text.startswith(rendered):
            start, end = len(previous), len(rendered)
        else:
            start = text.find(message["content"], cursor)
            end = start + len(message["content"])
        if message["role"] == "assistant" and start >= 0:
            spans.append((start, end))
        cursor = max(cursor, end)
        previous = rendered
    return spans


def chat_tokens(processor: Any, messages: list[dict[str, Any]], assistant_only: bool) -> tuple[list[int], list[int]]:
    """Ids of the rendered chat (the template places its own special tokens: none are added again), and labels."""
    text = processor.apply_chat_template(messages, tokenize=False)
    encoded = processor(text, add_special_tokens=False, return_offsets_mapping=assistant_only)
    ids: list[int] = encoded["input_ids"]
    if not assistant_only:
        return ids, list(ids)
    spans = assistant_spans(processor, messages, text)
    labels = [
        token if any(start <= begin < end for start, end in spans) else -100
        for token, (begin, _) in zip(ids, encoded["offset_mapping"], strict=True)
    ]
    return ids, labels


def tokenize_text(spec: TrainingSpec, rows: Dataset, processor: Any) -> Dataset:
    fields = spec.dataset.fields
    max_len = spec.dataset.max_seq_length
    if spec.model.task == "sequence-classification":

        def encode(batch: dict[str, Any]) -> Any:
            pair = batch[fields.text_pair] if fields.text_pair else None
            return processor(batch[fields.text], pair, truncation=True, max_length=max_len)

        keep = {"labels"}
        return rows.map(encode, batched=True, remove_columns=[c for c in rows.column_names if c not in keep])
    if fields.messages:
        column = fields.messages
        if not getattr(processor, "chat_template", None):
            raise ConfigError("dataset.fields.messages: the tokenizer has no chat template to render messages with")
        assistant_only = spec.dataset.assistant_only_loss
        if assistant_only and not getattr(processor, "is_fast", False):
            raise ConfigError("dataset.assistantOnlyLoss needs a fast tokenizer (token offsets); set it to false")

        def encode_chat(batch: dict[str, Any]) -> Any:
            pairs = [chat_tokens(processor, messages, assistant_only) for messages in batch[column]]
            return {"input_ids": [ids[:max_len] for ids, _ in pairs], "labels": [lab[:max_len] for _, lab in pairs]}

        return rows.map(encode_chat, batched=True, remove_columns=rows.column_names)
    eos = processor.eos_token_id

    def encode_text(batch: dict[str, Any]) -> Any:
        # strings (check_columns refused nulls and numbers); EOS ends each document, unless truncation cut it off
        ids = [
            ([*encoded, eos] if eos is not None and encoded[-1:] != [eos] else encoded)[:max_len]
            for encoded in processor(batch[fields.text])["input_ids"]
        ]
        return {"input_ids": ids, "labels": ids}

    return rows.map(encode_text, batched=True, remove_columns=rows.column_names)


class PackingCollator:
    """One padding-free row per batch (transformers' ``DataCollatorWithFlattening``). transformers turns the
    restarting position ids into a block-diagonal attention mask, but only without a KV cache: the batch turns
    the cache off (the model's config, saved with the final model, is untouched)."""

    def __init__(self) -> None:
        self.flatten = DataCollatorWithFlattening(return_position_ids=True)  # type: ignore[no-untyped-call]

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        batch: dict[str, Any] = dict(self.flatten(features))
        batch["use_cache"] = False
        return batch


class CausalLMCollator:
    """Pad to the longest sequence; labels are the examples' own (-100 where not learned), -100 on padding."""

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        width = max(len(f["input_ids"]) for f in features)
        ids = torch.full((len(features), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(features), width), dtype=torch.long)
        labels = torch.full((len(features), width), -100, dtype=torch.long)
        for row, feature in enumerate(features):
            n = len(feature["input_ids"])
            ids[row, :n] = torch.as_tensor(feature["input_ids"], dtype=torch.long)
            labels[row, :n] = torch.as_tensor(feature["labels"], dtype=torch.long)
            mask[row, :n] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def augmentation_transforms(augmentation: Augmentation | None) -> transforms.Compose | None:
    """The training split's random transforms, on PIL images before the image processor (None: no augmentation)."""
    if augmentation is None:
        return None
    steps: list[Any] = []
    if augmentation.random_resized_crop is not None:
        crop = augmentation.random_resized_crop
        steps.append(transforms.RandomResizedCrop(crop.size, scale=(crop.scale_min, crop.scale_max)))
    if augmentation.rotation_degrees is not None:
        steps.append(transforms.RandomRotation(augmentation.rotation_degrees))
    if augmentation.horizontal_flip is not None:
        steps.append(transforms.RandomHorizontalFlip(augmentation.horizontal_flip))
    if augmentation.color_jitter is not None:
        j = augmentation.color_jitter
        steps.append(transforms.ColorJitter(j.brightness, j.contrast, j.saturation, j.hue))
    return transforms.Compose(steps) if steps else None


def image_pipeline(processor: Any, augmentation: Augmentation | None) -> Callable[[list[Any]], list[torch.Tensor]]:
    """Images → pixel tensors: augmentation (training only), then the image processor itself.

    The processor applies the model's own resize (size / shortest_edge, crop_pct), center crop (crop_size),
    resample filter, rescale and mean/std, exactly as at inference.
    """
    augment = augmentation_transforms(augmentation)

    def apply(images: list[Any]) -> list[torch.Tensor]:
        if augment is not None:
            images = [augment(image) for image in images]
        pixels: torch.Tensor = processor(images=images, return_tensors="pt")["pixel_values"]
        return list(pixels)

    return apply


def attach_images(
    spec: TrainingSpec, rows: Dataset, base: Path | None, transform: Callable[[list[Any]], list[torch.Tensor]]
) -> Dataset:
    """Images load lazily (``set_transform``); every path must exist up front so a typo fails fast."""
    column = spec.dataset.fields.image
    root = base or Path()
    paths = [root / str(p) for p in rows[column]]
    missing = next((p for p in paths if not p.is_file()), None)
    if missing is not None:
        raise DataError(f"dataset.fields.image: {missing} not found (image paths are relative to dataset.source)")
    rows = rows.select_columns([column, "labels"])

    def load(batch: dict[str, Any]) -> dict[str, Any]:
        images = []
        for path in batch[column]:
            images.append(_decode(root / str(path)))
        return {"pixel_values": transform(images), "labels": batch["labels"]}

    rows.set_transform(load)
    return rows


def _decode(path: Path) -> Image.Image:
    """Decode one image; a corrupt or truncated file is a DataError naming it, even mid-epoch."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as exc:  # UnidentifiedImageError is an OSError
        raise DataError(f"dataset.fields.image: cannot decode {path}: {str(exc).splitlines()[0]}") from exc


def image_collator(features: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "pixel_values": torch.stack([f["pixel_values"] for f in features]),
        "labels": torch.as_tensor([f["labels"] for f in features], dtype=torch.long),
    }


def _limit(rows: Dataset, limit: int | None, seed: int, shuffle: bool) -> Dataset:
    if shuffle and limit is not None and limit < len(rows):
        return rows.shuffle(seed=seed).select(range(limit))
    if limit is not None and limit < len(rows):
        return rows.select(range(limit))
    return rows


def _split_validation(rows: Dataset, fraction: float, seed: int, stratify: bool) -> tuple[Dataset, Dataset]:
    if len(rows) < 2:
        raise DataError("dataset.validationFraction: need at least two rows to hold some out")
    if stratify:
        try:
            parts = rows.train_test_split(test_size=fraction, seed=seed, stratify_by_column="labels")
            return parts["train"], parts["test"]
        except ValueError:
            pass  # a class too small to stratify: fall back to a plain seeded split
    parts = rows.train_test_split(test_size=fraction, seed=seed)
    return parts["train"], parts["test"]


POSITION_ATTRIBUTES = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")


def model_positions(processor: Any, model_config: Any) -> int | None:
    """How many tokens the model can take: its position table (less a RoBERTa-like padding offset)."""
    config = getattr(model_config, "text_config", None) or model_config
    positions = next(
        (getattr(config, a) for a in POSITION_ATTRIBUTES if isinstance(getattr(config, a, None), int)), None
    )
    tokenizer_limit = getattr(processor, "model_max_length", None)
    if positions is not None and isinstance(tokenizer_limit, int) and positions - 2 <= tokenizer_limit < positions:
        return tokenizer_limit  # RoBERTa-like: 514 positions, 512 usable (the padding offset)
    return positions  # a tokenizer's lower limit is often only a suggestion: not a reason to refuse


def fit_max_seq_length(spec: TrainingSpec, processor: Any, model_config: Any) -> TrainingSpec:
    """The default maxSeqLength is capped to the model's positions; an explicit value above them is an error."""
    limit = model_positions(processor, model_config)
    wanted = spec.dataset.max_seq_length
    if limit is None or wanted <= limit:
        return spec
    if wanted != DatasetSpec.model_fields["max_seq_length"].default:
        raise ConfigError(f"dataset.maxSeqLength: {wanted} exceeds the {limit} positions the model supports")
    return spec.model_copy(update={"dataset": spec.dataset.model_copy(update={"max_seq_length": limit})})


def model_inputs(model: Any) -> set[str]:
    """Named arguments of the model's forward, as the Trainer's own column pruning sees them."""
    params = inspect.signature(model.forward).parameters
    return {name for name, p in params.items() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}


def drop_unused_inputs(prepared: PreparedData, model: Any) -> PreparedData:
    """Drop token columns the model does not take (e.g. ``token_type_ids`` from a BERT tokenizer on Llama).

    The Trainer's own pruning is off (``remove_unused_columns=False``: images are decoded lazily).
    """
    accepted = model_inputs(model)

    def prune(rows: Dataset | None) -> Dataset | None:
        if rows is None or "input_ids" not in rows.column_names:
            return rows
        unused = [c for c in rows.column_names if c not in accepted and c != "labels"]
        return rows.remove_columns(unused) if unused else rows

    train = prune(prepared.train)
    assert train is not None
    return PreparedData(train, prune(prepared.validation), prepared.collator)


def prepare(spec: TrainingSpec, env: RuntimeEnv, processor: Any, model_config: Any) -> PreparedData:
    """Read, check, split, limit and encode the data."""
    ds = spec.dataset
    task = spec.model.task
    if task != "image-classification":
        spec = fit_max_seq_length(spec, processor, model_config)
    train_raw = read_split(spec, env, ds.train, "dataset.train")
    check_columns(spec, train_raw)
    val_raw = read_split(spec, env, ds.validation, "dataset.validation") if ds.validation else None
    if val_raw is not None:
        check_columns(spec, val_raw)
    classify = task != "causal-lm"
    train = _with_labels(spec, train_raw) if classify else train_raw.rows
    validation = None
    if val_raw is not None:
        validation = _with_labels(spec, val_raw) if classify else val_raw.rows
    elif ds.validation_fraction is not None:
        train, validation = _split_validation(train, ds.validation_fraction, spec.hyperparameters.seed, classify)
    train = _limit(train, ds.max_train_samples, spec.hyperparameters.seed, shuffle=True)
    if validation is not None:
        validation = _limit(validation, ds.max_eval_samples, spec.hyperparameters.seed, shuffle=False)
    if task == "image-classification":
        train = attach_images(spec, train, train_raw.base, image_pipeline(processor, spec.augmentation))
        if validation is not None:
            base = val_raw.base if val_raw is not None else train_raw.base
            validation = attach_images(spec, validation, base, image_pipeline(processor, None))
        return PreparedData(train, validation, image_collator)
    root = local_path(spec.output.location, env.pvc_root)
    cached: list[str] = []
    encoded: dict[str, Dataset] = {}
    for name, rows in (("train", train), ("validation", validation)):
        if rows is not None:
            encoded[name], hit = cached_encode(
                root, spec, rows, processor, partial(tokenize_text, spec, rows, processor)
            )
            cached += [name] if hit else []
    train, validation = encoded["train"], encoded.get("validation")
    if len(train) == 0:
        raise DataError("dataset.train: no training examples left after encoding")
    if task == "causal-lm" and ds.packing:
        return PreparedData(train, validation, PackingCollator())
    if task == "causal-lm":
        return PreparedData(train, validation, CausalLMCollator(int(processor.pad_token_id)), tuple(cached))
    return PreparedData(train, validation, DataCollatorWithPadding(processor), tuple(cached))
