"""What the pictures show, computed from a backbone's features: PCA colours of patch features, the joint-space
clusters of two views, cross-image nearest objects with the cycle check, dense NN retrieval predictions.

Tensor functions (some run the backbone), no files and no drawing: :mod:`cribo.viz.figures` draws,
:mod:`cribo.viz.commands` loads the inputs and writes the PNG.

Axis letters: B images, V = 2 views, S view side (pixels), h/w patch grid, N = h*w patches per view,
T = 2N tokens of both views, K clusters, D feature dim, q query objects, R rows (any number of feature vectors).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from cribo.augment import IMAGENET_MEAN, IMAGENET_STD, CropBox, TwoViewAugmentation
from cribo.clustering import ClusteringResult, joint_space_clustering, select_valid
from cribo.matching import match_objects
from cribo.memory import ObjectMemoryBank

if TYPE_CHECKING:
    from PIL import Image
    from timm.models.vision_transformer import VisionTransformer

    from cribo.eval.nn_retrieval import MemoryBank, NNConfig, QuerySet


PCA_COMPONENTS = 3  # mapped to R, G, B
PCA_CLIP_QUANTILE = 0.01  # each component is min-max scaled between its 1% and 99% quantiles (robust to outliers)


# ----------------------------------------------------------------------------------------------------------------
# PCA of patch features


def pca_colours(features: Tensor, quantile: float = PCA_CLIP_QUANTILE) -> tuple[Tensor, Tensor]:
    """First three principal components of the patch features, as RGB.

    The PCA is fitted on all rows together (so colours compare across images); each component's sign is fixed
    (largest loading positive) and it is scaled to [0, 1] between its ``quantile`` and ``1 - quantile``.

    Args:
        features: (..., D) patch features, e.g. (B, h, w, D); at least two rows.
        quantile: clipping quantile of each component.

    Returns:
        colours (..., 3) float32 in [0, 1] and the explained-variance ratio of the three components (3,)
        (zeros for components that do not exist when D or R is below 3).
    """
    if features.ndim < 2 or features.shape[:-1].numel() < 2:
        raise ValueError(f"features must be (..., D) with at least two rows, got shape {tuple(features.shape)}")
    if not 0.0 <= quantile < 0.5:
        raise ValueError(f"quantile must lie in [0, 0.5), got {quantile}")
    rows = features.reshape(-1, features.shape[-1]).double()
    centred = rows - rows.mean(0)
    _, singular, basis = torch.linalg.svd(centred, full_matrices=False)
    components = basis[:PCA_COMPONENTS]  # (c, D)
    signs = components.gather(1, components.abs().argmax(1, keepdim=True)).sign()
    projections = centred @ (components * torch.where(signs == 0, 1.0, signs)).T  # (R, c)
    low = torch.quantile(projections, quantile, dim=0)
    high = torch.quantile(projections, 1.0 - quantile, dim=0)
    span = high - low
    colours = torch.where(span > 0, (projections - low) / torch.where(span > 0, span, 1.0), 0.5).clamp(0, 1)
    variance = singular.square()
    explained = variance[:PCA_COMPONENTS] / variance.sum().clamp_min(torch.finfo(torch.float64).tiny)
    missing = PCA_COMPONENTS - colours.shape[1]
    colours = F.pad(colours, (0, missing))
    explained = F.pad(explained, (0, PCA_COMPONENTS - explained.shape[0]))
    return colours.float().reshape(*features.shape[:-1], PCA_COMPONENTS), explained.float()


# ----------------------------------------------------------------------------------------------------------------
# Two views and their joint-space clusters


def denormalize(images: Tensor, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> Tensor:
    """Undo the views' normalisation: (..., 3, S, S) normalised -> [0, 1]."""
    shape = (3, 1, 1)
    return (images * images.new_tensor(std).view(shape) + images.new_tensor(mean).view(shape)).clamp(0, 1)


def patch_size_of(backbone: VisionTransformer) -> int:
    """Patch side of a timm ViT, in pixels."""
    return int(backbone.patch_embed.patch_size[0])


@dataclass
class EncodedViews:
    """Two geometric views of each image through the backbone.

    Attributes:
        views: (B, V=2, 3, S, S) views in [0, 1] (no colour augmentation).
        positions: (B, T, 2) original-image (x, y) of every patch centre, view 1 then view 2.
        tokens: (B, T, D) last-layer patch tokens, view 1 then view 2.
        boxes: crop boxes per image.
        grid: (h, w) patch grid of a view.
    """

    views: Tensor
    positions: Tensor
    tokens: Tensor
    boxes: list[tuple[CropBox, CropBox]]
    grid: tuple[int, int]


@torch.no_grad()
def encode_views(backbone: VisionTransformer, images: Sequence[Image.Image], view_size: int, seed: int) -> EncodedViews:
    """Cut two views of every image (``TwoViewAugmentation(colour=False)``, seed ``seed + i``) and run the backbone."""
    from cribo.models import backbone_tokens

    patch = patch_size_of(backbone)
    augmentation = TwoViewAugmentation(output_size=view_size, patch_size=patch, colour=False)
    pairs = [augmentation(image, seed=seed + index) for index, image in enumerate(images)]
    normalised = torch.stack([pair.images for pair in pairs])  # (B, 2, 3, S, S)
    device = next(backbone.parameters()).device
    tokens = backbone_tokens(backbone, normalised.flatten(0, 1).to(device))[:, 1:].float()  # (2B, N, D)
    return EncodedViews(
        views=denormalize(normalised),
        positions=torch.stack([pair.positions for pair in pairs]).flatten(1, 2).to(device),
        tokens=tokens.unflatten(0, (len(pairs), 2)).flatten(1, 2),
        boxes=[pair.boxes for pair in pairs],
        grid=(view_size // patch, view_size // patch),
    )


def cluster_views(encoded: EncodedViews, num_clusters: int, pos_alpha: float, seed: int) -> ClusteringResult:
    """Joint-space clustering of both views' tokens per image (the teacher's clustering in training)."""
    num_tokens = encoded.tokens.shape[1]
    if not 1 <= num_clusters <= num_tokens:
        raise ValueError(f"--n-tokens must lie in 1..{num_tokens} (the tokens of both views), got {num_clusters}")
    generator = torch.Generator().manual_seed(seed)
    return joint_space_clustering(encoded.tokens, encoded.positions, num_clusters, pos_alpha, generator=generator)


def view_cluster_maps(clusters: ClusteringResult, grid: tuple[int, int]) -> Tensor:
    """(B, T) cluster of each token -> (B, V=2, h, w)."""
    return clusters.cluster_of_token.cpu().reshape(-1, 2, *grid)


# ----------------------------------------------------------------------------------------------------------------
# Cross-image neighbours of objects


@dataclass
class ObjectNeighbours:
    """Nearest stored object of each query object (one view) and the cycle check's outcome.

    Attributes:
        query_image: (q,) int64 image of each query object.
        query_cluster: (q,) int64 its cluster.
        neighbour_image: (q,) int64 image of its nearest object among the other images.
        neighbour_cluster: (q,) int64 cluster of that object.
        similarity: (q,) float32 cosine similarity of the pair.
        consistent: (q,) bool cycle-consistent (the neighbour's other-view entry retrieves the query's).
    """

    query_image: Tensor
    query_cluster: Tensor
    neighbour_image: Tensor
    neighbour_cluster: Tensor
    similarity: Tensor
    consistent: Tensor


@torch.no_grad()
def cross_image_neighbours(objects: Tensor, valid: Tensor, num_queries: int, view: int = 0) -> ObjectNeighbours:
    """Match the objects of the first ``num_queries`` images against those of the others, as in training.

    The query images play the batch; the other images' objects fill an :class:`ObjectMemoryBank` (one slot per
    image, in order); :func:`cribo.matching.match_objects` retrieves each query object's cosine nearest
    neighbour per view and checks cycle consistency against the batch's objects.

    Args:
        objects: (B, V=2, K, D) per-view objects (:func:`cribo.clustering.pool_objects`).
        valid: (B, K) bool objects present in both views.
        num_queries: number of leading images used as queries, in [1, B).
        view: which view's matches to report (0 or 1).

    Returns:
        :class:`ObjectNeighbours` over the q valid objects of the query images (image-major, cluster order).
    """
    batch, _, num_clusters, _ = objects.shape
    if not 1 <= num_queries < batch:
        raise ValueError(f"num_queries must lie in [1, {batch}) (the other images form the bank), got {num_queries}")
    if view not in (0, 1):
        raise ValueError(f"view must be 0 or 1, got {view}")
    queries, _ = select_valid(objects[:num_queries], valid[:num_queries])
    stored, stored_counts = select_valid(objects[num_queries:], valid[num_queries:])
    if queries.shape[0] == 0 or stored.shape[0] == 0:
        raise ValueError("no object is present in both views of the query images or of the other images")
    bank = ObjectMemoryBank.from_authors_layout(stored.transpose(0, 1).float(), stored_counts, num_clusters)
    matches = match_objects(queries.float(), bank)
    query_image, query_cluster = valid[:num_queries].nonzero(as_tuple=True)
    stored_image, stored_cluster = valid[num_queries:].nonzero(as_tuple=True)
    row = bank.authors_index(matches.index[view])  # row of the image-major stored objects
    return ObjectNeighbours(
        query_image=query_image,
        query_cluster=query_cluster,
        neighbour_image=stored_image[row] + num_queries,
        neighbour_cluster=stored_cluster[row],
        similarity=F.cosine_similarity(queries[:, view].float(), matches.neighbours[view], dim=-1),
        consistent=matches.cycle_mask[view],
    )


def spread_selection(groups: Tensor, max_items: int) -> list[int]:
    """Up to ``max_items`` indices taken round-robin over the groups (e.g. query images), in index order.

    Args:
        groups: (q,) group of each item, items of a group contiguous or not.
        max_items: how many to keep.

    Returns:
        Sorted item indices.
    """
    ranks: dict[int, int] = {}
    keys = []
    for index, group in enumerate(groups.tolist()):
        keys.append((ranks.get(group, 0), index))
        ranks[group] = ranks.get(group, 0) + 1
    return sorted(index for _, index in sorted(keys)[:max_items])


# ----------------------------------------------------------------------------------------------------------------
# Nearest-neighbour segmentation (the evaluation suite's retrieval)


@torch.no_grad()
def retrieval_predictions(bank: MemoryBank, queries: QuerySet, config: NNConfig, num_classes: int) -> list[Tensor]:
    """Per-image predictions of the dense NN retrieval protocol (``cribo.eval.nn_retrieval``'s functions).

    Args:
        bank: memory bank of labelled training patches (:func:`cribo.eval.nn_retrieval.build_memory_bank`).
        queries: validation patch features and masks (:func:`cribo.eval.nn_retrieval.extract_queries`).
        config: protocol settings (k, temperature, search).
        num_classes: C.

    Returns:
        One (H_i, W_i) int64 prediction per query image, at its mask's size.
    """
    from cribo.eval.nn_retrieval import NeighbourSearch, propagate_labels, upsample_argmax

    search = NeighbourSearch(bank.features, config.search, config.key_chunk, config.ivf_lists, config.ivf_probe)
    labels = bank.labels.to(search.keys.device)
    predictions = []
    for features, mask in zip(queries.features, queries.masks):
        sims, index = search.search(features.reshape(-1, features.shape[-1]), config.k)
        scores = propagate_labels(sims.to(labels.device), labels[index.to(labels.device)], config.temperature)
        size = (int(mask.shape[0]), int(mask.shape[1]))
        predictions.append(upsample_argmax(scores.reshape(1, *features.shape[:2], -1), size, num_classes)[0].cpu())
    return predictions
