"""Linear semantic segmentation with a frozen backbone, and the segmentation evaluation shared with fine-tuning.

The authors evaluate with mmsegmentation (PROTOCOLS.md, "Linear segmentation"): all blocks frozen, a 1x1
classifier on the last block's patch tokens (optionally the last n blocks concatenated), trained with
cross-entropy on logits bilinearly upsampled to the crop, Adam (lr 0.01, weight decay 0.01), polynomial decay
(power 0.9, floor lr / 10); evaluation by sliding 512 windows (stride 480) on images resized to a 512 short
side. Since the backbone is frozen, the training images' features are extracted once (optionally over several
augmented passes, optionally cached on disk) and the classifier is trained on them.

Axis letters: B images, h/w patch grid, D feature dim, C classes, H/W pixels, S input (crop) size.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn
from tqdm.auto import tqdm

from cribo.data.segmentation import (
    IGNORE_INDEX,
    SegmentationSet,
    dataset_fingerprint,
    item_generator,
    random_scale_crop_flip_pair,
    resize_pair,
    to_tensors,
)
from cribo.eval.features import (
    FeatureCache,
    FeatureFn,
    IdentityTransform,
    ItemTransform,
    ResizeTransform,
    extract_features,
    transformed_batches,
)
from cribo.eval.metrics import confusion_matrix

logger = logging.getLogger(__name__)

# Published protocol values (PROTOCOLS.md, "Linear segmentation (frozen backbone)"; the authors' mmseg configs).
PROTOCOL_CROP_SIZE = 512  # training crops and sliding windows
PROTOCOL_SLIDE_STRIDE = 480  # sliding-window stride at 512 px windows
PROTOCOL_LR = 0.01  # Adam
PROTOCOL_WEIGHT_DECAY = 0.01
PROTOCOL_POLY_POWER = 0.9
PROTOCOL_MIN_LR_RATIO = 0.1  # polynomial decay floor = lr / 10
PROTOCOL_SCALE_RANGE = (0.5, 2.0)  # random rescale ratio before the crop
PROTOCOL_BATCH_SIZE = 32  # 4 per GPU x 8 GPUs
PROTOCOL_MAX_LONG_SIDE_RATIO = 4  # test resize to 2048 x 512 keeping the aspect ratio: long side <= 4 x short

EvalMode = Literal["resize", "slide"]
LogitsFn = Callable[[Tensor], Tensor]  # images (B, 3, S, S) in [0, 1] -> logits (B, C, h, w) at any resolution


class LinearHead(nn.Module):
    """1x1 classifier on patch features, optionally after a BatchNorm (still linear at test time).

    Args:
        in_dim: D.
        num_classes: C.
        batch_norm: standardise the features first (mmseg's linear heads normalise their input).
    """

    def __init__(self, in_dim: int, num_classes: int, batch_norm: bool = True) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(in_dim) if batch_norm else nn.Identity()
        self.classifier = nn.Conv2d(in_dim, num_classes, kernel_size=1)

    def forward(self, features: Tensor) -> Tensor:
        """(B, h, w, D) -> logits (B, C, h, w)."""
        # contiguous: BatchNorm on the permuted (channels-last) view is ~1000x slower on multi-threaded CPU
        return self.classifier(self.norm(features.permute(0, 3, 1, 2).contiguous()))


def segmentation_loss(logits: Tensor, masks: Tensor) -> Tensor:
    """Cross-entropy of logits bilinearly upsampled to the masks, 255 ignored.

    Args:
        logits: (B, C, h, w).
        masks: (B, H, W) int64.

    Returns:
        () mean over non-ignored pixels (0 when every pixel is ignored).
    """
    upsampled = F.interpolate(logits, size=masks.shape[-2:], mode="bilinear", align_corners=False)
    losses = F.cross_entropy(upsampled, masks, ignore_index=IGNORE_INDEX, reduction="sum")
    return losses / (masks != IGNORE_INDEX).sum().clamp_min(1)


def poly_lr_factor(step: int, total_steps: int, power: float, min_ratio: float) -> float:
    """Polynomial decay factor of the base lr at ``step``: (1 - min) (1 - step/total)^power + min."""
    progress = min(step, total_steps) / max(total_steps, 1)
    return (1.0 - min_ratio) * (1.0 - progress) ** power + min_ratio


@dataclass(frozen=True)
class SegTrainAugmentation:
    """mmseg-style training augmentation seeded per (seed, pass, image): rescale, random crop, flip."""

    size: int
    scale_range: tuple[float, float]
    seed: int
    pass_index: int

    def __call__(self, index: int, image: Image.Image, mask: np.ndarray) -> tuple[Tensor, Tensor]:
        generator = item_generator(self.seed, self.pass_index, index)
        pixels, labels = to_tensors(image, mask)
        return random_scale_crop_flip_pair(pixels, labels, self.size, self.scale_range, generator)


def window_starts(length: int, window: int, stride: int) -> list[int]:
    """Start offsets of sliding windows covering ``length`` (the last window is flush with the end)."""
    if length <= window:
        return [0]
    starts = list(range(0, length - window, stride))
    return [*starts, length - window]


@torch.no_grad()
def slide_logits(logits_fn: LogitsFn, image: Tensor, window: int, stride: int, num_classes: int) -> Tensor:
    """Average the logits of ``window`` x ``window`` crops taken every ``stride`` pixels.

    Args:
        logits_fn: crops (B, 3, S, S) -> logits (B, C, h, w).
        image: (3, H, W) with H, W >= 1 (padded with zeros to at least ``window``).
        window: S.
        stride: step between windows.
        num_classes: C.

    Returns:
        (C, H, W) averaged logits.
    """
    height, width = image.shape[-2:]
    padded = F.pad(image, (0, max(0, window - width), 0, max(0, window - height)))
    boxes = [
        (top, left)
        for top in window_starts(padded.shape[-2], window, stride)
        for left in window_starts(padded.shape[-1], window, stride)
    ]
    crops = torch.stack([padded[:, top : top + window, left : left + window] for top, left in boxes])
    logits = F.interpolate(logits_fn(crops).float(), size=(window, window), mode="bilinear", align_corners=False)
    total = logits.new_zeros(num_classes, *padded.shape[-2:])
    count = logits.new_zeros(1, *padded.shape[-2:])
    for (top, left), crop_logits in zip(boxes, logits):
        total[:, top : top + window, left : left + window] += crop_logits
        count[:, top : top + window, left : left + window] += 1
    return (total / count)[:, :height, :width]


@torch.no_grad()
def predict_image(
    logits_fn: LogitsFn, image: Tensor, size: int, mode: EvalMode, stride: int, num_classes: int
) -> Tensor:
    """Prediction (H, W) int64 for one image (3, H, W) at its own resolution.

    ``resize``: the image is resized to ``size`` x ``size``; ``slide``: resized so its short side is ``size``
    (long side at most 4 x ``size``, keeping the aspect ratio), then ``slide_logits``. Logits are upsampled
    bilinearly to (H, W) before the argmax.
    """
    height, width = image.shape[-2:]
    if mode == "resize":
        logits = logits_fn(resize_pair(image, image.new_zeros(height, width).long(), (size, size))[0][None])[0]
    elif mode == "slide":
        scale = min(size / min(height, width), PROTOCOL_MAX_LONG_SIDE_RATIO * size / max(height, width))
        scaled = (max(1, round(height * scale)), max(1, round(width * scale)))
        resized = resize_pair(image, image.new_zeros(height, width).long(), scaled)[0]
        logits = slide_logits(logits_fn, resized, size, stride, num_classes)
    else:
        raise ValueError(f"eval_mode={mode!r}; valid: resize, slide")
    upsampled = F.interpolate(logits[None].float(), size=(height, width), mode="bilinear", align_corners=False)
    return upsampled[0].argmax(0)


@dataclass(frozen=True)
class SegEvalSettings:
    """How validation images are segmented."""

    input_size: int
    mode: EvalMode = "resize"
    stride: int | None = None  # slide mode; default input_size * 15 / 16 (480 for 512)
    batch_size: int = 16
    num_workers: int = 0
    progress: bool = True

    @property
    def window_stride(self) -> int:
        return self.stride or max(1, self.input_size * PROTOCOL_SLIDE_STRIDE // PROTOCOL_CROP_SIZE)


@torch.no_grad()
def evaluate_segmenter(
    logits_fn: LogitsFn, dataset: SegmentationSet, settings: SegEvalSettings, device: torch.device
) -> Tensor:
    """The (C, C) confusion matrix of ``logits_fn`` over every image of ``dataset`` (original resolution)."""
    num_classes = dataset.num_classes

    def on_device(images: Tensor) -> Tensor:
        return logits_fn(images.to(device)).float().cpu()

    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    description = f"evaluate ({settings.mode})" if settings.progress else None
    for images, masks in transformed_batches(
        dataset, range(len(dataset)), IdentityTransform(), settings.batch_size, settings.num_workers, False, description
    ):
        for image, mask in zip(images, masks):
            prediction = predict_image(
                on_device, image, settings.input_size, settings.mode, settings.window_stride, num_classes
            )
            confusion += confusion_matrix(prediction, mask, num_classes, IGNORE_INDEX)
    return confusion


@dataclass(frozen=True)
class LinearConfig:
    """Training of the linear classifier on frozen features."""

    input_size: int = PROTOCOL_CROP_SIZE
    steps: int = 500
    batch_size: int = 16  # images per classifier step
    lr: float = PROTOCOL_LR
    weight_decay: float = PROTOCOL_WEIGHT_DECAY
    poly_power: float = PROTOCOL_POLY_POWER
    min_lr_ratio: float = PROTOCOL_MIN_LR_RATIO
    mode: Literal["deterministic", "augmented"] = "deterministic"  # features of resized images, or augmented crops
    passes: int = 1  # augmented passes over the training set (features extracted once per pass)
    scale_range: tuple[float, float] = PROTOCOL_SCALE_RANGE
    batch_norm: bool = True
    extract_batch_size: int = 16
    num_workers: int = 0
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("input_size", "steps", "batch_size", "passes", "extract_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.mode not in ("deterministic", "augmented"):
            raise ValueError(f"mode={self.mode!r}; valid: deterministic, augmented")


def training_transforms(config: LinearConfig) -> list[ItemTransform]:
    """One transform per pass: a plain resize in deterministic mode, else seeded rescale/crop/flip."""
    if config.mode == "deterministic":
        return [ResizeTransform(config.input_size)]
    return [SegTrainAugmentation(config.input_size, config.scale_range, config.seed, p) for p in range(config.passes)]


def extract_training_set(
    feature_fn: FeatureFn, dataset: SegmentationSet, config: LinearConfig, device: torch.device
) -> dict[str, Tensor]:
    """Frozen features of every training image and pass: {"features": (B, h, w, D) float16, "masks": (B, S, S)
    uint8} on CPU (float16 halves the memory; the classifier trains in float32)."""
    features, masks = [], []
    transforms = training_transforms(config)
    for pass_index, transform in enumerate(transforms):
        description = f"train features {pass_index + 1}/{len(transforms)}" if config.progress else None
        for images, labels in transformed_batches(
            dataset,
            range(len(dataset)),
            transform,
            config.extract_batch_size,
            config.num_workers,
            description=description,
        ):
            features.append(extract_features(feature_fn, images, device).half().cpu())
            masks.append(labels.to(torch.uint8))
    return {"features": torch.cat(features), "masks": torch.cat(masks)}


def train_linear_head(
    features: Tensor, masks: Tensor, num_classes: int, config: LinearConfig, device: torch.device
) -> tuple[LinearHead, list[float]]:
    """Train ``LinearHead`` with Adam + polynomial decay on precomputed features.

    Args:
        features: (B, h, w, D) frozen patch features (any float dtype, CPU).
        masks: (B, S, S) labels (255 ignored).
        num_classes: C.
        config: optimisation settings (``steps`` minibatches of ``batch_size`` images).
        device: where the classifier trains.

    Returns:
        The trained head (eval mode) and the loss of every step.
    """
    head = LinearHead(features.shape[-1], num_classes, config.batch_norm)
    _init_head(head, config.seed)
    head = head.to(device).train()
    optimizer = torch.optim.Adam(head.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    generator = torch.Generator().manual_seed(config.seed)
    losses = []
    steps = tqdm(range(config.steps), desc="linear head", disable=not config.progress, leave=False)
    for step in steps:
        for group in optimizer.param_groups:
            group["lr"] = config.lr * poly_lr_factor(step, config.steps, config.poly_power, config.min_lr_ratio)
        batch = torch.randint(0, features.shape[0], (min(config.batch_size, features.shape[0]),), generator=generator)
        logits = head(features[batch].to(device).float())
        loss = segmentation_loss(logits, masks[batch].to(device).long())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    return head.eval(), losses


def _init_head(head: LinearHead, seed: int) -> None:
    """Seeded initialisation (normal std 0.01, zero bias) that leaves the global RNG alone."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        weight = head.classifier.weight
        weight.copy_(torch.randn(weight.shape, generator=generator) * 0.01)
        if head.classifier.bias is not None:
            head.classifier.bias.zero_()


@dataclass
class LinearResult:
    """A trained probe and its validation confusion matrix."""

    head: LinearHead
    confusion: Tensor
    losses: list[float]
    num_train_samples: int
    seconds: dict[str, float]


def evaluate_linear(
    feature_fn: FeatureFn,
    train_set: SegmentationSet,
    val_set: SegmentationSet,
    config: LinearConfig,
    eval_settings: SegEvalSettings,
    device: torch.device | None = None,
    cache: FeatureCache | None = None,
    backbone_id: str | None = None,
) -> LinearResult:
    """Extract (or load) frozen training features, train the linear classifier, evaluate on ``val_set``.

    Args:
        feature_fn: images (B, 3, H, W) in [0, 1] -> (B, h, w, D); must not require gradients.
        train_set, val_set: same label space.
        config: classifier training settings.
        eval_settings: validation segmentation settings.
        device: default CPU.
        cache, backbone_id: cache training features under the backbone's identity (both needed).
    """
    if train_set.num_classes != val_set.num_classes:
        raise ValueError(f"train ({train_set.num_classes}) and val ({val_set.num_classes}) class counts differ")
    device = device or torch.device("cpu")
    started = time.perf_counter()
    parts = None
    if cache is not None and backbone_id is not None:
        parts = {
            "kind": "linear-train",
            "backbone": backbone_id,
            "dataset": dataset_fingerprint(train_set),
            "input_size": config.input_size,
            "mode": config.mode,
            "passes": config.passes,
            "scale_range": config.scale_range,
            "seed": config.seed,
        }
    tensors = (cache or FeatureCache(None)).get_or_compute(
        parts, lambda: extract_training_set(feature_fn, train_set, config, device)
    )
    extract_seconds = time.perf_counter() - started
    head, losses = train_linear_head(tensors["features"], tensors["masks"], train_set.num_classes, config, device)
    train_seconds = time.perf_counter() - started - extract_seconds

    def logits_fn(images: Tensor) -> Tensor:
        return head(extract_features(feature_fn, images, device))

    confusion = evaluate_segmenter(logits_fn, val_set, eval_settings, device)
    seconds = {
        "features": extract_seconds,
        "train": train_seconds,
        "evaluate": time.perf_counter() - started - extract_seconds - train_seconds,
    }
    if not all(math.isfinite(value) for value in losses):
        logger.warning("linear head: non-finite training loss")
    return LinearResult(head, confusion, losses, int(tensors["features"].shape[0]), seconds)
