"""Image data: paths decoded lazily while training, training-only augmentation, then the model's processor."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from PIL import Image
from torchvision.transforms import v2 as transforms

from finetune_trainer.errors import DataError
from finetune_trainer.spec import Augmentation, TrainingSpec


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
    """Images load lazily (``set_transform``); the reader has checked that every path exists, so a typo fails fast."""
    column = spec.dataset.fields.image
    root = base or Path()
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
