"""Dense nearest-neighbour retrieval ("in-context scene understanding", Balažević et al., NeurIPS 2023).

The protocol (PROTOCOLS.md, following open-hummingbird-eval): a memory bank holds the L2-normalised patch
features of (augmented) training images with per-patch soft labels (class histograms); each validation patch
takes its k = 30 cosine nearest neighbours, weights them by softmax(similarity / 0.02) and averages their soft
labels; the patch distributions are bilinearly upsampled to the image and the argmax is the prediction; one
confusion matrix over the validation set gives the mIoU.

Axis letters: B images, h/w patch grid, D feature dim, C classes, C' = C + 1 (bank labels carry one extra bin
for ignored pixels when the label space has no background to fold them into), M bank rows, Q queries,
k neighbours, N patches of one image.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from cribo.data.segmentation import (
    IGNORE_INDEX,
    SegmentationSet,
    colour_jitter,
    dataset_fingerprint,
    item_generator,
    random_resized_crop_pair,
    resize_pair,
    to_tensors,
)
from cribo.eval.features import (
    FeatureCache,
    FeatureFn,
    ItemTransform,
    ResizeTransform,
    extract_features,
    pack_masks,
    transformed_batches,
    unpack_masks,
)
from cribo.eval.metrics import SegmentationScores, confusion_matrix, segmentation_scores

logger = logging.getLogger(__name__)

# Published protocol values (PROTOCOLS.md, "Dense nearest-neighbour retrieval"; open-hummingbird-eval v2.0).
PROTOCOL_INPUT_SIZE = 512  # 512 px for /16 backbones (32 x 32 patches); 504 for /14
PROTOCOL_K = 30  # neighbours per query patch
PROTOCOL_TEMPERATURE = 0.02  # softmax temperature on cosine similarities (DIP uses 0.07)
PROTOCOL_PASSES = 2  # augmentation passes over the training set
PROTOCOL_BANK_CAP = 10_240_000  # patches in the reference runs' memory bank
PROTOCOL_CROP_SCALE = (0.5, 2.0)  # random resized crop area scale (values above 1 mostly fall back, as in torchvision)
PROTOCOL_CROP_RATIO = (3 / 4, 4 / 3)
PROTOCOL_JITTER = 0.1  # brightness, contrast, saturation, hue
PROTOCOL_JITTER_PROBABILITY = 0.5  # each jitter applied independently with this probability
PROTOCOL_FRACTIONS = (1 / 128, 1 / 64, 1 / 8, 1.0)  # training-set fractions
PROTOCOL_SEEDS = (0, 1, 2, 3, 4)  # five fixed seeds per fraction

SearchMethod = Literal["auto", "torch", "faiss", "faiss-ivf"]
BankMode = Literal["deterministic", "augmented"]


@dataclass(frozen=True)
class NNConfig:
    """Settings of one retrieval evaluation (plain values; the runner maps CLI options onto it)."""

    input_size: int = PROTOCOL_INPUT_SIZE
    k: int = PROTOCOL_K
    temperature: float = PROTOCOL_TEMPERATURE
    mode: BankMode = "deterministic"  # deterministic: each training image resized once, no augmentation
    passes: int = PROTOCOL_PASSES  # augmented mode only
    bank_cap: int | None = None  # None: every patch; else at most this many rows (rare-class-favouring sampling)
    search: SearchMethod = "auto"  # auto: torch on accelerators, faiss exact on CPU
    ivf_lists: int = 1024  # faiss-ivf: inverted lists (clamped to bank size / 39)
    ivf_probe: int = 32  # faiss-ivf: lists visited per query
    hungarian: bool = False
    eval_resolution: Literal["input", "original"] = "input"  # protocol: evaluate at the resized input size
    batch_size: int = 16  # images per feature-extraction batch
    query_chunk: int = 16384  # query patches per search call
    key_chunk: int = 131072  # bank rows per similarity block in torch search
    num_workers: int = 0
    crop_scale: tuple[float, float] = PROTOCOL_CROP_SCALE
    crop_ratio: tuple[float, float] = PROTOCOL_CROP_RATIO
    jitter: float = PROTOCOL_JITTER
    jitter_probability: float = PROTOCOL_JITTER_PROBABILITY
    progress: bool = True

    def __post_init__(self) -> None:
        checks = {
            "input_size": self.input_size >= 1,
            "k": self.k >= 1,
            "temperature": self.temperature > 0,
            "passes": self.passes >= 1,
            "bank_cap": self.bank_cap is None or self.bank_cap >= 1,
            "batch_size": self.batch_size >= 1,
            "query_chunk": self.query_chunk >= 1,
            "key_chunk": self.key_chunk >= 1,
        }
        for name, valid in checks.items():
            if not valid:
                raise ValueError(f"{name}={getattr(self, name)!r} is out of range")
        choices = {"mode": BankMode, "search": SearchMethod, "eval_resolution": Literal["input", "original"]}
        for name, literal in choices.items():
            if getattr(self, name) not in literal.__args__:  # type: ignore[attr-defined]
                raise ValueError(f"{name}={getattr(self, name)!r}; valid: {literal.__args__}")  # type: ignore[attr-defined]


# ---------------------------------------------------------------------------------------------------------------
# Pure functions of the protocol.


def patch_label_histograms(
    masks: Tensor, grid: tuple[int, int], num_classes: int, background_index: int | None
) -> Tensor:
    """Per-patch class histograms (fractions of the patch's pixels).

    Args:
        masks: (B, H, W) int labels in 0..C-1 or 255.
        grid: (h, w) patch grid; pixel row y belongs to patch row ``y * h // H`` (exact patches when divisible).
        num_classes: C.
        background_index: class that ignored pixels count as (the protocol maps 255 to background); ``None``
            puts them in the extra last bin.

    Returns:
        (B, h, w, C + 1) float32 rows summing to 1; the last bin holds ignored pixels (0 when folded).
    """
    batch, height, width = masks.shape
    rows, cols = grid
    labels = masks.long().clone()
    ignored = labels == IGNORE_INDEX
    if bool(((labels < 0) | ((labels >= num_classes) & ~ignored)).any()):
        raise ValueError(f"mask labels must lie in 0..{num_classes - 1} or {IGNORE_INDEX}")
    labels[ignored] = num_classes if background_index is None else background_index
    patch_row = torch.arange(height, device=masks.device) * rows // height
    patch_col = torch.arange(width, device=masks.device) * cols // width
    patch = (patch_row[:, None] * cols + patch_col[None, :]).expand(batch, -1, -1)
    image = torch.arange(batch, device=masks.device)[:, None, None]
    flat = ((image * rows * cols + patch) * (num_classes + 1) + labels).reshape(-1)
    counts = torch.bincount(flat, minlength=batch * rows * cols * (num_classes + 1)).float()
    counts = counts.reshape(batch, rows, cols, num_classes + 1)
    return counts / counts.sum(-1, keepdim=True).clamp_min(1.0)


def rare_class_selection(histograms: Tensor, quota: int, generator: torch.Generator) -> Tensor:
    """Choose up to ``quota`` patches of one image, favouring patches whose classes are rare in the image.

    score(patch) = sum over the patch's classes of the number of the image's patches containing that class,
    times uniform noise; the lowest scores are kept (PROTOCOLS.md, bank size).

    Args:
        histograms: (N, C') soft labels of the image's patches.
        quota: patches to keep (clamped to N).
        generator: CPU generator for the noise.

    Returns:
        (min(quota, N),) int64 patch indices, lowest score first.
    """
    present = (histograms > 0).float()
    score = (present * present.sum(0, keepdim=True)).sum(-1)
    noise = torch.rand(histograms.shape[0], generator=generator).to(histograms.device)
    return torch.argsort(score * noise)[: min(quota, histograms.shape[0])]


def knn_torch(queries: Tensor, keys: Tensor, k: int, key_chunk: int = 131072) -> tuple[Tensor, Tensor]:
    """Exact top-k inner products, chunked over the keys.

    Args:
        queries: (Q, D).
        keys: (M, D), same device.
        k: neighbours (clamped to M).
        key_chunk: keys per similarity block (memory Q x key_chunk).

    Returns:
        similarities (Q, k) descending and indices (Q, k) int64.
    """
    k = min(k, keys.shape[0])
    best_sims, best_index = None, None
    for start in range(0, keys.shape[0], key_chunk):
        sims = queries @ keys[start : start + key_chunk].T
        top_sims, top_index = sims.topk(min(k, sims.shape[1]), dim=1)
        top_index = top_index + start
        if best_sims is not None and best_index is not None:
            top_sims, order = torch.cat([best_sims, top_sims], 1).topk(k, dim=1)
            top_index = torch.cat([best_index, top_index], 1).gather(1, order)
        best_sims, best_index = top_sims, top_index
    assert best_sims is not None and best_index is not None
    return best_sims, best_index


def propagate_labels(similarities: Tensor, neighbour_labels: Tensor, temperature: float) -> Tensor:
    """Label propagation: softmax(similarity / temperature)-weighted mean of the neighbours' soft labels.

    Args:
        similarities: (Q, k) cosine similarities.
        neighbour_labels: (Q, k, C') soft labels of the neighbours.
        temperature: softmax temperature (0.02 in the protocol).

    Returns:
        (Q, C') label distributions.
    """
    weights = torch.softmax(similarities.float() / temperature, dim=-1)
    return torch.einsum("qk,qkc->qc", weights, neighbour_labels.float())


def upsample_argmax(patch_scores: Tensor, size: tuple[int, int], num_classes: int) -> Tensor:
    """Bilinearly upsample per-patch class scores to ``size`` and take the argmax over the first C classes.

    Args:
        patch_scores: (B, h, w, C') scores.
        size: (H, W).
        num_classes: C (an extra "ignored" bin beyond C is dropped).

    Returns:
        (B, H, W) int64 predictions.
    """
    scores = patch_scores[..., :num_classes].permute(0, 3, 1, 2).float()
    return F.interpolate(scores, size=size, mode="bilinear", align_corners=False).argmax(1)


def subsample_indices(num_items: int, fraction: float, seed: int) -> list[int]:
    """A uniform random subset of ``round(num_items * fraction)`` (at least 1) indices, sorted."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction={fraction} must lie in (0, 1]")
    if fraction == 1:
        return list(range(num_items))
    count = max(1, round(num_items * fraction))
    order = torch.randperm(num_items, generator=torch.Generator().manual_seed(seed))
    return sorted(order[:count].tolist())


# ---------------------------------------------------------------------------------------------------------------
# Search backends.


class NeighbourSearch:
    """k-NN by inner product over a fixed bank: torch exact (any device), faiss exact, or faiss IVF.

    ``faiss-ivf`` (``IndexIVFFlat``, inner product) is approximate: the bank is clustered into ``ivf_lists``
    k-means cells trained on a sample of at most 256 vectors per cell, and each query visits the ``ivf_probe``
    nearest cells. Use it on CPU when an exact search over the bank is too slow.
    """

    def __init__(self, keys: Tensor, method: SearchMethod, key_chunk: int, ivf_lists: int, ivf_probe: int) -> None:
        if method == "auto":
            method = "torch" if keys.device.type != "cpu" else "faiss"
        self.method = method
        self.keys = keys
        self.key_chunk = key_chunk
        if method in ("faiss", "faiss-ivf"):
            self.index = self._faiss_index(keys.detach().float().cpu().numpy(), method, ivf_lists, ivf_probe)
        elif method != "torch":
            raise ValueError(f"search={method!r}; valid: auto, torch, faiss, faiss-ivf")

    @staticmethod
    def _faiss_index(keys: np.ndarray, method: str, ivf_lists: int, ivf_probe: int) -> object:
        import faiss

        keys = np.ascontiguousarray(keys, dtype=np.float32)
        dim = keys.shape[1]
        index: Any
        if method == "faiss":
            index = faiss.IndexFlatIP(dim)
        else:
            lists = max(1, min(ivf_lists, keys.shape[0] // 39))
            index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, lists, faiss.METRIC_INNER_PRODUCT)
            sample = np.random.default_rng(0).permutation(keys.shape[0])[: 256 * lists]
            index.train(keys[np.sort(sample)])
            index.nprobe = min(ivf_probe, lists)
        index.add(keys)
        return index

    def search(self, queries: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """(Q, D) queries -> similarities (Q, k') and bank indices (Q, k') on the bank's device, k' = min(k, M)."""
        k = min(k, self.keys.shape[0])
        if self.method == "torch":
            return knn_torch(queries.to(self.keys.device, self.keys.dtype), self.keys, k, self.key_chunk)
        sims, index = self.index.search(np.ascontiguousarray(queries.detach().float().cpu().numpy()), k)  # type: ignore[attr-defined]
        return torch.from_numpy(sims), torch.from_numpy(index).long()


# ---------------------------------------------------------------------------------------------------------------
# Bank and queries.


@dataclass
class MemoryBank:
    """Bank rows: ``features`` (M, D) L2-normalised float32, ``labels`` (M, C') float16 soft labels."""

    features: Tensor
    labels: Tensor


@dataclass
class QuerySet:
    """Validation patches: ``features`` (B, h, w, D) L2-normalised, ``masks`` B ground truths (H_i, W_i)."""

    features: Tensor
    masks: list[Tensor]


@dataclass(frozen=True)
class NNAugmentation:
    """The protocol's training-image augmentation, seeded per (seed, pass, image): paired random resized crop
    (bilinear image, nearest mask), then colour jitter; no flip (PROTOCOLS.md)."""

    size: int
    scale: tuple[float, float]
    ratio: tuple[float, float]
    jitter: float
    jitter_probability: float
    seed: int
    pass_index: int

    def __call__(self, index: int, image: Image.Image, mask: np.ndarray) -> tuple[Tensor, Tensor]:
        generator = item_generator(self.seed, self.pass_index, index)
        pixels, labels = to_tensors(image, mask)
        pixels, labels = random_resized_crop_pair(pixels, labels, self.size, self.scale, self.ratio, generator)
        return colour_jitter(pixels, self.jitter, self.jitter_probability, generator), labels


@dataclass(frozen=True)
class QueryTransform:
    """Validation transform: image resized to ``size`` x ``size``; mask resized (nearest) or kept."""

    size: int
    keep_mask_size: bool

    def __call__(self, index: int, image: Image.Image, mask: np.ndarray) -> tuple[Tensor, Tensor]:
        pixels, labels = to_tensors(image, mask)
        resized, resized_labels = resize_pair(pixels, labels, (self.size, self.size))
        return resized, labels if self.keep_mask_size else resized_labels


def bank_transforms(config: NNConfig, seed: int) -> list[ItemTransform]:
    """One transform per pass over the training images (one resize pass in deterministic mode)."""
    if config.mode == "deterministic":
        return [ResizeTransform(config.input_size)]
    return [
        NNAugmentation(
            config.input_size, config.crop_scale, config.crop_ratio, config.jitter, config.jitter_probability, seed, p
        )
        for p in range(config.passes)
    ]


def build_memory_bank(
    feature_fn: FeatureFn,
    dataset: SegmentationSet,
    indices: Sequence[int],
    config: NNConfig,
    seed: int,
    device: torch.device,
) -> MemoryBank:
    """Extract the bank: normalised patch features and soft labels of ``dataset[indices]``, capped if asked.

    With ``config.bank_cap`` each image (per pass) keeps ``cap // (images x passes)`` patches (at least 1, at
    most all of its patches), chosen by ``rare_class_selection`` with noise from ``seed``.
    """
    transforms = bank_transforms(config, seed)
    quota = None if config.bank_cap is None else max(1, config.bank_cap // (len(indices) * len(transforms)))
    generator = torch.Generator().manual_seed(seed)
    background = getattr(dataset, "background_index", None)
    features, labels = [], []
    for pass_index, transform in enumerate(transforms):
        description = f"bank pass {pass_index + 1}/{len(transforms)}" if config.progress else None
        for images, masks in transformed_batches(
            dataset, indices, transform, config.batch_size, config.num_workers, description=description
        ):
            patch_features = F.normalize(extract_features(feature_fn, images, device), dim=-1)
            grid = (patch_features.shape[1], patch_features.shape[2])
            histograms = patch_label_histograms(masks.to(device), grid, dataset.num_classes, background)
            for image_features, image_labels in zip(patch_features.flatten(1, 2), histograms.flatten(1, 2)):
                if quota is not None:
                    keep = rare_class_selection(image_labels, quota, generator)
                    image_features, image_labels = image_features[keep], image_labels[keep]
                features.append(image_features.cpu())
                labels.append(image_labels.cpu().half())
    return MemoryBank(torch.cat(features), torch.cat(labels))


def extract_queries(
    feature_fn: FeatureFn, dataset: SegmentationSet, config: NNConfig, device: torch.device
) -> QuerySet:
    """Normalised patch features of every validation image resized to the input size, with their masks."""
    transform = QueryTransform(config.input_size, keep_mask_size=config.eval_resolution == "original")
    description = "validation features" if config.progress else None
    features: list[Tensor] = []
    masks: list[Tensor] = []
    for images, image_masks in transformed_batches(
        dataset, range(len(dataset)), transform, config.batch_size, config.num_workers, False, description
    ):
        batch = torch.stack(images)
        features.append(F.normalize(extract_features(feature_fn, batch, device), dim=-1).cpu())
        masks.extend(mask.to(torch.uint8) for mask in image_masks)  # uint8: 8x less memory than int64
    return QuerySet(torch.cat(features), masks)


@torch.no_grad()
def evaluate_bank(
    bank: MemoryBank, queries: QuerySet, config: NNConfig, num_classes: int, device: torch.device
) -> Tensor:
    """Search, propagate, upsample and count: the (C, C) confusion matrix of the validation set."""
    keys = bank.features.to(device) if config.search in ("auto", "torch") else bank.features
    search = NeighbourSearch(keys, config.search, config.key_chunk, config.ivf_lists, config.ivf_probe)
    bank_labels = bank.labels.to(search.keys.device)
    grid_size = queries.features.shape[1] * queries.features.shape[2]
    images_per_chunk = max(1, config.query_chunk // grid_size)
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    for start in range(0, queries.features.shape[0], images_per_chunk):
        chunk = queries.features[start : start + images_per_chunk]
        sims, index = search.search(chunk.reshape(-1, chunk.shape[-1]), config.k)
        index = index.to(bank_labels.device)
        scores = propagate_labels(sims.to(bank_labels.device), bank_labels[index], config.temperature)
        scores = scores.reshape(*chunk.shape[:3], -1)
        masks = queries.masks[start : start + images_per_chunk]
        for image_scores, mask in zip(scores, masks):
            prediction = upsample_argmax(image_scores[None], (mask.shape[0], mask.shape[1]), num_classes)[0]
            confusion += confusion_matrix(prediction.cpu(), mask, num_classes, IGNORE_INDEX)
    return confusion


@dataclass
class NNRun:
    """One (fraction, seed) evaluation."""

    fraction: float
    seed: int
    num_train_images: int
    bank_size: int
    scores: SegmentationScores
    seconds: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class CacheIdentity:
    """What identifies extracted features across runs (``backbone`` = checksum + layers + pixel norm)."""

    cache: FeatureCache
    backbone: str


def _cached_queries(
    feature_fn: FeatureFn,
    val_set: SegmentationSet,
    config: NNConfig,
    device: torch.device,
    cached: CacheIdentity | None,
) -> QuerySet:
    parts = None
    if cached is not None:
        parts = {
            "kind": "nn-queries",
            "backbone": cached.backbone,
            "dataset": dataset_fingerprint(val_set),
            "input_size": config.input_size,
            "eval_resolution": config.eval_resolution,
        }
    cache = cached.cache if cached is not None else FeatureCache(None)

    def compute() -> dict[str, Tensor]:
        queries = extract_queries(feature_fn, val_set, config, device)
        return {"features": queries.features, **pack_masks(queries.masks)}

    tensors = cache.get_or_compute(parts, compute)
    return QuerySet(tensors["features"], unpack_masks(tensors))


def _cached_bank(
    feature_fn: FeatureFn,
    train_set: SegmentationSet,
    indices: list[int],
    config: NNConfig,
    seed: int,
    device: torch.device,
    cached: CacheIdentity | None,
) -> MemoryBank:
    parts = None
    if cached is not None:
        parts = {
            "kind": "nn-bank",
            "backbone": cached.backbone,
            "dataset": dataset_fingerprint(train_set),
            "indices": FeatureCache.key({"indices": indices}),
            "seed": seed,
            "input_size": config.input_size,
            "mode": config.mode,
            "passes": config.passes if config.mode == "augmented" else 1,
            "bank_cap": config.bank_cap,
            "crop": [config.crop_scale, config.crop_ratio],
            "jitter": [config.jitter, config.jitter_probability],
        }
    cache = cached.cache if cached is not None else FeatureCache(None)

    def compute() -> dict[str, Tensor]:
        bank = build_memory_bank(feature_fn, train_set, indices, config, seed, device)
        return {"features": bank.features, "labels": bank.labels}

    tensors = cache.get_or_compute(parts, compute)
    return MemoryBank(tensors["features"], tensors["labels"])


def evaluate_nn(
    feature_fn: FeatureFn,
    train_set: SegmentationSet,
    val_set: SegmentationSet,
    config: NNConfig,
    fractions: Sequence[float] = (1.0,),
    seeds: Sequence[int] = (0,),
    device: torch.device | None = None,
    cached: CacheIdentity | None = None,
) -> list[NNRun]:
    """Run the retrieval protocol for every (training fraction, seed).

    Args:
        feature_fn: images (B, 3, H, W) in [0, 1] -> patch features (B, h, w, D).
        train_set: bank source; its ``background_index`` (if any) receives ignored pixels in the bank.
        val_set: evaluated on all of its images; same label space as ``train_set``.
        config: protocol settings.
        fractions: training-set fractions (each in (0, 1]).
        seeds: one subset (and augmentation / sampling noise) per seed.
        device: where features are extracted and (torch search) compared; default CPU.
        cached: feature cache and backbone identity; ``None`` disables caching.

    Returns:
        One ``NNRun`` per (fraction, seed), fraction-major. In deterministic mode without a cap the full
        training set gives the same bank for every seed: it is evaluated once and its scores repeated.
    """
    if train_set.num_classes != val_set.num_classes:
        raise ValueError(f"train ({train_set.num_classes}) and val ({val_set.num_classes}) class counts differ")
    device = device or torch.device("cpu")
    started = time.perf_counter()
    queries = _cached_queries(feature_fn, val_set, config, device, cached)
    query_seconds = time.perf_counter() - started
    runs: list[NNRun] = []
    seed_matters = config.mode == "augmented" or config.bank_cap is not None
    for fraction in fractions:
        for seed in seeds:
            indices = subsample_indices(len(train_set), fraction, seed)
            same = [run for run in runs if run.fraction == fraction and not seed_matters and fraction == 1]
            if same:  # deterministic full-set bank: every seed gives the same bank, reuse the scores
                runs.append(dataclasses.replace(same[0], seed=seed))
                continue
            started = time.perf_counter()
            bank = _cached_bank(feature_fn, train_set, indices, config, seed, device, cached)
            bank_seconds = time.perf_counter() - started
            confusion = evaluate_bank(bank, queries, config, val_set.num_classes, device)
            scores = segmentation_scores(confusion, hungarian=config.hungarian)
            seconds = {
                "queries": query_seconds,
                "bank": bank_seconds,
                "search": time.perf_counter() - started - bank_seconds,
            }
            runs.append(NNRun(fraction, seed, len(indices), bank.features.shape[0], scores, seconds))
            logger.info(
                "fraction %g seed %d: mIoU %.2f (bank %d rows)",
                fraction,
                seed,
                100 * scores.miou,
                bank.features.shape[0],
            )
    return runs
