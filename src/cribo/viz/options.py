"""Options of ``cribo viz curves|pca|clusters|neighbours|segmentation``: one dataclass per picture, one flag per
field (derived by :mod:`cribo.options`).

The pictures drawn from a backbone share :class:`cribo.options.BackboneOptions` (backbone, device, input size)
with the evaluations, and the image source, seed and output of :class:`VizOptions`.
"""

from __future__ import annotations

from dataclasses import dataclass

from cribo.data.segmentation import DatasetName
from cribo.options import BackboneOptions, Options, option, positional_option

DEFAULT_IMAGE_SIZE = 96  # the built-in scenes' default side


def _output(kind: str) -> str:
    """The ``--output`` field of picture ``kind`` (default ``runs/viz/<kind>.png``)."""
    return option(f"runs/viz/{kind}.png", "PNG path")


@dataclass
class CurvesOptions(Options):
    """``cribo viz curves``: the logged terms of a training run."""

    run_dir: str = positional_option("run directory written by `cribo train` (holds log.txt)")
    output: str | None = option(None, "PNG path (default RUN_DIR/curves.png)")


@dataclass
class VizOptions(BackboneOptions):
    """Options of the pictures drawn from a backbone: where the images come from, seeds, output."""

    input_size: int | None = option(None, "network input / view side (default: image size)")
    images: tuple[str, ...] | None = option(
        None, "image files instead of the built-in scenes (no ground truth)", metavar="FILE"
    )
    num_images: int = option(4, "built-in scenes to draw")
    image_size: int = option(DEFAULT_IMAGE_SIZE, "image side in pixels")
    seed: int = option(0, "scenes, views and cluster seeds")
    output: str = _output("picture")

    def default_input_size(self) -> int:
        """The image side."""
        return self.image_size


@dataclass
class PcaOptions(VizOptions):
    """``cribo viz pca``: the first 3 principal components of the patch features as RGB."""

    output: str = _output("pca")


@dataclass
class ClusterOptions(VizOptions):
    """``cribo viz clusters``: the joint-space clusters of two views of each image."""

    n_tokens: int = option(8, "clusters K", underscore=True)
    pos_alpha: float = option(1.0, "weight of the spatial cost", underscore=True)
    output: str = _output("clusters")


@dataclass
class NeighbourOptions(ClusterOptions):
    """``cribo viz neighbours``: cross-image nearest objects with the cycle-consistency check."""

    num_images: int = option(12, "built-in scenes to draw")
    num_queries: int = option(2, "leading images used as queries")
    max_pairs: int = option(8, "query objects drawn")
    output: str = _output("neighbours")


@dataclass
class SegmentationOptions(VizOptions):
    """``cribo viz segmentation``: dense NN retrieval predictions next to the ground truth."""

    dataset: DatasetName = option("scenes", "dataset of the bank and, without --images, of the shown images")
    data_root: str | None = option(None, "dataset folder (voc, ade20k, folder)")
    train_images: int = option(32, "training images in the bank")
    k: int = option(30, "neighbours per patch")
    output: str = _output("segmentation")
