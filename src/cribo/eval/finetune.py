"""Semantic-segmentation fine-tuning: the backbone trains too (its first blocks optionally frozen), under a
linear or a small Segmenter-style mask-transformer decoder (PROTOCOLS.md: the authors fine-tune with
mmsegmentation, fewer frozen blocks and a 2-layer mask transformer).

Axis letters: B images, h/w patch grid, N = h*w patches, D feature dim, E decoder width, C classes.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from cribo import models
from cribo.data.segmentation import SegmentationSet
from cribo.eval.linear_seg import (
    PROTOCOL_MIN_LR_RATIO,
    PROTOCOL_POLY_POWER,
    PROTOCOL_SCALE_RANGE,
    LinearHead,
    SegEvalSettings,
    SegTrainAugmentation,
    evaluate_segmenter,
    poly_lr_factor,
    segmentation_loss,
)

logger = logging.getLogger(__name__)

DecoderName = Literal["linear", "mask_transformer"]
SEGMENTER_LAYERS = 2  # Segmenter mask transformer depth used by the authors' fine-tuning config (PROTOCOLS.md)
HEAD_WIDTH = 64  # channels per attention head in the decoder (Segmenter uses 64)


class MaskTransformerDecoder(nn.Module):
    """Segmenter's mask transformer: learnable class embeddings attend jointly with the patch tokens; masks
    are the scalar products of L2-normalised patch and class embeddings, then a LayerNorm over classes.

    Args:
        in_dim: D.
        num_classes: C.
        dim: E, the decoder width.
        num_layers: transformer layers.
    """

    def __init__(self, in_dim: int, num_classes: int, dim: int = 192, num_layers: int = SEGMENTER_LAYERS) -> None:
        super().__init__()
        if dim < 1 or num_layers < 1:
            raise ValueError(f"decoder dim={dim} and num_layers={num_layers} must be >= 1")
        heads = max(1, dim // HEAD_WIDTH)
        if dim % heads:
            raise ValueError(f"decoder dim={dim} must be a multiple of {heads} heads")
        self.num_classes = num_classes
        self.project_in = nn.Linear(in_dim, dim)
        self.class_embeddings = nn.Parameter(torch.randn(1, num_classes, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(
            dim, heads, dim_feedforward=4 * dim, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
        )
        self.blocks = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.project_patches = nn.Linear(dim, dim, bias=False)
        self.project_classes = nn.Linear(dim, dim, bias=False)
        self.mask_norm = nn.LayerNorm(num_classes)

    def forward(self, features: Tensor) -> Tensor:
        """(B, h, w, D) patch features -> (B, C, h, w) mask logits."""
        batch, rows, cols, _ = features.shape
        patches = self.project_in(features.flatten(1, 2))  # (B, N, E)
        tokens = torch.cat([patches, self.class_embeddings.expand(batch, -1, -1)], dim=1)
        tokens = self.norm(self.blocks(tokens))
        patch_tokens = F.normalize(self.project_patches(tokens[:, : rows * cols]), dim=-1)
        class_tokens = F.normalize(self.project_classes(tokens[:, rows * cols :]), dim=-1)
        masks = self.mask_norm(patch_tokens @ class_tokens.transpose(1, 2))  # (B, N, C)
        return masks.transpose(1, 2).reshape(batch, self.num_classes, rows, cols)


def build_decoder(name: DecoderName, in_dim: int, num_classes: int, dim: int, num_layers: int) -> nn.Module:
    """``linear`` (BatchNorm + 1x1 classifier) or ``mask_transformer`` (Segmenter)."""
    if name == "linear":
        return LinearHead(in_dim, num_classes, batch_norm=True)
    if name == "mask_transformer":
        return MaskTransformerDecoder(in_dim, num_classes, dim, num_layers)
    raise ValueError(f"decoder={name!r}; valid: linear, mask_transformer")


class SegmentationModel(nn.Module):
    """Encoder (images in [0, 1] -> (B, h, w, D) patch features, e.g. ``PatchFeatures``) + decoder."""

    def __init__(self, encoder: nn.Module, decoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder

    def forward(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) in [0, 1] -> logits (B, C, h, w)."""
        return self.decoder(self.encoder(images))


def freeze_blocks(encoder: nn.Module, frozen_blocks: int) -> int:
    """:func:`cribo.models.freeze_blocks` on ``encoder.backbone`` (a timm ViT); the rest of the encoder trains.

    Returns:
        The number of parameters left trainable in the encoder.
    """
    backbone: Any = getattr(encoder, "backbone", None)
    if frozen_blocks and backbone is None:
        raise ValueError("frozen_blocks > 0 needs an encoder with a ViT `backbone` (blocks)")
    encoder.requires_grad_(True)
    if backbone is not None and hasattr(backbone, "blocks"):
        models.freeze_blocks(backbone, frozen_blocks)
    elif frozen_blocks < 0:
        raise ValueError(f"frozen_blocks={frozen_blocks} must lie in 0..0")
    return sum(parameter.numel() for parameter in encoder.parameters() if parameter.requires_grad)


@dataclass(frozen=True)
class FinetuneConfig:
    """Fine-tuning settings."""

    input_size: int
    steps: int = 50
    batch_size: int = 8
    lr: float = 1e-4  # backbone AdamW learning rate
    decoder_lr: float = 1e-3
    weight_decay: float = 0.01
    poly_power: float = PROTOCOL_POLY_POWER
    min_lr_ratio: float = PROTOCOL_MIN_LR_RATIO
    frozen_blocks: int = 0
    decoder: DecoderName = "linear"
    decoder_dim: int = 192
    decoder_layers: int = SEGMENTER_LAYERS
    scale_range: tuple[float, float] = PROTOCOL_SCALE_RANGE
    num_workers: int = 0
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("input_size", "steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.decoder not in ("linear", "mask_transformer"):
            raise ValueError(f"decoder={self.decoder!r}; valid: linear, mask_transformer")


class _AugmentedStream(Dataset):
    """``steps x batch`` training samples: epoch-wise permutations of the dataset, each sample augmented with
    a seed of its own (seed, position)."""

    def __init__(self, dataset: SegmentationSet, length: int, size: int, scale_range: tuple[float, float], seed: int):
        generator = torch.Generator().manual_seed(seed)
        epochs = -(-length // len(dataset))
        self.order = torch.cat([torch.randperm(len(dataset), generator=generator) for _ in range(epochs)])[:length]
        self.dataset = dataset
        self.transform = SegTrainAugmentation(size, scale_range, seed, pass_index=0)

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, position: int) -> tuple[Tensor, Tensor]:
        image, mask = self.dataset[int(self.order[position])]
        return self.transform(position, image, mask)


def _optimizer(model: SegmentationModel, config: FinetuneConfig) -> torch.optim.Optimizer:
    groups = [
        {"params": [p for p in model.encoder.parameters() if p.requires_grad], "lr": config.lr, "base_lr": config.lr},
        {"params": list(model.decoder.parameters()), "lr": config.decoder_lr, "base_lr": config.decoder_lr},
    ]
    return torch.optim.AdamW([group for group in groups if group["params"]], weight_decay=config.weight_decay)


def train_segmentation_model(
    model: SegmentationModel, train_set: SegmentationSet, config: FinetuneConfig, device: torch.device
) -> list[float]:
    """AdamW (backbone ``lr``, decoder ``decoder_lr``) with polynomial decay for ``config.steps`` steps.

    Returns:
        The loss of every step.
    """
    stream = _AugmentedStream(
        train_set, config.steps * config.batch_size, config.input_size, config.scale_range, config.seed
    )
    loader = DataLoader(stream, batch_size=config.batch_size, num_workers=config.num_workers)
    optimizer = _optimizer(model, config)
    model.to(device).train()
    losses = []
    progress = tqdm(loader, desc="fine-tune", total=config.steps, disable=not config.progress, leave=False)
    for step, (images, masks) in enumerate(progress):
        factor = poly_lr_factor(step, config.steps, config.poly_power, config.min_lr_ratio)
        for group in optimizer.param_groups:
            group["lr"] = group["base_lr"] * factor
        loss = segmentation_loss(model(images.to(device)), masks.to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    return losses


@dataclass
class FinetuneResult:
    """A fine-tuned model and its validation confusion matrix."""

    model: SegmentationModel
    confusion: Tensor
    losses: list[float]
    trainable_parameters: int
    seconds: dict[str, float]


def evaluate_finetune(
    encoder: nn.Module,
    encoder_dim: int,
    train_set: SegmentationSet,
    val_set: SegmentationSet,
    config: FinetuneConfig,
    eval_settings: SegEvalSettings,
    device: torch.device | None = None,
) -> FinetuneResult:
    """Fine-tune ``encoder`` with a fresh decoder on ``train_set`` and evaluate on ``val_set``.

    Args:
        encoder: images (B, 3, H, W) in [0, 1] -> (B, h, w, D) features; trained in place.
        encoder_dim: D.
        train_set, val_set: same label space.
        config: training settings.
        eval_settings: validation segmentation settings.
        device: default CPU.
    """
    if train_set.num_classes != val_set.num_classes:
        raise ValueError(f"train ({train_set.num_classes}) and val ({val_set.num_classes}) class counts differ")
    device = device or torch.device("cpu")
    trainable = freeze_blocks(encoder, config.frozen_blocks)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)  # decoder initialisation, reproducible without touching the caller's RNG
        decoder = build_decoder(
            config.decoder, encoder_dim, train_set.num_classes, config.decoder_dim, config.decoder_layers
        )
    model = SegmentationModel(encoder, decoder)
    started = time.perf_counter()
    losses = train_segmentation_model(model, train_set, config, device)
    train_seconds = time.perf_counter() - started
    model.eval()
    confusion = evaluate_segmenter(model, val_set, eval_settings, device)
    seconds = {"train": train_seconds, "evaluate": time.perf_counter() - started - train_seconds}
    return FinetuneResult(model, confusion, losses, trainable, seconds)
