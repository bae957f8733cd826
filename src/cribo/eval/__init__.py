"""Evaluation of dense features: nearest-neighbour retrieval, linear segmentation, fine-tuning (PROTOCOLS.md).

The cores take a ``FeatureFn`` (images (B, 3, H, W) in [0, 1] -> patch features (B, h, w, D)) so that any
backbone, or a test fake, plugs in; ``cribo.eval.runner`` builds datasets and backbones from plain options
(``cribo.eval.options``), writes the JSON result file and the table; ``cribo.eval.commands`` registers
``cribo eval nn|linear|finetune``.
"""

from __future__ import annotations

from cribo.eval.features import FeatureCache, FeatureFn, PatchFeatures, state_dict_checksum
from cribo.eval.finetune import FinetuneConfig, MaskTransformerDecoder, evaluate_finetune
from cribo.eval.linear_seg import LinearConfig, LinearHead, SegEvalSettings, evaluate_linear, evaluate_segmenter
from cribo.eval.metrics import SegmentationScores, confusion_matrix, intersection_over_union, segmentation_scores
from cribo.eval.nn_retrieval import NNConfig, NNRun, evaluate_nn
from cribo.eval.options import EvalOptions, FinetuneEvalOptions, LinearEvalOptions, NNEvalOptions
from cribo.eval.runner import EvalReport, run_finetune, run_linear, run_nn

__all__ = [
    "EvalOptions",
    "EvalReport",
    "FeatureCache",
    "FeatureFn",
    "FinetuneConfig",
    "FinetuneEvalOptions",
    "LinearConfig",
    "LinearEvalOptions",
    "LinearHead",
    "MaskTransformerDecoder",
    "NNConfig",
    "NNEvalOptions",
    "NNRun",
    "PatchFeatures",
    "SegEvalSettings",
    "SegmentationScores",
    "confusion_matrix",
    "evaluate_finetune",
    "evaluate_linear",
    "evaluate_nn",
    "evaluate_segmenter",
    "intersection_over_union",
    "run_finetune",
    "run_linear",
    "run_nn",
    "segmentation_scores",
    "state_dict_checksum",
]
