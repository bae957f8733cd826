"""Patch features of a backbone for the dense evaluations, batched dataset iteration, and an on-disk cache.

Axis letters: B images, L layers, D feature dim (per layer), H/W pixels, h/w patch grid.

The evaluation cores take a ``FeatureFn``: images (B, 3, H, W) with values in [0, 1] -> patch features
(B, h, w, D'). ``PatchFeatures`` builds one from a ViT (pixel normalisation, last-n-layer concatenation);
tests plug in fakes (e.g. one-hot labels of the patch).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from cribo.data.segmentation import SegmentationSet, resize_pair, to_tensors

logger = logging.getLogger(__name__)

FeatureFn = Callable[[Tensor], Tensor]  # images (B, 3, H, W) in [0, 1] -> patch features (B, h, w, D)
TokensFn = Callable[[Any, Tensor], Tensor]  # (backbone, normalised images) -> tokens (B, prefix + h*w, D)
ItemTransform = Callable[[int, Image.Image, np.ndarray], tuple[Tensor, Tensor]]  # (index, image, mask) -> tensors
PixelNorm = Literal["imagenet", "half"]

# ImageNet statistics, used in pretraining (reference/README.md, augmentation table) and by open-hummingbird-eval.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# mmsegmentation's mean = std = 127.5 (pixels to [-1, 1]) in the authors' linear/fine-tuning configs (PROTOCOLS.md).
HALF_MEAN = (0.5, 0.5, 0.5)
HALF_STD = (0.5, 0.5, 0.5)
PIXEL_STATS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "imagenet": (IMAGENET_MEAN, IMAGENET_STD),
    "half": (HALF_MEAN, HALF_STD),
}


def normalize_pixels(images: Tensor, pixel_norm: PixelNorm) -> Tensor:
    """(B, 3, H, W) in [0, 1] -> normalised with the ``pixel_norm`` statistics ("imagenet" or "half")."""
    if pixel_norm not in PIXEL_STATS:
        raise ValueError(f"pixel_norm={pixel_norm!r}; valid: {sorted(PIXEL_STATS)}")
    mean, std = (images.new_tensor(values).view(1, 3, 1, 1) for values in PIXEL_STATS[pixel_norm])
    return (images - mean) / std


def default_tokens_fn() -> TokensFn:
    """``cribo.models.backbone_tokens`` (the authors' position-embedding interpolation), imported on use."""
    from cribo.models import backbone_tokens

    return backbone_tokens


class PatchFeatures(nn.Module):
    """A ViT as a ``FeatureFn``: normalise pixels, run the backbone, return the patch tokens on their grid.

    With ``num_layers`` = n > 1 the outputs of the last n blocks are captured by forward hooks, each passed
    through the backbone's final norm (as DINO's ``get_intermediate_layers``), and concatenated along D, last
    block first.

    Args:
        backbone: a timm ``VisionTransformer`` (``blocks``, ``norm``, ``patch_embed``, ``num_prefix_tokens``).
        num_layers: number of last blocks whose tokens are concatenated.
        pixel_norm: "imagenet" (pretraining statistics) or "half" (mmseg's [-1, 1]).
        tokens_fn: (backbone, images) -> final-norm tokens (B, prefix + N, D); default
            ``cribo.models.backbone_tokens``.
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_layers: int = 1,
        pixel_norm: PixelNorm = "imagenet",
        tokens_fn: TokensFn | None = None,
    ) -> None:
        super().__init__()
        vit: Any = backbone  # a timm VisionTransformer; attributes read below
        blocks = getattr(vit, "blocks", None)
        if blocks is None or not 1 <= num_layers <= len(blocks):
            depth = "?" if blocks is None else len(blocks)
            raise ValueError(f"num_layers={num_layers} must lie in 1..{depth} (the backbone's blocks)")
        if pixel_norm not in PIXEL_STATS:
            raise ValueError(f"pixel_norm={pixel_norm!r}; valid: {sorted(PIXEL_STATS)}")
        self.backbone = backbone
        self.num_layers = num_layers
        self.pixel_norm: PixelNorm = pixel_norm
        self.tokens_fn = tokens_fn or default_tokens_fn()
        patch = vit.patch_embed.patch_size
        self.patch_size = int(patch[0] if isinstance(patch, (tuple, list)) else patch)
        self.num_prefix_tokens = int(getattr(vit, "num_prefix_tokens", 1))
        self.out_dim = int(vit.embed_dim) * num_layers
        self.depth = len(blocks)

    def forward(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, H // p, W // p, L * D) patch features."""
        height, width = images.shape[-2] // self.patch_size, images.shape[-1] // self.patch_size
        pixels = normalize_pixels(images, self.pixel_norm)
        if self.num_layers == 1:
            layers = [self.tokens_fn(self.backbone, pixels)]
        else:
            with self._capture_blocks() as captured:
                self.tokens_fn(self.backbone, pixels)
            norm: Any = self.backbone.norm
            layers = [norm(tokens) for tokens in reversed(captured)]
        patches = [tokens[:, self.num_prefix_tokens :] for tokens in layers]
        if patches[0].shape[1] != height * width:
            raise ValueError(
                f"backbone returned {patches[0].shape[1]} patch tokens for a {height}x{width} grid; "
                f"images of {tuple(images.shape[-2:])} px with patch {self.patch_size}"
            )
        return torch.cat(patches, dim=-1).reshape(images.shape[0], height, width, -1)

    @contextmanager
    def _capture_blocks(self) -> Iterator[list[Tensor]]:
        captured: list[Tensor] = []

        def hook(module: nn.Module, inputs: Any, output: Tensor) -> None:
            captured.append(output)

        blocks: Any = self.backbone.blocks
        handles = [block.register_forward_hook(hook) for block in blocks[-self.num_layers :]]
        try:
            yield captured
        finally:
            for handle in handles:
                handle.remove()


def state_dict_checksum(module: nn.Module) -> str:
    """SHA-256 over the module's state dict (names, dtypes, shapes, bytes) in sorted key order."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@dataclass(frozen=True)
class ResizeTransform:
    """Deterministic item transform: resize image (bilinear) and mask (nearest) to ``size`` x ``size``."""

    size: int

    def __call__(self, index: int, image: Image.Image, mask: np.ndarray) -> tuple[Tensor, Tensor]:
        pixels, labels = to_tensors(image, mask)
        return resize_pair(pixels, labels, (self.size, self.size))


@dataclass(frozen=True)
class IdentityTransform:
    """Item transform that only converts to tensors (original size)."""

    def __call__(self, index: int, image: Image.Image, mask: np.ndarray) -> tuple[Tensor, Tensor]:
        return to_tensors(image, mask)


class _TransformedItems(Dataset):
    def __init__(self, dataset: SegmentationSet, indices: Sequence[int], transform: ItemTransform) -> None:
        self.dataset, self.indices, self.transform = dataset, list(indices), transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int) -> tuple[Tensor, Tensor]:
        index = self.indices[position]
        image, mask = self.dataset[index]
        return self.transform(index, image, mask)


def _as_lists(items: list[tuple[Tensor, Tensor]]) -> tuple[list[Tensor], list[Tensor]]:
    return [image for image, _ in items], [mask for _, mask in items]


def transformed_batches(
    dataset: SegmentationSet,
    indices: Sequence[int],
    transform: ItemTransform,
    batch_size: int,
    num_workers: int = 0,
    stack: bool = True,
    description: str | None = None,
) -> Iterator[tuple[Any, Any]]:
    """Yield (images, masks) batches of ``dataset[indices]`` after ``transform``, in order.

    With ``stack`` the batches are tensors (B, 3, H, W) and (B, H, W) (all items must share a size); without,
    lists of (3, H_i, W_i) and (H_i, W_i) tensors. ``description`` shows a tqdm progress bar.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    loader = DataLoader(
        _TransformedItems(dataset, indices, transform),
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=None if stack else _as_lists,
    )
    yield from tqdm(loader, desc=description, disable=description is None, leave=False)


@torch.no_grad()
def extract_features(feature_fn: FeatureFn, images: Tensor, device: torch.device) -> Tensor:
    """Run ``feature_fn`` on ``images`` moved to ``device``; float32 (B, h, w, D) on that device."""
    return feature_fn(images.to(device, non_blocking=True)).float()


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


class FeatureCache:
    """Tensors saved under ``directory/<key>.pt`` so that repeated evaluations of one backbone skip extraction.

    The key is a hash of a JSON description (backbone checksum, dataset fingerprint, sizes, seeds, ...); a
    ``None`` directory disables caching. Files are written atomically and read with ``weights_only=True``.
    """

    def __init__(self, directory: str | Path | None) -> None:
        self.directory = None if directory is None else Path(directory)
        self.hits = 0

    @staticmethod
    def key(parts: dict[str, Any]) -> str:
        """Stable hash of ``parts`` (JSON with sorted keys)."""
        return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]

    def load(self, parts: dict[str, Any]) -> dict[str, Tensor] | None:
        """The tensors cached under ``parts``; None when there are none or the entry is damaged (a warning says
        so, and the caller computes and stores them again)."""
        if self.directory is None:
            return None
        path = self.directory / f"{self.key(parts)}.pt"
        if not path.is_file():
            return None
        try:
            cached = torch.load(path, map_location="cpu", weights_only=True)
        except MemoryError:
            raise
        except Exception as err:  # torch raises many types for a truncated or overwritten file
            logger.warning("feature cache entry %s is damaged (%s); computing it again", path, _first_line(err))
            return None
        if not isinstance(cached, dict) or not all(isinstance(value, Tensor) for value in cached.values()):
            logger.warning("feature cache entry %s does not hold named tensors; computing it again", path)
            return None
        self.hits += 1
        logger.info("feature cache hit: %s", path)
        return dict(cached)

    def save(self, parts: dict[str, Any], tensors: dict[str, Tensor]) -> None:
        """Store ``tensors`` under ``parts`` atomically; a failed write (disk full, read-only) only warns."""
        if self.directory is None:
            return
        path = self.directory / f"{self.key(parts)}.pt"
        temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            torch.save({name: tensor.detach().cpu() for name, tensor in tensors.items()}, temporary)
            (self.directory / f"{self.key(parts)}.json").write_text(json.dumps(parts, sort_keys=True, default=str))
            os.replace(temporary, path)
        except (OSError, RuntimeError) as err:  # torch.save reports a failed write as a RuntimeError
            logger.warning("could not write feature cache entry %s (%s); continuing without it", path, _first_line(err))
        finally:
            temporary.unlink(missing_ok=True)

    def get_or_compute(
        self, parts: dict[str, Any] | None, compute: Callable[[], dict[str, Tensor]]
    ) -> dict[str, Tensor]:
        """Load the tensors cached under ``parts``, or compute and store them (``parts=None``: never cache)."""
        cached = None if parts is None else self.load(parts)
        if cached is not None:
            return cached
        tensors = compute()
        if parts is not None:
            self.save(parts, tensors)
        return tensors


def pack_masks(masks: Sequence[Tensor]) -> dict[str, Tensor]:
    """Variable-size (H_i, W_i) masks -> {"masks_flat": uint8, "masks_shape": (n, 2) int64} for caching."""
    flat = (
        torch.cat([mask.reshape(-1).to(torch.uint8) for mask in masks]) if masks else torch.zeros(0, dtype=torch.uint8)
    )
    shapes = torch.tensor([list(mask.shape) for mask in masks], dtype=torch.int64).reshape(-1, 2)
    return {"masks_flat": flat, "masks_shape": shapes}


def unpack_masks(packed: dict[str, Tensor]) -> list[Tensor]:
    """Inverse of ``pack_masks``: a list of (H_i, W_i) int64 masks."""
    sizes = (packed["masks_shape"][:, 0] * packed["masks_shape"][:, 1]).tolist()
    chunks = torch.split(packed["masks_flat"], sizes) if sizes else []
    return [chunk.long().reshape(*shape) for chunk, shape in zip(chunks, packed["masks_shape"].tolist())]
