"""Options of ``cribo eval nn|linear|finetune``: one dataclass per evaluation, one flag per field.

The flags are derived by :mod:`cribo.options` (every multi-word flag also takes its underscore spelling:
``--bank-cap`` or ``--bank_cap``); the backbone, device and input-size fields come from
:class:`cribo.options.BackboneOptions`, the data, feature and output fields shared by the three evaluations from
:class:`EvalOptions`, and those of the two trained heads from :class:`SupervisedEvalOptions`.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from fractions import Fraction
from typing import ClassVar, Literal

from cribo.data.segmentation import DatasetName
from cribo.eval.features import PixelNorm
from cribo.eval.finetune import SEGMENTER_LAYERS, DecoderName
from cribo.eval.linear_seg import PROTOCOL_LR, PROTOCOL_WEIGHT_DECAY, EvalMode
from cribo.eval.nn_retrieval import (
    PROTOCOL_INPUT_SIZE,
    PROTOCOL_K,
    PROTOCOL_PASSES,
    PROTOCOL_TEMPERATURE,
    BankMode,
    SearchMethod,
)
from cribo.options import BackboneOptions, option


def parse_fraction(text: str) -> float:
    """``"1/128"``, ``"0.5"`` or ``"1"`` -> float in (0, 1].

    Raises:
        argparse.ArgumentTypeError: ``text`` is not a fraction in (0, 1] (argparse reports it against the flag).
    """
    try:
        value = float(Fraction(text.strip()))
    except (ValueError, ZeroDivisionError) as error:
        raise argparse.ArgumentTypeError(f"{text!r} is not a fraction such as 1/128, 0.125 or 1") from error
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"fraction {text!r} must lie in (0, 1]")
    return value


@dataclass
class EvalOptions(BackboneOptions):
    """Options shared by the three evaluations (data, features, workers, output) beside the backbone's."""

    underscore_flags: ClassVar[bool] = True

    input_size: int | None = option(None, "network input side (default: scenes size, else 512; multiple of patch)")
    dataset: DatasetName = option("scenes", "dataset layout")
    data_root: str | None = option(None, "dataset folder (voc: VOC2012 or its parent; ade20k; folder)")
    train_split: str | None = option(None, "training split (default: voc trainaug if present else train; ...)")
    val_split: str | None = option(None, "validation split (default: val / validation)")
    num_classes: int | None = option(None, "folder layout: number of classes (default classes.txt or max label)")
    scenes_train_images: int = option(64, "scenes: training images")
    scenes_val_images: int = option(16, "scenes: validation images")
    scenes_image_size: int = option(96, "scenes: image side in pixels")
    scenes_seed: int = option(0, "scenes: generator seed")
    layers: int = option(1, "concatenate the patch tokens of the last n blocks")
    pixel_norm: PixelNorm = option("imagenet", "pixel statistics: imagenet (pretraining) or half ([-1,1], mmseg)")
    batch_size: int = option(16, "images per feature-extraction / evaluation batch")
    num_workers: int = option(0, "data-loading worker processes")
    cache_dir: str | None = option(None, "cache extracted features here (keyed by backbone checksum and data)")
    output: str | None = option(None, "result JSON file or folder (default runs/eval/<command>_<dataset>_<time>.json)")
    progress: bool = option(True, "show progress bars")

    def default_input_size(self) -> int:
        """The scenes' image side, else the protocol's 512 px."""
        return self.scenes_image_size if self.dataset == "scenes" else PROTOCOL_INPUT_SIZE


@dataclass
class NNEvalOptions(EvalOptions):
    """``cribo eval nn``: dense nearest-neighbour retrieval (PROTOCOLS.md)."""

    k: int = option(PROTOCOL_K, "neighbours per query patch")
    temperature: float = option(PROTOCOL_TEMPERATURE, "softmax temperature on cosine similarities")
    mode: BankMode = option("deterministic", "bank images: resized once (deterministic) or augmented passes")
    passes: int = option(PROTOCOL_PASSES, "augmented passes over the training images")
    bank_cap: int | None = option(None, "maximum bank rows (protocol 10240000), rare-class-favouring sampling")
    fractions: tuple[float, ...] = option((1.0,), "training fractions, e.g. 1/128 1/64 1/8 1", parse=parse_fraction)
    seeds: tuple[int, ...] = option((0,), "one training subset / augmentation draw per seed (protocol: 0 1 2 3 4)")
    search: SearchMethod = option("auto", "auto (torch on accelerators, faiss on cpu), torch, faiss, faiss-ivf")
    ivf_lists: int = option(1024, "faiss-ivf: number of inverted lists")
    ivf_probe: int = option(32, "faiss-ivf: lists searched per query")
    hungarian: bool = option(False, "Hungarian matching of predicted to true classes before scoring")
    eval_resolution: Literal["input", "original"] = option("input", "score at the input size or original size")
    query_chunk: int = option(16384, "query patches per search call")


@dataclass
class SupervisedEvalOptions(EvalOptions):
    """Options shared by the evaluations that train a head (linear, finetune): scoring mode and seed."""

    eval_mode: EvalMode = option("resize", "resize (to input size) or slide (windows on a short side = input size)")
    slide_stride: int | None = option(None, "slide stride (default input_size * 15/16)")
    seed: int = option(0, "initialisation / sampling / augmentation seed")


@dataclass
class LinearEvalOptions(SupervisedEvalOptions):
    """``cribo eval linear``: 1x1 classifier on frozen patch tokens."""

    steps: int = option(500, "classifier training steps")
    train_batch_size: int = option(16, "images per classifier step")
    lr: float = option(PROTOCOL_LR, "Adam learning rate (polynomial decay)")
    weight_decay: float = option(PROTOCOL_WEIGHT_DECAY, "Adam weight decay")
    mode: Literal["deterministic", "augmented"] = option("deterministic", "training crops: resized or augmented")
    passes: int = option(1, "augmented passes (features extracted once per pass)")
    head_batch_norm: bool = option(True, "BatchNorm before the 1x1 classifier")


@dataclass
class FinetuneEvalOptions(SupervisedEvalOptions):
    """``cribo eval finetune``: backbone and decoder trained together."""

    steps: int = option(50, "training steps")
    train_batch_size: int = option(8, "images per step")
    lr: float = option(1e-4, "backbone AdamW learning rate (polynomial decay)")
    decoder_lr: float = option(1e-3, "decoder AdamW learning rate")
    weight_decay: float = option(0.01, "AdamW weight decay")
    frozen_blocks: int = option(0, "number of first ViT blocks kept frozen (with the patch embedding)")
    decoder: DecoderName = option("linear", "linear (1x1) or mask_transformer (Segmenter)")
    decoder_dim: int = option(192, "mask transformer width")
    decoder_layers: int = option(SEGMENTER_LAYERS, "mask transformer layers")
