"""Helpers for the evaluation tests: a tiny in-memory segmentation set whose classes are told apart by colour,
a one-hot "oracle" feature function, and a tiny timm ViT."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from PIL import Image
from timm.models import VisionTransformer
from torch import Tensor

PALETTE = np.array([[0, 0, 0], [230, 30, 30], [30, 200, 40], [40, 60, 220], [240, 220, 30]], dtype=np.uint8)


class StripeScenes:
    """Images of patch-aligned stripes (vertical or horizontal), one class per stripe, coloured by class.

    Each stripe is ``patch`` pixels wide so that every patch holds one class; optional 1-pixel 255 lines in the
    mask at stripe boundaries mimic VOC's borders (the image keeps the class colour there).
    """

    def __init__(
        self,
        num_images: int,
        size: int = 32,
        patch: int = 8,
        num_classes: int = 4,
        seed: int = 0,
        borders: bool = False,
        width: int | None = None,
    ) -> None:
        rng = np.random.default_rng(seed)
        width = width or size
        self.num_classes = num_classes
        self.class_names = tuple(f"c{i}" for i in range(num_classes))
        self.ignore_index = 255
        self.background_index = 0
        self.fingerprint = f"stripes:{num_images}:{size}:{width}:{patch}:{num_classes}:{seed}:{borders}"
        self.items: list[tuple[np.ndarray, np.ndarray]] = []
        for _ in range(num_images):
            if rng.random() < 0.5:  # vertical stripes: one class per patch column
                line = np.repeat(rng.integers(0, num_classes, width // patch), patch)
                mask = np.tile(line, (size, 1)).astype(np.uint8)
            else:  # horizontal stripes
                line = np.repeat(rng.integers(0, num_classes, size // patch), patch)
                mask = np.tile(line[:, None], (1, width)).astype(np.uint8)
            image = PALETTE[mask]
            if borders:
                edges = np.zeros_like(mask, dtype=bool)
                edges[:, 1:] |= mask[:, 1:] != mask[:, :-1]
                edges[1:, :] |= mask[1:, :] != mask[:-1, :]
                mask = mask.copy()
                mask[edges] = 255
            self.items.append((image, mask))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[Image.Image, np.ndarray]:
        image, mask = self.items[index]
        return Image.fromarray(image), mask


def onehot_feature_fn(patch: int, num_classes: int) -> Callable[[Tensor], Tensor]:
    """Features = one-hot label of each patch, read from its mean colour (nearest palette entry)."""
    palette = torch.tensor(PALETTE[:num_classes], dtype=torch.float32) / 255.0

    def features(images: Tensor) -> Tensor:
        pooled = torch.nn.functional.avg_pool2d(images, patch).permute(0, 2, 3, 1)  # (B, h, w, 3)
        distances = ((pooled[..., None, :] - palette.to(images.device)) ** 2).sum(-1)
        return torch.nn.functional.one_hot(distances.argmin(-1), num_classes).float()

    return features


def tiny_vit(img_size: int = 32, patch: int = 8, seed: int = 0) -> VisionTransformer:
    """A 2-block, 32-dim timm ViT with random weights."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = VisionTransformer(
            img_size=img_size,
            patch_size=patch,
            embed_dim=32,
            depth=2,
            num_heads=2,
            num_classes=0,
            dynamic_img_size=True,
        )
    return model.eval()


def forward_features(model: torch.nn.Module, images: Tensor) -> Tensor:
    """timm's own tokens path (tests that do not need the authors' position interpolation)."""
    return model.forward_features(images)  # type: ignore[operator]
