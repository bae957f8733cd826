"""Inputs of the pictures: image files or built-in scenes, the backbone named by the options, a run's log, the
segmentation sets of ``cribo viz segmentation``.

Axis letters: B images, H/W image height/width.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor

from cribo.options import BackboneOptions, backbone_from_options
from cribo.runtime import resolve_device

if TYPE_CHECKING:
    from timm.models.vision_transformer import VisionTransformer

    from cribo.data.segmentation import SegmentationSet
    from cribo.viz.options import SegmentationOptions


# ----------------------------------------------------------------------------------------------------------------
# Images


def resize_square(image: Image.Image, size: int) -> Image.Image:
    """Centre-crop to a square and resize to ``size`` x ``size`` (bicubic)."""
    return ImageOps.fit(image.convert("RGB"), (size, size), Image.Resampling.BICUBIC)


def pil_to_pixels(images: Sequence[Image.Image], size: int) -> Tensor:
    """PIL images -> (B, 3, size, size) float32 in [0, 1] (bicubic resize when needed)."""
    arrays = [np.asarray(resize_square(image, size), dtype=np.float32) / 255.0 for image in images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def resize_masks(masks: Sequence[np.ndarray], size: int) -> Tensor:
    """(H, W) uint8 label masks -> (B, size, size) int64 (nearest)."""
    resized = [np.asarray(Image.fromarray(mask).resize((size, size), Image.Resampling.NEAREST)) for mask in masks]
    return torch.from_numpy(np.stack(resized).astype(np.int64))


@dataclass
class SourceImages:
    """Input images (RGB, ``image_size`` square) with names and, for the scenes, masks and class names."""

    images: list[Image.Image]
    names: list[str]
    masks: list[np.ndarray] | None = None
    class_names: Sequence[str] = ()


def load_images(files: Sequence[str] | None, num_images: int, image_size: int, seed: int) -> SourceImages:
    """``files`` (centre-cropped to squares) or the first ``num_images`` built-in validation scenes."""
    from cribo.data.folder import load_rgb
    from cribo.data.scenes import SyntheticScenes

    if image_size < 16:
        raise ValueError(f"--image-size must be at least 16 pixels, got {image_size}")
    if files:
        images = []
        for file in files:
            try:
                images.append(resize_square(load_rgb(file), image_size))
            except OSError as err:
                raise ValueError(f"--images {file}: cannot read the image ({err})") from err
        return SourceImages(images, [Path(file).name for file in files])
    if num_images < 1:
        raise ValueError(f"--num-images must be at least 1, got {num_images}")
    scenes = SyntheticScenes("val", num_images, image_size, seed)
    items = [scenes[index] for index in range(num_images)]
    names = [f"scene {index}" for index in range(num_images)]
    return SourceImages([image for image, _ in items], names, [mask for _, mask in items], scenes.class_names)


# ----------------------------------------------------------------------------------------------------------------
# Backbone and training log


def load_model(options: BackboneOptions) -> tuple[VisionTransformer, str, torch.device]:
    """The backbone named by ``--backbone`` on ``--device`` in eval mode, and a label for figure titles."""
    backbone, info = backbone_from_options(options)
    device = resolve_device(options.device)
    network = "" if info.which is None else f", {info.which}"
    shown = "/".join(Path(options.backbone).parts[-2:])  # run folder and file name of a checkpoint
    label = f"{shown} ({info.arch}/{info.patch_size}{network})"
    return backbone.to(device).eval(), label, device


def load_history(run_dir: Path) -> list[dict[str, float]]:
    """Read log.txt (JSON lines) of a run directory."""
    log = Path(run_dir) / "log.txt"
    if not log.is_file():
        raise ValueError(f"{log} not found: pass a run directory written by `cribo train`")
    rows = []
    for number, line in enumerate(log.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise ValueError(f"{log}, line {number}: not a JSON log line ({err.msg}); fix or remove that line") from err
    return rows


# ----------------------------------------------------------------------------------------------------------------
# Segmentation sets


class _UnlabelledImages:
    """User images as a segmentation set whose masks are all ignored (255): predictions only."""

    def __init__(self, images: Sequence[Image.Image], class_names: Sequence[str]) -> None:
        self.images, self.class_names, self.num_classes = list(images), tuple(class_names), len(class_names)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Image.Image, np.ndarray]:
        image = self.images[index]
        return image, np.full((image.height, image.width), 255, dtype=np.uint8)


class _FirstItems:
    """The first ``count`` items of a segmentation set (same classes and background index)."""

    def __init__(self, dataset: SegmentationSet, count: int) -> None:
        self.dataset, self.count = dataset, min(count, len(dataset))
        self.num_classes, self.class_names = dataset.num_classes, dataset.class_names
        self.background_index = getattr(dataset, "background_index", None)

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> tuple[Image.Image, np.ndarray]:
        return self.dataset[index]


def segmentation_sets(options: SegmentationOptions) -> tuple[SegmentationSet, SegmentationSet, list[str]]:
    """Bank (training) set, query set and the query names, from ``--dataset``/``--data-root`` or ``--images``."""
    from cribo.eval.options import EvalOptions
    from cribo.eval.runner import build_datasets

    data = EvalOptions(
        dataset=options.dataset,
        data_root=options.data_root,
        scenes_train_images=options.train_images,
        scenes_val_images=options.num_images,
        scenes_image_size=options.image_size,
        scenes_seed=options.seed,
    )
    train_set, val_set = build_datasets(data)
    if options.train_images < 1:
        raise ValueError(f"--train-images must be at least 1, got {options.train_images}")
    bank_set: SegmentationSet = _FirstItems(train_set, options.train_images)
    if options.images:
        source = load_images(options.images, len(options.images), options.image_size, options.seed)
        return bank_set, _UnlabelledImages(source.images, train_set.class_names), source.names
    if options.num_images < 1:
        raise ValueError(f"--num-images must be at least 1, got {options.num_images}")
    queries = _FirstItems(val_set, options.num_images)
    prefix = "scene" if options.dataset == "scenes" else "val image"
    return bank_set, queries, [f"{prefix} {index}" for index in range(len(queries))]
