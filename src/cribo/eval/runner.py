"""Command-level evaluations: build the datasets and the backbone from plain options, run, write a JSON result
file and format a readable table. ``cribo eval nn|linear|finetune`` map their flags one to one onto the fields
of ``NNEvalOptions`` / ``LinearEvalOptions`` / ``FinetuneEvalOptions`` (``cribo.eval.options``).

Result files hold fractions in [0, 1] (not percent); tables print percent.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from cribo.data.segmentation import (
    ADE20KSegmentation,
    DatasetName,
    DatasetSpec,
    SegmentationSet,
    VOCSegmentation,
    build_segmentation_dataset,
)
from cribo.eval.features import FeatureCache, PatchFeatures, state_dict_checksum
from cribo.eval.finetune import FinetuneConfig, evaluate_finetune
from cribo.eval.linear_seg import LinearConfig, SegEvalSettings, evaluate_linear
from cribo.eval.metrics import SegmentationScores, segmentation_scores
from cribo.eval.nn_retrieval import CacheIdentity, NNConfig, NNRun, evaluate_nn
from cribo.eval.options import (
    EvalOptions,
    FinetuneEvalOptions,
    LinearEvalOptions,
    NNEvalOptions,
    SupervisedEvalOptions,
)
from cribo.options import backbone_from_options, resolve_input_size
from cribo.runtime import resolve_device

logger = logging.getLogger(__name__)


@dataclass
class EvalReport:
    """What a run produced: the JSON payload, where it was written, and the table."""

    payload: dict[str, Any]
    path: Path
    table: str


@dataclass
class _Context:
    train_set: SegmentationSet
    val_set: SegmentationSet
    backbone: nn.Module
    encoder: PatchFeatures
    device: torch.device
    input_size: int
    identity: dict[str, Any]
    cache_id: str


def default_split(dataset: DatasetName, root: str | None, role: Literal["train", "val"]) -> str:
    """The protocol's split for ``role``: VOC trainaug (SBD) when present else train / val; ADE20K training /
    validation; scenes and folder layouts train / val."""
    if dataset == "voc" and role == "train" and root is not None:
        return VOCSegmentation.default_train_split(root)
    if dataset == "ade20k":
        return ADE20KSegmentation.SPLIT_ALIASES[role]
    return role


def build_datasets(options: EvalOptions) -> tuple[SegmentationSet, SegmentationSet]:
    """The training and validation splits selected by ``options``."""
    sets = []
    for role, split, count in (
        ("train", options.train_split, options.scenes_train_images),
        ("val", options.val_split, options.scenes_val_images),
    ):
        spec = DatasetSpec(
            name=options.dataset,
            root=None if options.data_root is None else Path(options.data_root),
            split=split or default_split(options.dataset, options.data_root, role),  # type: ignore[arg-type]
            num_classes=options.num_classes,
            scenes_images=count,
            scenes_image_size=options.scenes_image_size,
            scenes_seed=options.scenes_seed,
        )
        sets.append(build_segmentation_dataset(spec))
    if sets[0].num_classes != sets[1].num_classes:
        inferred = [
            f"{role}: largest label {found[0]} in {found[1]}"
            for role, dataset in zip(("train", "val"), sets)
            if (found := getattr(dataset, "largest_label", None)) is not None
        ]
        advice = (
            f" ({'; '.join(inferred)}); add a classes.txt that lists every class, or pass --num-classes"
            if inferred
            else ""
        )
        raise ValueError(
            f"the train split has {sets[0].num_classes} classes but the val split {sets[1].num_classes}{advice}"
        )
    return sets[0], sets[1]


def _jsonable(value: Any) -> Any:
    """Dataclasses, paths, tuples, tensors and non-finite floats -> plain JSON values (NaN -> null)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {item.name: _jsonable(getattr(value, item.name)) for item in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(key): _jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(item) for item in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, torch.Tensor):
        return _jsonable(value.tolist())
    if isinstance(value, (str, int, bool)) or value is None:
        return value
    return str(value)


def _backbone_identity(options: EvalOptions, backbone: nn.Module, info: object) -> dict[str, Any]:
    described = _jsonable(info) if dataclasses.is_dataclass(info) else {"repr": repr(info)}
    if isinstance(described, dict) and "loaded_keys" in described:
        described["loaded_keys"] = len(described["loaded_keys"])  # the count; the names are the model's own
    return {
        "spec": options.backbone,
        "which": options.which,
        "info": described,
        "state_dict_sha256": state_dict_checksum(backbone),
        "parameters": sum(parameter.numel() for parameter in backbone.parameters()),
    }


def prepare(options: EvalOptions, backbone: tuple[nn.Module, object] | None = None) -> _Context:
    """Datasets, backbone (``cribo.options.backbone_from_options`` unless given), device, feature extractor."""
    if not options.backbone and backbone is None:
        raise ValueError("backbone is required: a checkpoint file, random:<arch>[@<seed>] or timm:<name>[@<seed>]")
    train_set, val_set = build_datasets(options)
    module, info = backbone_from_options(options) if backbone is None else backbone
    device = resolve_device(options.device)
    identity = _backbone_identity(options, module, info)
    encoder = PatchFeatures(module, options.layers, options.pixel_norm).to(device).eval()
    input_size = resolve_input_size(options, encoder.patch_size)
    cache_id = f"{identity['state_dict_sha256']}:layers={options.layers}:pixels={options.pixel_norm}"
    logger.info(
        "eval on %s: %s train / %s val images, %d classes, input %d px",
        device,
        len(train_set),
        len(val_set),
        train_set.num_classes,
        input_size,
    )
    return _Context(train_set, val_set, module, encoder, device, input_size, identity, cache_id)


def scores_dict(scores: SegmentationScores, class_names: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """JSON form of ``SegmentationScores`` with per-class values keyed by class name."""
    return {
        "miou": scores.miou,
        "miou_all_classes": scores.miou_all_classes,
        "pixel_accuracy": scores.pixel_accuracy,
        "miou_averaged_over": scores.averaging_note,
        "matching": scores.matching,
        "per_class_iou": dict(zip(class_names, scores.per_class_iou)),
        "classes_in_ground_truth": [
            name for name, present in zip(class_names, scores.present_in_ground_truth) if present
        ],
        "true_of_predicted": scores.true_of_predicted,
    }


def _payload(command: str, options: EvalOptions, context: _Context, results: dict[str, Any]) -> dict[str, Any]:
    import timm

    import cribo

    return {
        "command": f"cribo eval {command}",
        **results,
        "dataset": {
            "name": options.dataset,
            "num_classes": context.train_set.num_classes,
            "class_names": list(context.train_set.class_names),
            "train_images": len(context.train_set),
            "val_images": len(context.val_set),
        },
        "backbone": context.identity,
        "input_size": context.input_size,
        "config": dataclasses.asdict(options),
        "device": str(context.device),
        "versions": {"cribo": cribo.__version__, "torch": torch.__version__, "timm": timm.__version__},
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def output_path(options: EvalOptions, command: str) -> Path:
    """Where the JSON goes: ``options.output`` (a file, or a folder to put the default name in)."""
    name = f"{command}_{options.dataset}_{datetime.now().strftime('%Y%m%d-%H%M%S')}.json"
    if options.output is None:
        return Path("runs") / "eval" / name
    path = Path(options.output)
    return path / name if path.is_dir() or options.output.endswith(("/", "\\")) else path


def write_json(payload: dict[str, Any], path: Path) -> Path:
    """Write ``payload`` as indented JSON (NaN as null), creating folders; returns the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_jsonable(payload), indent=2, allow_nan=False) + "\n")
    return path


def _percent(value: float | None) -> str:
    return "    -" if value is None or not math.isfinite(value) else f"{100 * value:6.2f}"


def format_table(payload: dict[str, Any], path: Path | None = None) -> str:
    """A readable summary of a result payload: header, runs (nn), per-class IoU, averaging note."""
    dataset = payload["dataset"]
    lines = [
        f"{payload['command']}: {dataset['name']} ({dataset['train_images']} train / {dataset['val_images']} val "
        f"images, {dataset['num_classes']} classes, input {payload['input_size']} px)",
        f"backbone: {payload['backbone']['spec']} ({payload['backbone']['which']}), "
        f"state dict sha256 {payload['backbone']['state_dict_sha256'][:16]}",
    ]
    if "summary" in payload:
        lines.append(f"{'fraction':>10} {'seeds':>6} {'mIoU %':>8} {'± std':>7} {'all-class %':>12} {'bank rows':>10}")
        for row in payload["summary"]:
            lines.append(
                f"{row['fraction']:>10.5g} {len(row['seeds']):>6} {_percent(row['miou_mean']):>8} "
                f"{_percent(row['miou_std']):>7} {_percent(row['miou_all_classes_mean']):>12} {row['bank_rows']:>10}"
            )
    lines.append(f"{'class':<24} {'IoU %':>7}")
    for name, value in payload["per_class_iou"].items():
        lines.append(f"{name[:24]:<24} {_percent(value):>7}")
    lines.append(f"{'mIoU':<24} {_percent(payload['miou']):>7}   ({payload['miou_averaged_over']})")
    lines.append(f"matching: {payload['matching']}; time {payload['timing']['total_s']:.1f} s")
    if path is not None:
        lines.append(f"results: {path}")
    return "\n".join(lines)


def _finish(command: str, options: EvalOptions, payload: dict[str, Any]) -> EvalReport:
    path = write_json(payload, output_path(options, command))
    table = format_table(payload, path)
    logger.info("results written to %s", path)
    return EvalReport(_jsonable(payload), path, table)


def _nn_summary(runs: list[NNRun], class_names: tuple[str, ...] | list[str]) -> list[dict[str, Any]]:
    summary = []
    for fraction in dict.fromkeys(run.fraction for run in runs):
        group = [run for run in runs if run.fraction == fraction]
        mious = torch.tensor([run.scores.miou for run in group], dtype=torch.float64)
        per_class = [
            [value for run in group if (value := run.scores.per_class_iou[c]) is not None]
            for c in range(len(class_names))
        ]
        summary.append(
            {
                "fraction": fraction,
                "seeds": [run.seed for run in group],
                "train_images": group[0].num_train_images,
                "bank_rows": group[0].bank_size,
                "miou_mean": float(mious.mean()),
                "miou_std": float(mious.std(unbiased=False)) if len(group) > 1 else 0.0,
                "miou_all_classes_mean": sum(run.scores.miou_all_classes for run in group) / len(group),
                "per_class_iou_mean": {
                    name: (sum(values) / len(values) if values else None)
                    for name, values in zip(class_names, per_class)
                },
            }
        )
    return summary


def run_nn(options: NNEvalOptions, backbone: tuple[nn.Module, object] | None = None) -> EvalReport:
    """``cribo eval nn``: retrieval mIoU for every fraction x seed; headline = mean over seeds of the largest
    fraction. ``backbone`` = an already loaded ``(module, info)`` pair (else ``options.backbone`` is loaded)."""
    started = time.perf_counter()
    context = prepare(options, backbone)
    config = NNConfig(
        input_size=context.input_size,
        k=options.k,
        temperature=options.temperature,
        mode=options.mode,
        passes=options.passes,
        bank_cap=options.bank_cap,
        search=options.search,
        ivf_lists=options.ivf_lists,
        ivf_probe=options.ivf_probe,
        hungarian=options.hungarian,
        eval_resolution=options.eval_resolution,
        batch_size=options.batch_size,
        query_chunk=options.query_chunk,
        num_workers=options.num_workers,
        progress=options.progress,
    )
    cached = CacheIdentity(FeatureCache(options.cache_dir), context.cache_id) if options.cache_dir else None
    runs = evaluate_nn(
        context.encoder,
        context.train_set,
        context.val_set,
        config,
        options.fractions,
        options.seeds,
        context.device,
        cached,
    )
    names = tuple(context.train_set.class_names)
    summary = _nn_summary(runs, names)
    headline = max(summary, key=lambda row: row["fraction"])
    results = {
        "miou": headline["miou_mean"],
        "miou_all_classes": headline["miou_all_classes_mean"],
        "miou_averaged_over": runs[-1].scores.averaging_note.split(";")[0] + "; mean over seeds of fraction "
        f"{headline['fraction']:g}",
        "matching": runs[-1].scores.matching,
        "per_class_iou": headline["per_class_iou_mean"],
        "summary": summary,
        "runs": [
            {
                "fraction": run.fraction,
                "seed": run.seed,
                "train_images": run.num_train_images,
                "bank_rows": run.bank_size,
                "seconds": run.seconds,
                **scores_dict(run.scores, names),
            }
            for run in runs
        ],
        "search": config.search if config.search != "auto" else ("torch" if context.device.type != "cpu" else "faiss"),
        "timing": {"total_s": time.perf_counter() - started, "cache_hits": cached.cache.hits if cached else 0},
    }
    return _finish("nn", options, _payload("nn", options, context, results))


def _supervised_results(scores: SegmentationScores, names: tuple[str, ...], extra: dict[str, Any]) -> dict[str, Any]:
    return {**scores_dict(scores, names), **extra}


def run_linear(options: LinearEvalOptions, backbone: tuple[nn.Module, object] | None = None) -> EvalReport:
    """``cribo eval linear``: train a 1x1 classifier on frozen features, evaluate mIoU on the val split."""
    started = time.perf_counter()
    context = prepare(options, backbone)
    context.encoder.requires_grad_(False)
    config = LinearConfig(
        input_size=context.input_size,
        steps=options.steps,
        batch_size=options.train_batch_size,
        lr=options.lr,
        weight_decay=options.weight_decay,
        mode=options.mode,
        passes=options.passes,
        batch_norm=options.head_batch_norm,
        extract_batch_size=options.batch_size,
        num_workers=options.num_workers,
        seed=options.seed,
        progress=options.progress,
    )
    settings = _eval_settings(options, context.input_size)
    cache = FeatureCache(options.cache_dir) if options.cache_dir else None
    result = evaluate_linear(
        context.encoder, context.train_set, context.val_set, config, settings, context.device, cache, context.cache_id
    )
    extra = {
        "train_samples": result.num_train_samples,
        "loss_first": result.losses[0],
        "loss_last": result.losses[-1],
        "timing": {**result.seconds, "total_s": time.perf_counter() - started},
    }
    names = tuple(context.train_set.class_names)
    results = _supervised_results(segmentation_scores(result.confusion), names, extra)
    return _finish("linear", options, _payload("linear", options, context, results))


def _eval_settings(options: SupervisedEvalOptions, input_size: int) -> SegEvalSettings:
    return SegEvalSettings(
        input_size, options.eval_mode, options.slide_stride, options.batch_size, options.num_workers, options.progress
    )


def run_finetune(options: FinetuneEvalOptions, backbone: tuple[nn.Module, object] | None = None) -> EvalReport:
    """``cribo eval finetune``: train backbone (minus ``frozen_blocks``) and decoder, evaluate mIoU."""
    started = time.perf_counter()
    context = prepare(options, backbone)
    config = FinetuneConfig(
        input_size=context.input_size,
        steps=options.steps,
        batch_size=options.train_batch_size,
        lr=options.lr,
        decoder_lr=options.decoder_lr,
        weight_decay=options.weight_decay,
        frozen_blocks=options.frozen_blocks,
        decoder=options.decoder,
        decoder_dim=options.decoder_dim,
        decoder_layers=options.decoder_layers,
        num_workers=options.num_workers,
        seed=options.seed,
        progress=options.progress,
    )
    settings = _eval_settings(options, context.input_size)
    result = evaluate_finetune(
        context.encoder, context.encoder.out_dim, context.train_set, context.val_set, config, settings, context.device
    )
    extra = {
        "trainable_backbone_parameters": result.trainable_parameters,
        "loss_first": result.losses[0],
        "loss_last": result.losses[-1],
        "timing": {**result.seconds, "total_s": time.perf_counter() - started},
    }
    names = tuple(context.train_set.class_names)
    results = _supervised_results(segmentation_scores(result.confusion), names, extra)
    return _finish("finetune", options, _payload("finetune", options, context, results))
