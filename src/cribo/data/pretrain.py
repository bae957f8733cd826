"""The pretraining data pipeline: images -> two augmented views per image -> whole batches, resumable mid-epoch.

Every augmentation is a pure function of ``(seed, epoch, index)`` and every epoch's order a pure function of
``(seed, epoch)``, so a resumed run sees exactly the batches an uninterrupted one would, whatever the number of
loader workers.

Axis letters: B images per batch, V = 2 views, S view side (pixels), N patches per view.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from cribo.augment import TwoViewAugmentation
from cribo.config import TrainConfig

__all__ = [
    "Batch",
    "EpochBatchSampler",
    "ImageSource",
    "TwoViewDataset",
    "build_image_source",
    "build_loader",
    "collate",
    "iterations_per_epoch",
]

# Seeds of one item's augmentation: a fixed mixing of (seed, epoch, index) into a 63-bit seed, independent of
# workers and resumes. Large primes (and 2^31 - 1, a Mersenne prime) keep the three terms from colliding.
SAMPLE_SEED_FACTOR = 1_000_003
SAMPLE_EPOCH_FACTOR = 2_147_483_647
SAMPLE_INDEX_FACTOR = 97_531
SAMPLE_SEED_MODULUS = 2**63 - 1
# Seed of an epoch's order: seed * EPOCH_ORDER_FACTOR + epoch (7919, the 1000th prime).
EPOCH_ORDER_FACTOR = 7919


class ImageSource(Protocol):
    """What pretraining reads: a sized, indexable set of images (an unreadable item is None; a labelled item is an
    ``(image, label)`` tuple, of which the image is used)."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Image.Image | tuple[Image.Image, np.ndarray] | None: ...


def build_image_source(config: TrainConfig) -> ImageSource:
    """The pretraining images: a folder (recursive) or the built-in synthetic scenes' training split."""
    if config.data.data_path:
        from cribo.data.folder import ImageFolder

        return ImageFolder(config.data.data_path)
    from cribo.data.scenes import SyntheticScenes

    return SyntheticScenes(
        "train", config.data.scenes_num_images, image_size=config.data.scenes_image_size, seed=config.run.seed
    )


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The augmentation seed of item ``index`` in epoch ``epoch`` of a run seeded ``seed``."""
    return (seed * SAMPLE_SEED_FACTOR + epoch * SAMPLE_EPOCH_FACTOR + index * SAMPLE_INDEX_FACTOR) % SAMPLE_SEED_MODULUS


class TwoViewDataset(Dataset):
    """Items are keyed by ``(epoch, index)`` so every augmentation is a pure function of the seed and the key.

    An item is ``(images (V,3,S,S), positions (V,N,2))``, or None for an unreadable image.
    """

    def __init__(self, source: ImageSource, augmentation: TwoViewAugmentation, seed: int) -> None:
        self.source = source
        self.augmentation = augmentation
        self.seed = seed

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key: tuple[int, int]) -> tuple[Tensor, Tensor] | None:
        epoch, index = key
        item = self.source[index]
        image = item[0] if isinstance(item, tuple) else item
        if image is None:  # unreadable file: the folder dataset already warned
            return None
        views = self.augmentation(image, seed=sample_seed(self.seed, epoch, index))
        return views.images, views.positions


@dataclass
class Batch:
    """A collated batch: images (B,V,3,S,S), positions (B,V,N,2), and how many items were unreadable."""

    images: Tensor
    positions: Tensor
    num_skipped: int


def collate(items: list[tuple[Tensor, Tensor] | None]) -> Batch:
    """Stack the readable items and count the skipped ones."""
    kept = [item for item in items if item is not None]
    if not kept:
        return Batch(torch.empty(0), torch.empty(0), len(items))
    return Batch(torch.stack([k[0] for k in kept]), torch.stack([k[1] for k in kept]), len(items) - len(kept))


class EpochBatchSampler(Sampler[list[tuple[int, int]]]):
    """Seeded per-epoch permutation, sharded over processes, whole batches only; can start mid-epoch."""

    def __init__(self, num_items: int, batch_size: int, seed: int, rank: int, world_size: int) -> None:
        self.num_items = num_items
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.start_batch = 0

    def __len__(self) -> int:
        return self.num_items // (self.batch_size * self.world_size) - self.start_batch

    def set_position(self, epoch: int, start_batch: int) -> None:
        """Iterate epoch ``epoch`` from its batch ``start_batch`` on (resume mid-epoch)."""
        self.epoch = epoch
        self.start_batch = start_batch

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        generator = torch.Generator().manual_seed(self.seed * EPOCH_ORDER_FACTOR + self.epoch)
        order = torch.randperm(self.num_items, generator=generator).tolist()
        per_step = self.batch_size * self.world_size
        for step in range(self.start_batch, self.num_items // per_step):
            chunk = order[step * per_step : (step + 1) * per_step]
            mine = chunk[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
            yield [(self.epoch, index) for index in mine]


def iterations_per_epoch(num_items: int, batch_size: int, world_size: int) -> int:
    """Full steps per epoch (drop-last), with an error naming the flags when the data is too small."""
    steps = num_items // (batch_size * world_size)
    if steps == 0:
        raise ValueError(
            f"{num_items} training images cannot fill one step of --batch_size_per_gpu {batch_size} x "
            f"{world_size} processes; lower the batch size or add images"
        )
    return steps


@dataclass
class Loader:
    """One process's two-view data pipeline: the loader, its batch sampler (this rank's share of each epoch) and
    the loader's generator (saved in checkpoints)."""

    loader: DataLoader
    sampler: EpochBatchSampler
    generator: torch.Generator


def build_loader(config: TrainConfig, device: torch.device, rank: int, world: int) -> Loader:
    """The two-view data pipeline of process ``rank`` of ``world``."""
    augmentation = TwoViewAugmentation(
        output_size=config.data.image_size, scale=config.data.global_crops_scale, patch_size=config.model.patch_size
    )
    dataset = TwoViewDataset(build_image_source(config), augmentation, config.run.seed)
    sampler = EpochBatchSampler(len(dataset), config.optim.batch_size_per_gpu, config.run.seed, rank, world)
    generator = torch.Generator().manual_seed(config.run.seed)
    loader = DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=config.data.num_workers,
        collate_fn=collate,
        pin_memory=device.type == "cuda",
        generator=generator,
        persistent_workers=False,
    )
    return Loader(loader, sampler, generator)
