"""Shared helpers of the quality benchmarks (``bench_regression.py``, ``bench_ablation.py``, ``bench_scenes.py``).

What is measured: dense features of a backbone on the built-in synthetic scenes, scored with the evaluation
suite's own code (``cribo.eval.nn_retrieval.evaluate_nn`` for dense nearest-neighbour retrieval and
``cribo.eval.linear_seg.evaluate_linear`` for a linear probe), plus the training logs of short pretraining runs
built with the library's ``build_trainer`` / ``fit``.

Ablation variants are plain configuration overrides of the loss weights (``LossConfig.weight_global``,
``weight_object``, ``weight_cross_image``); "random init" is the teacher before the first step (the same
weights every trained variant of that seed starts from, so differences between variants are paired by seed).

Scales: ``quick`` (seconds; the tests), ``cpu`` (the tiny-cpu preset, 768 steps, about 5 minutes per run on a
quiet 2-core machine) and ``cuda`` (ViT-S/16 at 224 px, meant to separate the variants on one GPU).

Importing this module has no side effects.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import common

BENCH_DIR = common.BENCH_DIR
REPO_ROOT = common.REPO_ROOT
RESULTS_DIR = common.RESULTS_DIR
QUICK_DIR = common.QUICK_DIR
RUNS_DIR = REPO_ROOT / "runs" / "quality"  # gitignored

# Two-sided 95 % Student-t quantiles t_{0.975, df} (df = seeds - 1); beyond the table the normal 1.96.
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}
T_975.update({12: 2.179, 15: 2.131, 20: 2.086, 30: 2.042})


# ------------------------------------------------------------------------------------------------ scales


@dataclass(frozen=True)
class EvalSettings:
    """The evaluation data and protocol of one scale (scenes seed fixed: every backbone sees the same images)."""

    train_images: int  # bank (NN) and probe-training (linear) scenes of the "train" split
    val_images: int  # held-out scenes of the "val" split
    image_size: int  # side of the generated scenes
    input_size: int  # network input side (multiple of the patch)
    linear_steps: int
    scenes_seed: int = 0
    k: int = 30  # neighbours per query patch (protocol)
    temperature: float = 0.02  # protocol
    batch_size: int = 16


@dataclass(frozen=True)
class Scale:
    """Training overrides (applied on top of ``preset``) and the evaluation of one benchmark scale."""

    name: str
    preset: str | None
    overrides: dict[str, Any]
    evaluation: EvalSettings
    description: str


QUICK_OVERRIDES: dict[str, Any] = {
    "arch": "vit_tiny",
    "patch_size": 8,
    "depth": 1,
    "out_dim": 64,
    "out_dim_c": 64,
    "head_hidden_dim": 64,
    "head_bottleneck_dim": 32,
    "image_size": 32,
    "scenes_num_images": 16,
    "scenes_image_size": 48,
    "num_workers": 0,
    "n_tokens": 4,
    "queue_size": 12,
    "epochs": 2,
    "batch_size_per_gpu": 4,
    "lr": 5e-2,  # per 256 images: 8e-4 per step at batch 4, so that the teacher moves within 8 steps
    "momentum_teacher": 0.9,
    "warmup_epochs": 1,
    "warmup_teacher_temp_epochs": 1,
    "teacher_temp": 0.04,
    "teacher_temp_c": 0.04,
    "device": "cpu",
    "precision": "fp32",
    "log_every": 1,
    "checkpoint_every": 0,
    "saveckp_freq": 0,
}

# The tiny-cpu preset as it is (the issue-13 regime: 4-block ViT-Tiny/8 on 64-px views of 96-px scenes, K=8,
# 1024 scenes in batches of 16 = 64 steps per epoch, 12 epochs = 768 steps, lr 5e-3 per 256 images, teacher
# momentum 0.99); only logging and checkpointing differ. Warm-up and the frozen last layer take the first epoch,
# the cross-image term runs from step 64 on. Before issue 13 this scale ran 192 steps (6 epochs of 512 scenes):
# there no variant's dense NN mIoU moved more than 0.015 away from the random init.
CPU_OVERRIDES: dict[str, Any] = {
    "log_every": 4,
    "checkpoint_every": 64,
    "device": "cpu",
}

# ViT-S/16 on 224-px views of 224-px scenes: 8192 scenes in batches of 64 = 128 steps per epoch, 25 epochs =
# 3200 steps. Estimated (not measured: no GPU was available when this was written) at about 10 minutes per run
# on one current GPU: ~7.6 PFLOP of bf16 training is 1-2 minutes, and generating 205k scenes of 224 px on the
# fly (~30 ms each) on 8 loader workers is about 10 minutes, so the scene generator sets the pace.
CUDA_OVERRIDES: dict[str, Any] = {
    "arch": "vit_small",
    "patch_size": 16,
    "depth": 0,
    "out_dim": 4096,
    "out_dim_c": 4096,
    "head_hidden_dim": 2048,
    "head_bottleneck_dim": 256,
    "drop_path_rate": 0.1,
    "image_size": 224,
    "scenes_num_images": 8192,
    "scenes_image_size": 224,
    "num_workers": 8,
    "n_tokens": 16,
    "queue_size": 4096,
    "epochs": 25,
    "batch_size_per_gpu": 64,
    "warmup_epochs": 2,
    "warmup_teacher_temp_epochs": 2,
    "clip_grad": 3.0,
    "lr": 1e-3,  # per 256 images: 2.5e-4 per step at batch 64 (a short run takes a larger step than 5e-4)
    "teacher_temp": 0.04,  # held at 0.04: 0.07 made the image-level teacher uniform in the pilot (issue 5)
    "teacher_temp_c": 0.04,
    "device": "cuda",
    "precision": "auto",
    "log_every": 16,
    "checkpoint_every": 500,
    "saveckp_freq": 0,
}

SCALES: dict[str, Scale] = {
    "quick": Scale(
        "quick",
        None,
        QUICK_OVERRIDES,
        EvalSettings(train_images=8, val_images=4, image_size=48, input_size=48, linear_steps=20),
        "smoke test: 1-block ViT-Tiny/8 on 32-px views; numbers mean nothing",
    ),
    "cpu": Scale(
        "cpu",
        "tiny-cpu",
        CPU_OVERRIDES,
        EvalSettings(train_images=300, val_images=100, image_size=96, input_size=96, linear_steps=500),
        "tiny-cpu preset (4-block ViT-Tiny/8, 64-px views of 96-px scenes, K=8, batch 16, lr 5e-3 per 256 images, "
        "teacher momentum 0.99)",
    ),
    "cuda": Scale(
        "cuda",
        None,
        CUDA_OVERRIDES,
        EvalSettings(train_images=1000, val_images=300, image_size=224, input_size=224, linear_steps=1000),
        "ViT-S/16, 224-px views of 224-px scenes, K=16, batch 64 (about 10 min per run on a GPU, estimated)",
    ),
}


def scale_for(quick: bool, device: str) -> Scale:
    """``quick`` for --quick, ``cuda`` for a CUDA device, else ``cpu``."""
    if quick:
        return SCALES["quick"]
    return SCALES["cuda"] if device.startswith("cuda") else SCALES["cpu"]


# ------------------------------------------------------------------------------------------------ variants


@dataclass(frozen=True)
class Variant:
    """One ablation arm: loss-term weights (``None`` = no training: the random initialisation)."""

    name: str
    label: str
    weights: dict[str, float] | None


VARIANTS: dict[str, Variant] = {
    "random": Variant("random", "random init", None),
    "dino": Variant("dino", "DINO-only (global loss)", {"weight_object": 0.0, "weight_cross_image": 0.0}),
    "no_cross_image": Variant("no_cross_image", "CrIBo w/o cross-image", {"weight_cross_image": 0.0}),
    "cribo": Variant("cribo", "CrIBo (full)", {}),
}


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """``["lr=1e-3", "loss.teacher_temp=0.04"]`` -> overrides (values stay strings; the config coerces them)."""
    overrides: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--set {item!r}: expected FIELD=VALUE (e.g. lr=1e-3)")
        key, value = item.split("=", 1)
        overrides[key.strip()] = value.strip()
    return overrides


def parse_scene_options(items: Sequence[str]) -> dict[str, Any]:
    """``["class_cue=texture", "period_px=3.5,8", "plain_background=true"]`` -> keyword arguments of
    ``SyntheticScenes`` (YAML scalars; a comma makes a tuple)."""
    import yaml

    options: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--scenes {item!r}: expected NAME=VALUE (e.g. class_cue=texture)")
        key, value = (part.strip() for part in item.split("=", 1))
        parts = [yaml.safe_load(v) for v in value.split(",")]
        options[key] = tuple(parts) if len(parts) > 1 else parts[0]
    return options


@contextlib.contextmanager
def scene_options(options: dict[str, Any]) -> Iterator[None]:
    """Within the block, every ``SyntheticScenes`` the library builds (training images, evaluation scenes) takes
    ``options`` as its keyword defaults; the class is restored on exit. Benchmark-only: the library itself
    always builds the generator's defaults, and this is how the scene search (issue 13) screened other scenes
    without a configuration field for each generator option."""
    import cribo.data.scenes as scenes_module

    original = scenes_module.SyntheticScenes
    if not options:
        yield
        return
    original("train", 0, **options)  # unknown or invalid options fail here, before any run starts

    class ScreenedScenes(original):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **{**options, **kwargs})

    scenes_module.SyntheticScenes = ScreenedScenes  # type: ignore[misc]
    try:
        yield
    finally:
        scenes_module.SyntheticScenes = original  # type: ignore[misc]


def training_config(
    scale: Scale,
    output_dir: Path,
    seed: int,
    device: str,
    threads: int,
    extra: dict[str, Any] | None = None,
) -> Any:
    """The resolved ``TrainConfig`` of one run: preset, scale overrides, then ``extra`` (variant, --set, ...)."""
    from cribo import config as config_lib

    overrides = dict(scale.overrides)
    overrides.update({"output_dir": str(output_dir), "seed": seed, "device": device, "threads": threads})
    overrides.update(extra or {})
    return config_lib.resolve(preset=scale.preset, overrides=overrides)


def steps_per_run(config: Any) -> int:
    """Global steps of a run: epochs x full batches per epoch, capped by ``max_steps``."""
    total = config.optim.epochs * (config.data.scenes_num_images // config.optim.batch_size_per_gpu)
    return min(total, config.run.max_steps) if config.run.max_steps else total


# ------------------------------------------------------------------------------------------------ evaluation


@dataclass
class EvalData:
    """The evaluation scenes (built once per process) and where features are computed."""

    settings: EvalSettings
    train_set: Any
    val_set: Any
    device: Any

    @classmethod
    def build(cls, settings: EvalSettings, device: str) -> EvalData:
        import torch

        from cribo.data.segmentation import ScenesSegmentation

        train = ScenesSegmentation("train", settings.train_images, settings.image_size, settings.scenes_seed)
        val = ScenesSegmentation("val", settings.val_images, settings.image_size, settings.scenes_seed)
        return cls(settings, train, val, torch.device(device))

    @property
    def class_names(self) -> tuple[str, ...]:
        return tuple(self.train_set.class_names)


FeatureFn = Callable[[Any], Any]


def no_grad_features(module: Any) -> FeatureFn:
    """A feature function that never records a graph (the suite calls it outside ``no_grad``)."""
    import torch

    def features(images: Any) -> Any:
        with torch.no_grad():
            return module(images)

    return features


def backbone_features(backbone: Any, device: Any) -> FeatureFn:
    """Last-block patch tokens of a ViT (the suite's ``PatchFeatures``, ImageNet pixel statistics)."""
    from cribo.eval.features import PatchFeatures

    return no_grad_features(PatchFeatures(backbone).to(device).eval())


def scores_dict(scores: Any, class_names: Sequence[str]) -> dict[str, Any]:
    """mIoU (present classes), pixel accuracy and per-class IoU (None where 0/0) of a ``SegmentationScores``."""
    return {
        "miou": float(scores.miou),
        "pixel_accuracy": float(scores.pixel_accuracy),
        "per_class_iou": {
            name: (None if value is None or math.isnan(value) else float(value))
            for name, value in zip(class_names, scores.per_class_iou)
        },
    }


def object_class_miou(scores: dict[str, Any], background: str = "background") -> float:
    """Mean IoU over the object classes only (the background class left out; classes absent from both skipped)."""
    values = [v for name, v in scores["per_class_iou"].items() if name != background and v is not None]
    return sum(values) / len(values) if values else math.nan


def predicts_background_only(scores: dict[str, Any], background: str = "background") -> bool:
    """True when every object class has IoU 0 (a probe that labels every pixel as background)."""
    values = [v for name, v in scores["per_class_iou"].items() if name != background and v is not None]
    return bool(values) and all(v == 0 for v in values)


def nn_scores(feature_fn: FeatureFn, data: EvalData) -> dict[str, Any]:
    """Dense NN retrieval (deterministic bank of every training scene, k = 30, temperature 0.02)."""
    from cribo.eval.nn_retrieval import NNConfig, evaluate_nn

    settings = data.settings
    config = NNConfig(
        input_size=settings.input_size,
        k=settings.k,
        temperature=settings.temperature,
        mode="deterministic",
        batch_size=settings.batch_size,
        progress=False,
    )
    started = time.perf_counter()
    run = evaluate_nn(feature_fn, data.train_set, data.val_set, config, device=data.device)[0]
    return {**scores_dict(run.scores, data.class_names), "seconds": time.perf_counter() - started}


def linear_scores(feature_fn: FeatureFn, data: EvalData, seed: int = 0) -> dict[str, Any]:
    """Linear probe (BatchNorm + 1x1 conv on frozen features, Adam + poly decay), scored on the val scenes."""
    from cribo.eval.linear_seg import LinearConfig, SegEvalSettings, evaluate_linear
    from cribo.eval.metrics import segmentation_scores

    settings = data.settings
    config = LinearConfig(
        input_size=settings.input_size,
        steps=settings.linear_steps,
        batch_size=16,
        extract_batch_size=settings.batch_size,
        seed=seed,
        progress=False,
    )
    evaluation = SegEvalSettings(settings.input_size, "resize", batch_size=settings.batch_size, progress=False)
    started = time.perf_counter()
    result = evaluate_linear(feature_fn, data.train_set, data.val_set, config, evaluation, device=data.device)
    scores = segmentation_scores(result.confusion)
    return {**scores_dict(scores, data.class_names), "seconds": time.perf_counter() - started}


def evaluate_backbone(backbone: Any, data: EvalData, linear: bool) -> dict[str, Any]:
    """``{"nn": scores, "linear": scores | None}`` of a ViT backbone's last-block patch tokens."""
    features = backbone_features(backbone, data.device)
    return {"nn": nn_scores(features, data), "linear": linear_scores(features, data) if linear else None}


# ------------------------------------------------------------------------------------------------ training


@dataclass
class RunRecord:
    """What one pretraining run produced: evaluations by global step and the logged history."""

    variant: str
    seed: int
    steps: int
    evals: dict[int, dict[str, Any]] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0
    complete: bool = False
    settings: dict[str, Any] = field(default_factory=dict)
    threads: int = 0  # torch CPU threads of the process that trained it (0 = not recorded)
    load_average: list[float] = field(default_factory=list)  # os.getloadavg() when its training (re)started

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["evals"] = {str(step): value for step, value in self.evals.items()}
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RunRecord:
        data = dict(data)
        data["evals"] = {int(step): value for step, value in data["evals"].items()}
        return cls(**data)

    def final(self) -> dict[str, Any]:
        return self.evals[max(self.evals)]


def eval_schedule(total_steps: int, every: int) -> list[int]:
    """The global steps after which the teacher is evaluated (always including the last)."""
    stops = list(range(every, total_steps, every)) if every > 0 else []
    return [*stops, total_steps]


def load_record(path: Path, settings: dict[str, Any]) -> RunRecord | None:
    """A saved record whose settings match (a resumed or finished run), else None."""
    if not path.is_file():
        return None
    record = RunRecord.from_json(json.loads(path.read_text()))
    return record if record.settings == settings else None


def save_record(record: RunRecord, path: Path) -> None:
    """Write the record atomically."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record.to_json(), indent=1, allow_nan=True))
    tmp.replace(path)


def train_and_evaluate(
    config: Any,
    variant: str,
    data: EvalData,
    eval_every: int,
    settings: dict[str, Any],
    log: Callable[[str], None],
    linear: bool = True,
) -> RunRecord:
    """Pretrain with the library's loop, evaluating the teacher at step 0 and every ``eval_every`` steps.

    The run lives in ``config.run.output_dir`` (checkpoint.pth, log.txt, quality.json); an interrupted run
    resumes from its checkpoint and keeps the evaluations already saved. Step 0 is the random initialisation
    (NN and, with ``linear``, the linear probe); intermediate steps get NN only; the last step NN and linear.
    """
    import torch

    from cribo.train import build_trainer, fit

    output_dir = Path(config.run.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / "quality.json"
    total = steps_per_run(config)
    record = load_record(path, settings) or RunRecord(variant, config.run.seed, total, settings=settings)
    if record.complete:
        return record
    started = time.perf_counter() - record.seconds
    record.threads = torch.get_num_threads()
    record.load_average = [round(x, 2) for x in os.getloadavg()]
    trainer = build_trainer(config)
    if 0 not in record.evals:
        record.evals[0] = evaluate_backbone(trainer.modules.teacher.backbone, data, linear=linear)
        save_record(record, path)
    for stop in eval_schedule(total, eval_every if variant != "random" else 0):
        if variant == "random" or stop in record.evals:
            continue
        trainer.config = dataclasses.replace(config, run=dataclasses.replace(config.run, max_steps=stop))
        result = fit(trainer, progress_bar=False)
        record.history = [dict(row) for row in result.history]
        final = linear and result.step >= total
        record.evals[result.step] = evaluate_backbone(trainer.modules.teacher.backbone, data, linear=final)
        record.seconds = time.perf_counter() - started
        save_record(record, path)
        log(
            f"{variant} seed {config.run.seed}: step {result.step}/{total}, NN mIoU "
            f"{record.evals[result.step]['nn']['miou']:.4f}, {record.seconds:.0f} s"
        )
    record.complete = True
    record.seconds = time.perf_counter() - started
    save_record(record, path)
    return record


# ------------------------------------------------------------------------------------------------ statistics


@dataclass(frozen=True)
class Summary:
    """Mean, sample standard deviation and the 95 % Student-t half-width over ``n`` values."""

    mean: float
    std: float
    half_width: float
    n: int

    def text(self, digits: int = 3, interval: bool = True) -> str:
        if self.n == 0:
            return "–"
        core = f"{self.mean:.{digits}f}"
        if self.n < 2:
            return core
        core += f" ± {self.std:.{digits}f}"
        if interval:
            core += f" [{self.mean - self.half_width:.{digits}f}, {self.mean + self.half_width:.{digits}f}]"
        return core


def t_quantile(df: int) -> float:
    """Two-sided 95 % Student-t quantile for ``df`` degrees of freedom (next tabulated df below)."""
    if df < 1:
        return math.nan
    known = [key for key in T_975 if key <= df]
    return T_975[max(known)] if df <= 30 else 1.96


def summarize(values: Sequence[float]) -> Summary:
    """Mean ± sample std and the 95 % interval of the mean (t with n - 1 degrees of freedom)."""
    values = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not values:
        return Summary(math.nan, math.nan, math.nan, 0)
    if len(values) == 1:
        return Summary(values[0], math.nan, math.nan, 1)
    std = statistics.stdev(values)
    return Summary(
        statistics.fmean(values), std, t_quantile(len(values) - 1) * std / math.sqrt(len(values)), len(values)
    )


def seeds_needed(std_difference: float, effect: float, max_seeds: int = 10_000) -> int:
    """Seeds (paired) for a 95 % interval of half-width below ``effect`` given the paired-difference std."""
    if not math.isfinite(std_difference) or effect <= 0:
        return -1
    for n in range(2, max_seeds):
        if t_quantile(n - 1) * std_difference / math.sqrt(n) < effect:
            return n
    return max_seeds


# ------------------------------------------------------------------------------------------------ output


def start(args: Any) -> None:
    """Common start of the quality scripts: default threads (1 with --quick, else 2), INFO logging, torch threads."""
    args.threads = args.threads or (1 if args.quick else 2)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    import torch

    torch.set_num_threads(args.threads)


def results_folder(explicit: Path | None, quick: bool) -> Path:
    """--results-dir, else benchmarks/results (full runs) or a temporary folder (--quick)."""
    folder = explicit or (QUICK_DIR if quick else RESULTS_DIR)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def noise_note(info: dict[str, Any]) -> str:
    """Quality numbers do not depend on the machine's speed; say so when it was busy."""
    busy = max(info["load_average"][:2]) > 1.5
    return (
        "The machine was shared with other jobs (see the load average): that changed only the wall time, not the "
        "numbers, which depend on the seeds alone."
        if busy
        else "Quality numbers depend on the seeds, not on the machine's speed."
    )


def fmt(value: float | None, digits: int = 3) -> str:
    """A table cell ("–" for missing or NaN)."""
    if value is None or not math.isfinite(float(value)):
        return "–"
    return f"{value:.{digits}f}"
