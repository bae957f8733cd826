"""Pure figure functions: tensors and arrays in, a matplotlib ``Figure`` (or an RGB array) out.

Nothing here reads or writes a file, loads a model or parses flags: :mod:`cribo.viz.commands` loads the inputs,
computes what is drawn (:mod:`cribo.viz.analysis`), calls these and writes the PNG. Every ``Figure`` has its own
Agg canvas (no pyplot, nothing global).

Axis letters: B images, V = 2 views, S view side (pixels), H/W image height/width, h/w patch grid, K clusters,
q query objects.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np
from torch import Tensor

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from cribo.augment import CropBox
    from cribo.viz.analysis import ObjectNeighbours


CURVE_KEYS: tuple[tuple[str, str], ...] = (
    ("d_loss", "global cross-view loss"),
    ("s_loss", "object cross-view loss"),
    ("nn_loss", "cross-image loss"),
    ("bootstrap_centroid_ratio", "cycle-consistent fraction"),
    ("r_cnt", "objects per image"),
    ("images_per_s", "images / s"),
)
CURVES_INCHES = (12.0, 6.5)  # width, height of the training-curves figure
PANEL_INCHES = 2.4  # side of one image panel
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


# ----------------------------------------------------------------------------------------------------------------
# Figure plumbing and colours


def new_figure(width: float, height: float) -> Figure:
    """A constrained-layout ``Figure`` on an Agg canvas (no pyplot, nothing global)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def set_title(figure: Figure, text: str) -> None:
    """Figure title, each line wrapped to the figure's width so that nothing is cut off."""
    width = max(20, int(figure.get_figwidth() * TITLE_CHARS_PER_INCH))
    lines = [textwrap.fill(line, width) for line in text.splitlines()]
    figure.suptitle("\n".join(lines), fontsize=10)


def _show(ax: Axes, picture: np.ndarray, title: str | None = None) -> None:
    ax.imshow(picture, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    if title is not None:
        ax.set_title(title, fontsize=9)


def to_display(images: Tensor) -> np.ndarray:
    """(..., 3, H, W) in [0, 1] -> (..., H, W, 3) float numpy, clipped."""
    return images.detach().float().clamp(0, 1).movedim(-3, -1).cpu().numpy()


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
# Training curves


def figure_curves(history: Sequence[Mapping[str, float]]) -> Figure:
    """The logged terms of a run against the step, one panel per term of ``CURVE_KEYS`` (missing ones blank).

    Args:
        history: one row per logged step, each with ``step`` and the logged terms (``log.txt`` lines).
    """
    figure = new_figure(*CURVES_INCHES)
    axes = figure.subplots(2, 3)
    steps = [row["step"] for row in history]
    for ax, (key, title) in zip(axes.flat, CURVE_KEYS):
        values = [row.get(key, float("nan")) for row in history]
        ax.plot(steps, values, marker="." if len(steps) < 60 else None)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    figure.suptitle("cribo training curves")
    return figure


# ----------------------------------------------------------------------------------------------------------------
# PCA of patch features


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
# Nearest-neighbour segmentation


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
