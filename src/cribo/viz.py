"""Pictures of what was learned: training curves, PCA of patch features, object clusters, cross-image
neighbours and nearest-neighbour segmentations (``cribo viz curves|pca|clusters|neighbours|segmentation``).

Pure helpers take tensors/arrays and return colours, matches or a matplotlib ``Figure`` (Agg canvas, no pyplot
state); the ``command_*`` functions load the backbone and images, call them, write the PNG and print its path.

Axis letters: B images, V = 2 views, S view side (pixels), H/W image height/width, h/w patch grid,
N = h*w patches per view, T = 2N tokens of both views, K clusters, D feature dim, n valid objects,
q query objects, R rows (any number of feature vectors).
"""

from __future__ import annotations

import argparse
import math
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from torch import Tensor

from cribo.augment import IMAGENET_MEAN, IMAGENET_STD, CropBox, TwoViewAugmentation
from cribo.clustering import ClusteringResult, joint_space_clustering, pool_objects, select_valid, valid_objects
from cribo.matching import match_objects
from cribo.memory import ObjectMemoryBank

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure
    from timm.models.vision_transformer import VisionTransformer

    from cribo.data.segmentation import SegmentationSet
    from cribo.eval.nn_retrieval import MemoryBank, NNConfig, QuerySet

CURVE_KEYS: tuple[tuple[str, str], ...] = (
    ("d_loss", "global cross-view loss"),
    ("s_loss", "object cross-view loss"),
    ("nn_loss", "cross-image loss"),
    ("bootstrap_centroid_ratio", "cycle-consistent fraction"),
    ("r_cnt", "objects per image"),
    ("images_per_s", "images / s"),
)

FIGURE_DPI = 110
PANEL_INCHES = 2.4  # side of one image panel
PCA_COMPONENTS = 3  # mapped to R, G, B
PCA_CLIP_QUANTILE = 0.01  # each component is min-max scaled between its 1% and 99% quantiles (robust to outliers)
CLUSTER_ALPHA = 0.5  # opacity of a kept cluster's colour over the view
DROPPED_ALPHA = 0.8  # opacity of the grey over a dropped cluster: mostly greyed out
DROPPED_GREY = (0.55, 0.55, 0.55)
EDGE_COLOUR = (1.0, 1.0, 1.0)  # cluster boundaries
DIM_FACTOR = 0.3  # brightness of the pixels outside the highlighted object (neighbours picture)
OBJECT_OUTLINE = (1.0, 0.85, 0.0)  # outline of a highlighted object
# Colour and line style of the crop boxes of view 1 and view 2 drawn on the original image.
VIEW_BOX_STYLES: tuple[tuple[str, Literal["-", "--"]], ...] = (("#00e5ff", "-"), ("#ff4fd8", "--"))
CONSISTENT_COLOUR, INCONSISTENT_COLOUR = "#1a7f37", "#c62828"
TITLE_CHARS_PER_INCH = 12  # characters of a 10-pt title line per inch of figure width (DejaVu Sans, with margin)
TAB20_GREYS = (14, 15)  # tab20 entries that are grey: left out so that grey always means "dropped"
DEFAULT_IMAGE_SIZE = 96  # the built-in scenes' default side
DEFAULT_NUM_IMAGES = {"pca": 4, "clusters": 4, "neighbours": 12, "segmentation": 4}


# ----------------------------------------------------------------------------------------------------------------
# Training curves


def plot_training_curves(history: list[dict[str, float]], path: Path) -> Path:
    """Plot the logged terms against the step into a PNG (one panel per term)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(12, 6.5), constrained_layout=True)
    steps = [row["step"] for row in history]
    for ax, (key, title) in zip(axes.flat, CURVE_KEYS):
        values = [row.get(key, float("nan")) for row in history]
        ax.plot(steps, values, marker="." if len(steps) < 60 else None)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.suptitle("cribo training curves")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def load_history(run_dir: Path) -> list[dict[str, float]]:
    """Read log.txt (JSON lines) of a run directory."""
    import json

    log = Path(run_dir) / "log.txt"
    if not log.is_file():
        raise ValueError(f"{log} not found: pass a run directory written by `cribo train`")
    return [json.loads(line) for line in log.read_text().splitlines() if line.strip()]


# ----------------------------------------------------------------------------------------------------------------
# Figure plumbing and colours


def new_figure(width: float, height: float) -> Figure:
    """A constrained-layout ``Figure`` on an Agg canvas (no pyplot, nothing global)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def save_figure(figure: Figure, path: str | Path) -> Path:
    """Write ``figure`` as a PNG (parent folders created); returns the path."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"--output must be a .png file, got {str(path)!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=FIGURE_DPI)
    return path


def set_title(figure: Figure, text: str) -> None:
    """Figure title, each line wrapped to the figure's width so that nothing is cut off."""
    width = max(20, int(figure.get_figwidth() * TITLE_CHARS_PER_INCH))
    lines = [textwrap.fill(line, width) for line in text.splitlines()]
    figure.suptitle("\n".join(lines), fontsize=10)


def _show(ax: Axes, picture: np.ndarray, title: str | None = None, **title_kwargs: Any) -> None:
    ax.imshow(picture, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    if title is not None:
        ax.set_title(title, fontsize=9, **title_kwargs)


def to_display(images: Tensor) -> np.ndarray:
    """(..., 3, H, W) in [0, 1] -> (..., H, W, 3) float numpy, clipped."""
    return images.detach().float().clamp(0, 1).movedim(-3, -1).cpu().numpy()


def denormalize(images: Tensor, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> Tensor:
    """Undo the views' normalisation: (..., 3, S, S) normalised -> [0, 1]."""
    shape = (3, 1, 1)
    return (images * images.new_tensor(std).view(shape) + images.new_tensor(mean).view(shape)).clamp(0, 1)


def label_colours(labels: np.ndarray | Tensor) -> np.ndarray:
    """(H, W) class labels -> (H, W, 3) uint8 Pascal VOC colours (label 255, ignored, is cream)."""
    from cribo.data.segmentation import voc_palette

    array = labels.cpu().numpy() if isinstance(labels, Tensor) else np.asarray(labels)
    return voc_palette()[array.astype(np.int64).clip(0, 255)]


def cluster_palette(num_clusters: int) -> np.ndarray:
    """(K, 3) distinct non-grey RGB colours in [0, 1] (tab20 without its greys, else an evenly spaced hue wheel)."""
    import matplotlib

    tab20 = matplotlib.colormaps["tab20"].colors  # type: ignore[attr-defined]
    # Saturated entries (even indices) first, then the light ones.
    order = [*range(0, len(tab20), 2), *range(1, len(tab20), 2)]
    colours = [tab20[i] for i in order if i not in TAB20_GREYS]
    if num_clusters <= len(colours):
        return np.asarray(colours[:num_clusters], dtype=np.float64)
    hues = matplotlib.colormaps["hsv"](np.linspace(0.0, 1.0, num_clusters, endpoint=False))
    return np.asarray(hues[:, :3], dtype=np.float64)


def _class_legend(figure: Figure, class_names: Sequence[str], labels: Sequence[int]) -> None:
    from matplotlib.patches import Patch

    colours = label_colours(np.asarray(sorted(set(labels)), dtype=np.int64)) / 255.0
    handles = [Patch(color=colour, label=class_names[label]) for label, colour in zip(sorted(set(labels)), colours)]
    figure.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 7), fontsize=9)


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


@dataclass
class LabelledImages:
    """Images to draw with their names and, when known, ground-truth masks.

    Attributes:
        pixels: (B, 3, H, W) in [0, 1].
        names: one label per image (file name or "scene i").
        masks: (B, H, W) int64 class labels (255 ignored), or None.
        class_names: label names (index = label) when masks are given.
    """

    pixels: Tensor
    names: list[str]
    masks: Tensor | None = None
    class_names: Sequence[str] = ()


def figure_pca(images: LabelledImages, colours: Tensor, explained: Tensor, backbone_label: str) -> Figure:
    """Rows of image | ground truth (when known) | PCA colours (B, h, w, 3) of its patch features."""
    columns = 2 if images.masks is None else 3
    figure = new_figure(PANEL_INCHES * columns, PANEL_INCHES * len(images.names) + 0.9)
    axes = figure.subplots(len(images.names), columns, squeeze=False)
    pictures = to_display(images.pixels)
    for row, name in enumerate(images.names):
        _show(axes[row, 0], pictures[row], name)
        if images.masks is not None:
            _show(axes[row, 1], label_colours(images.masks[row]), "ground truth")
        _show(axes[row, -1], colours[row].cpu().numpy(), "PCA → RGB")
    ratios = " / ".join(f"{100 * float(value):.0f}%" for value in explained)
    set_title(
        figure,
        f"{backbone_label}\nfirst 3 principal components of the patch features → RGB\n"
        f"(fitted on all shown patches; variance {ratios})",
    )
    if images.masks is not None:
        _class_legend(figure, images.class_names, images.masks.unique().tolist())
    return figure


# ----------------------------------------------------------------------------------------------------------------
# Object clusters of two views


def cluster_colours(cluster_map: Tensor, valid: Tensor) -> np.ndarray:
    """Colour of each patch's cluster: one palette colour per cluster, ``DROPPED_GREY`` for dropped ones.

    Args:
        cluster_map: (...) int64 cluster index in [0, K) of each patch, e.g. (h, w).
        valid: (K,) bool, False for clusters empty in either view (discarded as objects).

    Returns:
        (..., 3) float64 RGB in [0, 1].
    """
    colours = cluster_palette(valid.shape[0])
    colours[~valid.cpu().numpy().astype(bool)] = DROPPED_GREY
    return colours[cluster_map.cpu().numpy()]


def upsample_labels(labels: np.ndarray, size: int) -> np.ndarray:
    """(h, w) patch labels -> (size, size) pixel labels (nearest; ``size`` a multiple of h and w)."""
    return np.repeat(np.repeat(labels, size // labels.shape[0], axis=0), size // labels.shape[1], axis=1)


def label_edges(labels: np.ndarray) -> np.ndarray:
    """(H, W) labels -> (H, W) bool, True on pixels whose right or lower neighbour has another label."""
    edges = np.zeros(labels.shape, dtype=bool)
    edges[:, :-1] |= labels[:, 1:] != labels[:, :-1]
    edges[:-1, :] |= labels[1:, :] != labels[:-1, :]
    return edges


def overlay_clusters(view: np.ndarray, cluster_map: Tensor, valid: Tensor) -> np.ndarray:
    """Blend cluster colours over a view: kept clusters half transparent, dropped ones greyed out, white edges.

    Args:
        view: (S, S, 3) float RGB in [0, 1].
        cluster_map: (h, w) int64 cluster of each patch of the view.
        valid: (K,) bool kept clusters.

    Returns:
        (S, S, 3) float RGB in [0, 1].
    """
    size = view.shape[0]
    labels = upsample_labels(cluster_map.cpu().numpy(), size)
    colours = upsample_labels(cluster_colours(cluster_map, valid), size)
    keep = valid.cpu().numpy().astype(bool)[labels]
    weight = np.where(keep, CLUSTER_ALPHA, DROPPED_ALPHA)[..., None]
    blended = (1.0 - weight) * view + weight * colours
    blended[label_edges(labels)] = EDGE_COLOUR
    return blended


@dataclass
class ClusterPicture:
    """What ``figure_clusters`` draws for B images.

    Attributes:
        originals: (B, 3, H, W) source images in [0, 1].
        views: (B, V=2, 3, S, S) views in [0, 1].
        cluster_maps: (B, V=2, h, w) int64 cluster of every patch of each view.
        valid: (B, K) bool, clusters present in both views (the objects).
        boxes: crop box of each view, per image.
        names: one label per image.
    """

    originals: Tensor
    views: Tensor
    cluster_maps: Tensor
    valid: Tensor
    boxes: Sequence[tuple[CropBox, CropBox]]
    names: Sequence[str]


def _draw_boxes(ax: Axes, boxes: tuple[CropBox, CropBox]) -> None:
    from matplotlib.patches import Rectangle

    for box, (colour, style) in zip(boxes, VIEW_BOX_STYLES):
        corner = (box.left - 0.5, box.top - 0.5)
        ax.add_patch(Rectangle(corner, box.width, box.height, fill=False, edgecolor=colour, linestyle=style, lw=2))


def _cluster_legend(figure: Figure) -> None:
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    handles = [
        Line2D([], [], color=VIEW_BOX_STYLES[0][0], linestyle=VIEW_BOX_STYLES[0][1], lw=2, label="crop of view 1"),
        Line2D([], [], color=VIEW_BOX_STYLES[1][0], linestyle=VIEW_BOX_STYLES[1][1], lw=2, label="crop of view 2"),
        Patch(color=DROPPED_GREY, label="dropped: cluster empty in one view"),
    ]
    figure.legend(handles=handles, loc="outside lower center", ncol=3, fontsize=9)


def figure_clusters(picture: ClusterPicture, title: str) -> Figure:
    """Rows of original (with both crop boxes) | view 1 | view 2, the views overlaid with their clusters."""
    rows = len(picture.names)
    figure = new_figure(PANEL_INCHES * 3, PANEL_INCHES * rows + 1.1)
    axes = figure.subplots(rows, 3, squeeze=False)
    originals, views = to_display(picture.originals), to_display(picture.views)
    for row in range(rows):
        valid = picture.valid[row]
        kept = int(valid.sum())
        _show(axes[row, 0], originals[row], picture.names[row])
        _draw_boxes(axes[row, 0], picture.boxes[row])
        for view in range(2):
            flipped = " (flipped)" if picture.boxes[row][view].flipped else ""
            overlay = overlay_clusters(views[row, view], picture.cluster_maps[row, view], valid)
            _show(axes[row, 1 + view], overlay, f"view {view + 1}{flipped}")
        axes[row, 0].set_ylabel(f"{kept} objects, {valid.numel() - kept} dropped", fontsize=9)
    set_title(figure, title)
    _cluster_legend(figure)
    return figure


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


def highlight_object(view: np.ndarray, cluster_map: Tensor, cluster: int) -> np.ndarray:
    """A view with one object's patches highlighted: the rest dimmed, the object outlined.

    Args:
        view: (S, S, 3) float RGB in [0, 1].
        cluster_map: (h, w) int64 cluster of each patch.
        cluster: the object's cluster index.

    Returns:
        (S, S, 3) float RGB in [0, 1].
    """
    inside = upsample_labels((cluster_map == cluster).cpu().numpy(), view.shape[0])
    picture = np.where(inside[..., None], view, DIM_FACTOR * view)
    outline = label_edges(inside)
    outline[:, 1:] |= outline[:, :-1]  # edges are marked on one side: thicken them to both
    outline[1:, :] |= outline[:-1, :]
    picture[outline] = OBJECT_OUTLINE
    return picture


@dataclass
class NeighbourPicture:
    """What ``figure_neighbours`` draws.

    Attributes:
        views: (B, 3, S, S) the matched view of every image, in [0, 1].
        cluster_maps: (B, h, w) int64 cluster of each patch of that view.
        neighbours: the matches of the query objects.
        shown: indices (into the query objects) of the pairs to draw.
        names: one label per image.
    """

    views: Tensor
    cluster_maps: Tensor
    neighbours: ObjectNeighbours
    shown: Sequence[int]
    names: Sequence[str]


def _draw_pair(axes: tuple[Axes, Axes], picture: NeighbourPicture, views: np.ndarray, item: int) -> None:
    found = picture.neighbours
    query, neighbour = int(found.query_image[item]), int(found.neighbour_image[item])
    query_cluster, neighbour_cluster = int(found.query_cluster[item]), int(found.neighbour_cluster[item])
    consistent = bool(found.consistent[item])
    _show(axes[0], highlight_object(views[query], picture.cluster_maps[query], query_cluster))
    axes[0].set_title(f"query: {picture.names[query]}\nobject {query_cluster}", fontsize=9)
    _show(axes[1], highlight_object(views[neighbour], picture.cluster_maps[neighbour], neighbour_cluster))
    verdict = "cycle-consistent" if consistent else "not cycle-consistent"
    axes[1].set_title(
        f"NN: {picture.names[neighbour]}, object {neighbour_cluster}\ncos {float(found.similarity[item]):.2f}, "
        f"{verdict}",
        fontsize=9,
        color=CONSISTENT_COLOUR if consistent else INCONSISTENT_COLOUR,
    )


def figure_neighbours(picture: NeighbourPicture, title: str, pairs_per_row: int = 2) -> Figure:
    """Query object | its nearest object in another image, ``pairs_per_row`` pairs per row (spacer between)."""
    if not picture.shown:
        raise ValueError("no pair to draw: shown is empty")
    rows = math.ceil(len(picture.shown) / pairs_per_row)
    ratios = [r for pair in range(pairs_per_row) for r in ((0.2,) if pair else ()) + (1.0, 1.0)]
    figure = new_figure(PANEL_INCHES * (len(ratios) - 0.8 * (pairs_per_row - 1)), (PANEL_INCHES + 0.3) * rows + 0.8)
    axes = figure.subplots(rows, len(ratios), squeeze=False, gridspec_kw={"width_ratios": ratios})
    for ax in axes.flat:
        ax.set_axis_off()
    views = to_display(picture.views)
    for slot, item in enumerate(picture.shown):
        row, pair = divmod(slot, pairs_per_row)
        first = 3 * pair
        for ax in axes[row, first : first + 2]:
            ax.set_axis_on()
        _draw_pair((axes[row, first], axes[row, first + 1]), picture, views, item)
    consistent = int(picture.neighbours.consistent.sum())
    total = picture.neighbours.consistent.numel()
    set_title(figure, f"{title}\n{consistent} of {total} query objects cycle-consistent")
    return figure


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


def figure_segmentation(images: LabelledImages, predictions: Tensor, title: str) -> Figure:
    """Rows of image | ground truth | prediction, with each image's pixel accuracy and a class legend."""
    rows = len(images.names)
    figure = new_figure(PANEL_INCHES * 3, PANEL_INCHES * rows + 1.1)
    axes = figure.subplots(rows, 3, squeeze=False)
    pictures = to_display(images.pixels)
    shown = set(predictions.unique().tolist())
    for row, name in enumerate(images.names):
        _show(axes[row, 0], pictures[row], name)
        caption = "prediction"
        if images.masks is None:
            _show(axes[row, 1], np.ones((2, 2, 3)), "ground truth")
            axes[row, 1].text(0.5, 0.5, "not given", ha="center", va="center", transform=axes[row, 1].transAxes)
        else:
            mask = images.masks[row]
            _show(axes[row, 1], label_colours(mask), "ground truth")
            scored = mask != 255
            accuracy = (predictions[row][scored] == mask[scored]).float().mean().item() if scored.any() else math.nan
            caption = f"prediction ({100 * accuracy:.0f}% pixels right)"
            shown |= set(mask.unique().tolist()) - {255}
        _show(axes[row, 2], label_colours(predictions[row]), caption)
    set_title(figure, title)
    _class_legend(figure, images.class_names, sorted(shown))
    return figure


# ----------------------------------------------------------------------------------------------------------------
# Loading: images, backbone, views


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


def load_model(args: argparse.Namespace) -> tuple[VisionTransformer, str, torch.device]:
    """The backbone named by ``--backbone`` on ``--device`` in eval mode, and a label for figure titles."""
    from cribo.hub import load_backbone
    from cribo.runtime import resolve_device

    try:
        backbone, info = load_backbone(
            args.backbone, which=args.which, arch=args.arch, patch_size=args.patch_size, allow_pickle=args.allow_pickle
        )
    except ValueError as err:
        raise ValueError(f"--backbone {args.backbone!r}: {err}") from err
    try:
        device = resolve_device(args.device)
    except RuntimeError as err:
        raise ValueError(f"--device {args.device!r}: {err} (use auto, cpu, cuda, cuda:N, mps, ...)") from err
    network = "" if info.which is None else f", {info.which}"
    shown = "/".join(Path(str(args.backbone)).parts[-2:])  # run folder and file name of a checkpoint
    label = f"{shown} ({info.arch}/{info.patch_size}{network})"
    return backbone.to(device).eval(), label, device


def patch_size_of(backbone: VisionTransformer) -> int:
    return int(backbone.patch_embed.patch_size[0])


def resolve_input_size(input_size: int | None, image_size: int, patch_size: int) -> int:
    """``--input-size`` (checked) or ``image_size`` rounded down to a multiple of the patch size."""
    if input_size is None:
        return max(patch_size, image_size // patch_size * patch_size)
    if input_size < patch_size or input_size % patch_size:
        raise ValueError(f"--input-size must be a positive multiple of the patch size {patch_size}, got {input_size}")
    return input_size


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


def _view_maps(clusters: ClusteringResult, grid: tuple[int, int]) -> Tensor:
    """(B, T) cluster of each token -> (B, V=2, h, w)."""
    return clusters.cluster_of_token.cpu().reshape(-1, 2, *grid)


# ----------------------------------------------------------------------------------------------------------------
# Commands


def command_curves(args: argparse.Namespace) -> Path:
    path = plot_training_curves(
        load_history(Path(args.run_dir)), Path(args.output or Path(args.run_dir) / "curves.png")
    )
    return path


@torch.no_grad()
def command_pca(args: argparse.Namespace) -> Path:
    """``cribo viz pca``: PCA of each image's patch features as RGB, beside the image (and its mask)."""
    from cribo.eval.features import PatchFeatures

    backbone, label, device = load_model(args)
    source = load_images(args.images, args.num_images, args.image_size, args.seed)
    size = resolve_input_size(args.input_size, args.image_size, patch_size_of(backbone))
    pixels = pil_to_pixels(source.images, size)
    features = PatchFeatures(backbone)(pixels.to(device)).float().cpu()  # (B, h, w, D)
    colours, explained = pca_colours(features)
    masks = None if source.masks is None else resize_masks(source.masks, size)
    images = LabelledImages(pixels, source.names, masks, source.class_names)
    path = save_figure(figure_pca(images, colours, explained, label), args.output)
    return path


@torch.no_grad()
def command_clusters(args: argparse.Namespace) -> Path:
    """``cribo viz clusters``: the joint-space clusters of two views of each image, dropped ones greyed out."""
    backbone, label, _ = load_model(args)
    source = load_images(args.images, args.num_images, args.image_size, args.seed)
    view_size = resolve_input_size(args.input_size, args.image_size, patch_size_of(backbone))
    encoded = encode_views(backbone, source.images, view_size, args.seed)
    clusters = cluster_views(encoded, args.n_tokens, args.pos_alpha, args.seed)
    picture = ClusterPicture(
        originals=pil_to_pixels(source.images, args.image_size),
        views=encoded.views,
        cluster_maps=_view_maps(clusters, encoded.grid),
        valid=valid_objects(clusters.assignment).cpu(),
        boxes=encoded.boxes,
        names=source.names,
    )
    title = (
        f"{label}: joint-space clustering of both views (K={args.n_tokens}, pos_alpha={args.pos_alpha:g})\n"
        "same colour in both views = one object"
    )
    path = save_figure(figure_clusters(picture, title), args.output)
    return path


@torch.no_grad()
def command_neighbours(args: argparse.Namespace) -> Path:
    """``cribo viz neighbours``: each query object's nearest object in the other images, with the cycle check."""
    if args.num_queries < 1 or args.max_pairs < 1:
        raise ValueError(f"--num-queries and --max-pairs must be at least 1, got {args.num_queries}, {args.max_pairs}")
    backbone, label, _ = load_model(args)
    source = load_images(args.images, args.num_images, args.image_size, args.seed)
    if len(source.images) <= args.num_queries:
        raise ValueError(f"need more images ({len(source.images)}) than --num-queries ({args.num_queries})")
    view_size = resolve_input_size(args.input_size, args.image_size, patch_size_of(backbone))
    encoded = encode_views(backbone, source.images, view_size, args.seed)
    clusters = cluster_views(encoded, args.n_tokens, args.pos_alpha, args.seed)
    valid = valid_objects(clusters.assignment)
    objects = pool_objects(encoded.tokens, clusters.assignment)
    neighbours = cross_image_neighbours(objects.cpu(), valid.cpu(), args.num_queries, view=0)
    picture = NeighbourPicture(
        views=encoded.views[:, 0],
        cluster_maps=_view_maps(clusters, encoded.grid)[:, 0],
        neighbours=neighbours,
        shown=spread_selection(neighbours.query_image, args.max_pairs),
        names=source.names,
    )
    title = (
        f"{label}: objects of {args.num_queries} query images (view 1) and their cosine nearest object "
        f"among {len(source.images) - args.num_queries} other images (K={args.n_tokens})"
    )
    path = save_figure(figure_neighbours(picture, title), args.output)
    return path


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


def segmentation_sets(args: argparse.Namespace) -> tuple[SegmentationSet, SegmentationSet, list[str]]:
    """Bank (training) set, query set and the query names, from ``--dataset``/``--data-root`` or ``--images``."""
    from cribo.eval.runner import NNEvalOptions, build_datasets

    options = NNEvalOptions(
        dataset=args.dataset,
        data_root=args.data_root,
        scenes_train_images=args.train_images,
        scenes_val_images=args.num_images,
        scenes_image_size=args.image_size,
        scenes_seed=args.seed,
    )
    train_set, val_set = build_datasets(options)
    if args.train_images < 1:
        raise ValueError(f"--train-images must be at least 1, got {args.train_images}")
    bank_set: SegmentationSet = _FirstItems(train_set, args.train_images)
    if args.images:
        source = load_images(args.images, len(args.images), args.image_size, args.seed)
        return bank_set, _UnlabelledImages(source.images, train_set.class_names), source.names
    if args.num_images < 1:
        raise ValueError(f"--num-images must be at least 1, got {args.num_images}")
    queries = _FirstItems(val_set, args.num_images)
    prefix = "scene" if args.dataset == "scenes" else "val image"
    return bank_set, queries, [f"{prefix} {index}" for index in range(len(queries))]


@torch.no_grad()
def command_segmentation(args: argparse.Namespace) -> Path:
    """``cribo viz segmentation``: dense NN retrieval predictions beside the images and their ground truth."""
    from cribo.eval.features import PatchFeatures
    from cribo.eval.metrics import confusion_matrix, segmentation_scores
    from cribo.eval.nn_retrieval import NNConfig, QueryTransform, build_memory_bank, extract_queries

    backbone, label, device = load_model(args)
    bank_set, query_set, names = segmentation_sets(args)
    size = resolve_input_size(args.input_size, args.image_size, patch_size_of(backbone))
    config = NNConfig(input_size=size, k=args.k, search="torch", progress=False)
    feature_fn = PatchFeatures(backbone).to(device).eval()
    bank = build_memory_bank(feature_fn, bank_set, range(len(bank_set)), config, args.seed, device)
    queries = extract_queries(feature_fn, query_set, config, device)
    predictions = torch.stack(retrieval_predictions(bank, queries, config, bank_set.num_classes))
    items = [QueryTransform(size, keep_mask_size=False)(i, *query_set[i]) for i in range(len(query_set))]
    masks = None if args.images else torch.stack([mask for _, mask in items])
    images = LabelledImages(torch.stack([pixels for pixels, _ in items]), names, masks, bank_set.class_names)
    title = f"{label}: dense NN retrieval (k={config.k}) from a bank of {len(bank_set)} training images"
    if masks is not None:
        confusion = confusion_matrix(predictions, masks, bank_set.num_classes)
        title += f"\nmIoU over these {len(names)} images: {100 * segmentation_scores(confusion).miou:.1f}%"
    path = save_figure(figure_segmentation(images, predictions, title), args.output)
    return path


# ----------------------------------------------------------------------------------------------------------------
# Parser


def _add_model_and_input_arguments(parser: argparse.ArgumentParser, kind: str) -> None:
    parser.add_argument("--backbone", required=True, metavar="SPEC", help="checkpoint, .safetensors, random:<arch>")
    parser.add_argument("--which", choices=["teacher", "student"], default="teacher", help="network of a checkpoint")
    parser.add_argument("--arch", help="architecture when the file does not say (vit_small, vit_base, timm name)")
    parser.add_argument("--patch-size", "--patch_size", dest="patch_size", type=int, help="patch size override")
    parser.add_argument("--allow-pickle", action="store_true", help="trust a pickled checkpoint")
    parser.add_argument(
        "--images", nargs="+", metavar="FILE", help="image files instead of the built-in scenes (no ground truth)"
    )
    count = DEFAULT_NUM_IMAGES[kind]
    parser.add_argument("--num-images", type=int, default=count, help=f"built-in scenes to draw [{count}]")
    parser.add_argument("--image-size", type=int, default=DEFAULT_IMAGE_SIZE, help="image side in pixels [96]")
    parser.add_argument("--input-size", type=int, help="network input / view side (default: image size)")
    parser.add_argument("--seed", type=int, default=0, help="scenes, views and cluster seeds [0]")
    parser.add_argument("--output", default=f"runs/viz/{kind}.png", help=f"PNG path [runs/viz/{kind}.png]")
    parser.add_argument("--device", default="auto", help="torch device (auto: accelerator if present) [auto]")


def _add_clustering_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--n-tokens", "--n_tokens", dest="n_tokens", type=int, default=8, help="clusters K [8]")
    parser.add_argument(
        "--pos-alpha", "--pos_alpha", dest="pos_alpha", type=float, default=1.0, help="weight of the spatial cost [1.0]"
    )


def add_viz_parser(commands: Any) -> None:
    """Register ``cribo viz ...``."""
    viz = commands.add_parser("viz", help="pictures: training curves, clusters, neighbours, PCA, segmentations")
    kinds = viz.add_subparsers(dest="viz_command", required=True)
    curves = kinds.add_parser("curves", help="plot log.txt of a run directory")
    curves.add_argument("run_dir")
    curves.add_argument("--output", help="PNG path (default RUN_DIR/curves.png)")
    curves.set_defaults(func=command_curves)

    pca = kinds.add_parser(
        "pca",
        help="first 3 principal components of the patch features as RGB",
        description="Each image beside its patch features' first 3 principal components (fitted on all shown "
        "patches) mapped to RGB, and the ground truth for the built-in scenes.",
    )
    _add_model_and_input_arguments(pca, "pca")
    pca.set_defaults(func=command_pca)

    clusters = kinds.add_parser(
        "clusters",
        help="joint-space clusters (objects) of two views of each image",
        description="Two augmented views (crop and flip) of each image, coloured by the joint-space clustering "
        "of the backbone's patch tokens of both views: what CrIBo's teacher sees as objects. Clusters empty in "
        "either view are dropped (grey).",
    )
    _add_model_and_input_arguments(clusters, "clusters")
    _add_clustering_arguments(clusters)
    clusters.set_defaults(func=command_clusters)

    neighbours = kinds.add_parser(
        "neighbours",
        help="cross-image nearest objects with the cycle-consistency check",
        description="Objects of the first --num-queries images and, beside each, its cosine nearest object among "
        "the other images' objects (a memory bank, as in training), with the cycle-consistency check's outcome.",
    )
    _add_model_and_input_arguments(neighbours, "neighbours")
    _add_clustering_arguments(neighbours)
    neighbours.add_argument("--num-queries", type=int, default=2, help="leading images used as queries [2]")
    neighbours.add_argument("--max-pairs", type=int, default=8, help="query objects drawn [8]")
    neighbours.set_defaults(func=command_neighbours)

    segmentation = kinds.add_parser(
        "segmentation",
        help="dense NN retrieval predictions next to the ground truth",
        description="Validation images, their ground truth and the dense nearest-neighbour retrieval prediction "
        "(the `cribo eval nn` protocol) from a bank of --train-images labelled training images. With --images, "
        "those files are labelled from the dataset's bank (no ground truth).",
    )
    _add_model_and_input_arguments(segmentation, "segmentation")
    segmentation.add_argument("--dataset", choices=["scenes", "voc", "ade20k", "folder"], default="scenes")
    segmentation.add_argument("--data-root", help="dataset folder (voc, ade20k, folder)")
    segmentation.add_argument("--train-images", type=int, default=32, help="training images in the bank [32]")
    segmentation.add_argument("--k", type=int, default=30, help="neighbours per patch [30]")
    segmentation.set_defaults(func=command_segmentation)
