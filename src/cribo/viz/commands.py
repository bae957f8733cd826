"""``cribo viz curves|pca|clusters|neighbours|segmentation``: load the backbone and images
(:mod:`cribo.viz.loading`), compute what is drawn (:mod:`cribo.viz.analysis`), call the figure function
(:mod:`cribo.viz.figures`) and write the PNG. Each command takes its options dataclass (:mod:`cribo.viz.options`)
and returns the path written; the CLI prints it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from cribo.clustering import pool_objects, valid_objects
from cribo.options import add_command, resolve_input_size
from cribo.viz.analysis import (
    cluster_views,
    cross_image_neighbours,
    encode_views,
    patch_size_of,
    pca_colours,
    retrieval_predictions,
    spread_selection,
    view_cluster_maps,
)
from cribo.viz.figures import (
    ClusterPicture,
    LabelledImages,
    NeighbourPicture,
    figure_clusters,
    figure_curves,
    figure_neighbours,
    figure_pca,
    figure_segmentation,
)
from cribo.viz.loading import load_history, load_images, load_model, pil_to_pixels, resize_masks, segmentation_sets
from cribo.viz.options import ClusterOptions, CurvesOptions, NeighbourOptions, PcaOptions, SegmentationOptions

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from cribo.options import SubParsers

FIGURE_DPI = 110


def _write_figure(figure: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=FIGURE_DPI)
    return path


def save_figure(figure: Figure, path: str | Path) -> Path:
    """Write ``figure`` as a PNG (parent folders created); returns the path."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"--output must be a .png file, got {str(path)!r}")
    return _write_figure(figure, path)


def plot_training_curves(history: Sequence[Mapping[str, float]], path: Path) -> Path:
    """Plot the logged terms against the step into an image file (one panel per term); returns the path."""
    return _write_figure(figure_curves(history), Path(path))


def command_curves(options: CurvesOptions) -> Path:
    """``cribo viz curves``: the logged terms of a run directory's log.txt."""
    run_dir = Path(options.run_dir)
    return plot_training_curves(load_history(run_dir), Path(options.output or run_dir / "curves.png"))


@torch.no_grad()
def command_pca(options: PcaOptions) -> Path:
    """``cribo viz pca``: PCA of each image's patch features as RGB, beside the image (and its mask)."""
    from cribo.eval.features import PatchFeatures

    backbone, label, device = load_model(options)
    source = load_images(options.images, options.num_images, options.image_size, options.seed)
    size = resolve_input_size(options, patch_size_of(backbone))
    pixels = pil_to_pixels(source.images, size)
    features = PatchFeatures(backbone)(pixels.to(device)).float().cpu()  # (B, h, w, D)
    colours, explained = pca_colours(features)
    masks = None if source.masks is None else resize_masks(source.masks, size)
    images = LabelledImages(pixels, source.names, masks, source.class_names)
    return save_figure(figure_pca(images, colours, explained, label), options.output)


@torch.no_grad()
def command_clusters(options: ClusterOptions) -> Path:
    """``cribo viz clusters``: the joint-space clusters of two views of each image, dropped ones greyed out."""
    backbone, label, _ = load_model(options)
    source = load_images(options.images, options.num_images, options.image_size, options.seed)
    view_size = resolve_input_size(options, patch_size_of(backbone))
    encoded = encode_views(backbone, source.images, view_size, options.seed)
    clusters = cluster_views(encoded, options.n_tokens, options.pos_alpha, options.seed)
    picture = ClusterPicture(
        originals=pil_to_pixels(source.images, options.image_size),
        views=encoded.views,
        cluster_maps=view_cluster_maps(clusters, encoded.grid),
        valid=valid_objects(clusters.assignment).cpu(),
        boxes=encoded.boxes,
        names=source.names,
    )
    title = (
        f"{label}: joint-space clustering of both views (K={options.n_tokens}, pos_alpha={options.pos_alpha:g})\n"
        "same colour in both views = one object"
    )
    return save_figure(figure_clusters(picture, title), options.output)


@torch.no_grad()
def command_neighbours(options: NeighbourOptions) -> Path:
    """``cribo viz neighbours``: each query object's nearest object in the other images, with the cycle check."""
    num_queries = options.num_queries
    if num_queries < 1 or options.max_pairs < 1:
        raise ValueError(f"--num-queries and --max-pairs must be at least 1, got {num_queries}, {options.max_pairs}")
    backbone, label, _ = load_model(options)
    source = load_images(options.images, options.num_images, options.image_size, options.seed)
    if len(source.images) <= num_queries:
        raise ValueError(f"need more images ({len(source.images)}) than --num-queries ({num_queries})")
    view_size = resolve_input_size(options, patch_size_of(backbone))
    encoded = encode_views(backbone, source.images, view_size, options.seed)
    clusters = cluster_views(encoded, options.n_tokens, options.pos_alpha, options.seed)
    valid = valid_objects(clusters.assignment)
    objects = pool_objects(encoded.tokens, clusters.assignment)
    neighbours = cross_image_neighbours(objects.cpu(), valid.cpu(), num_queries, view=0)
    picture = NeighbourPicture(
        views=encoded.views[:, 0],
        cluster_maps=view_cluster_maps(clusters, encoded.grid)[:, 0],
        neighbours=neighbours,
        shown=spread_selection(neighbours.query_image, options.max_pairs),
        names=source.names,
    )
    title = (
        f"{label}: objects of {num_queries} query images (view 1) and their cosine nearest object "
        f"among {len(source.images) - num_queries} other images (K={options.n_tokens})"
    )
    return save_figure(figure_neighbours(picture, title), options.output)


@torch.no_grad()
def command_segmentation(options: SegmentationOptions) -> Path:
    """``cribo viz segmentation``: dense NN retrieval predictions beside the images and their ground truth."""
    from cribo.eval.features import PatchFeatures
    from cribo.eval.metrics import confusion_matrix, segmentation_scores
    from cribo.eval.nn_retrieval import NNConfig, QueryTransform, build_memory_bank, extract_queries

    backbone, label, device = load_model(options)
    bank_set, query_set, names = segmentation_sets(options)
    size = resolve_input_size(options, patch_size_of(backbone))
    config = NNConfig(input_size=size, k=options.k, search="torch", progress=False)
    feature_fn = PatchFeatures(backbone).to(device).eval()
    bank = build_memory_bank(feature_fn, bank_set, range(len(bank_set)), config, options.seed, device)
    queries = extract_queries(feature_fn, query_set, config, device)
    predictions = torch.stack(retrieval_predictions(bank, queries, config, bank_set.num_classes))
    items = [QueryTransform(size, keep_mask_size=False)(i, *query_set[i]) for i in range(len(query_set))]
    masks = None if options.images else torch.stack([mask for _, mask in items])
    images = LabelledImages(torch.stack([pixels for pixels, _ in items]), names, masks, bank_set.class_names)
    title = f"{label}: dense NN retrieval (k={config.k}) from a bank of {len(bank_set)} training images"
    if masks is not None:
        confusion = confusion_matrix(predictions, masks, bank_set.num_classes)
        title += f"\nmIoU over these {len(names)} images: {100 * segmentation_scores(confusion).miou:.1f}%"
    return save_figure(figure_segmentation(images, predictions, title), options.output)


def add_viz_parser(commands: SubParsers) -> None:
    """Register ``cribo viz curves|pca|clusters|neighbours|segmentation`` (flags from the options classes)."""
    viz = commands.add_parser("viz", help="pictures: training curves, clusters, neighbours, PCA, segmentations")
    kinds = viz.add_subparsers(dest="viz_command", required=True)
    add_command(kinds, "curves", CurvesOptions, command_curves, "plot log.txt of a run directory")
    add_command(
        kinds,
        "pca",
        PcaOptions,
        command_pca,
        "first 3 principal components of the patch features as RGB",
        "Each image beside its patch features' first 3 principal components (fitted on all shown patches) mapped "
        "to RGB, and the ground truth for the built-in scenes.",
    )
    add_command(
        kinds,
        "clusters",
        ClusterOptions,
        command_clusters,
        "joint-space clusters (objects) of two views of each image",
        "Two augmented views (crop and flip) of each image, coloured by the joint-space clustering of the "
        "backbone's patch tokens of both views: what CrIBo's teacher sees as objects. Clusters empty in either view "
        "are dropped (grey).",
    )
    add_command(
        kinds,
        "neighbours",
        NeighbourOptions,
        command_neighbours,
        "cross-image nearest objects with the cycle-consistency check",
        "Objects of the first --num-queries images and, beside each, its cosine nearest object among the other "
        "images' objects (a memory bank, as in training), with the cycle-consistency check's outcome.",
    )
    add_command(
        kinds,
        "segmentation",
        SegmentationOptions,
        command_segmentation,
        "dense NN retrieval predictions next to the ground truth",
        "Validation images, their ground truth and the dense nearest-neighbour retrieval prediction (the "
        "`cribo eval nn` protocol) from a bank of --train-images labelled training images. With --images, those "
        "files are labelled from the dataset's bank (no ground truth).",
    )
