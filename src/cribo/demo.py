"""``cribo demo``: pretrain on the built-in scenes, then score what the teacher learned.

The demo trains the ``tiny-cpu`` preset (or any configuration) with the library's own loop, then scores the
teacher's dense features by dense nearest-neighbour retrieval on held-out scenes (the suite's ``run_nn``:
k = 30 neighbours, softmax temperature 0.02) against the same network at its random initialisation (same
seed, hence the same weights the run started from). The printed summary ends with the two mIoUs and their
difference, so a run that learned nothing measurable says so.

Nothing here is specific to the command line: :func:`run_demo` returns a :class:`DemoResult` and
:func:`summary_text` formats it; ``cribo.cli.command_demo`` only parses the flags and prints.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cribo.config import TrainConfig

__all__ = [
    "DEMO_PRESET",
    "DemoEval",
    "DemoResult",
    "NNScore",
    "nn_options",
    "run_demo",
    "score_backbone",
    "summary_text",
]

DEMO_PRESET = "tiny-cpu"
BACKGROUND = "background"  # class 0 of the built-in scenes (cribo.data.scenes)


@dataclass(frozen=True)
class DemoEval:
    """The held-out evaluation: a bank of ``train_scenes`` scenes of the scenes' "train" split (generator seed
    ``scenes_seed``) and ``val_scenes`` scored "val" scenes. The defaults are the CPU quality benchmarks' sizes
    (benchmarks/quality_common.py, scale "cpu"), so the demo's numbers are comparable with BENCHMARKS.md."""

    train_scenes: int = 300
    val_scenes: int = 100
    scenes_seed: int = 0


@dataclass(frozen=True)
class NNScore:
    """Dense NN retrieval of one backbone on the held-out scenes.

    Attributes:
        miou: mIoU over the classes present in the val scenes (background included).
        object_miou: mean IoU over the object classes only (background left out).
        per_class_iou: IoU per class name (None where the class is absent from prediction and truth).
        path: the JSON file ``run_nn`` wrote.
    """

    miou: float
    object_miou: float
    per_class_iou: dict[str, float | None]
    path: Path


@dataclass(frozen=True)
class DemoResult:
    """What :func:`run_demo` produced."""

    evaluation: DemoEval
    output_dir: Path
    epoch: int
    step: int
    history: list[dict[str, float]]
    random_init: NNScore  # the starting weights: the random init, or the --init weights when given
    trained: NNScore
    curves: Path
    baseline: str = "random init of the same seed"  # what ``random_init`` scored


def nn_options(config: TrainConfig, output: Path, evaluation: DemoEval = DemoEval()) -> Any:
    """The retrieval options of the demo's evaluation: the built-in scenes at the pretraining scene size."""
    from cribo.eval import NNEvalOptions

    return NNEvalOptions(
        dataset="scenes",
        scenes_train_images=evaluation.train_scenes,
        scenes_val_images=evaluation.val_scenes,
        scenes_image_size=config.data.scenes_image_size,
        scenes_seed=evaluation.scenes_seed,
        device=config.run.device,
        output=str(output),
        progress=False,
    )


def score_backbone(backbone: Any, config: TrainConfig, output: Path, evaluation: DemoEval = DemoEval()) -> NNScore:
    """Dense NN retrieval of ``backbone`` (a timm ViT) with :func:`nn_options`; the JSON goes to ``output``."""
    from cribo.eval import run_nn
    from cribo.hub import BackboneInfo

    info = BackboneInfo(
        source="cribo",
        arch=config.model.arch,
        patch_size=config.model.patch_size,
        embed_dim=int(backbone.embed_dim),
    )
    report = run_nn(nn_options(config, output, evaluation), backbone=(backbone, info))
    results = report.payload
    per_class = {str(name): value for name, value in results["per_class_iou"].items()}
    objects = [value for name, value in per_class.items() if name != BACKGROUND and value is not None]
    return NNScore(
        miou=float(results["miou"]),
        object_miou=sum(objects) / len(objects) if objects else math.nan,
        per_class_iou=per_class,
        path=report.path,
    )


def run_demo(config: TrainConfig, progress_bar: bool = True, evaluation: DemoEval = DemoEval()) -> DemoResult:
    """Score the starting teacher, pretrain (or resume) with ``config``, score the trained teacher.

    The starting teacher is that of a freshly built trainer of the same seed (its random initialisation, or the
    ``model.init`` weights when given), scored before ``fit`` (which loads a checkpoint when one exists), so the
    comparison is paired: same weights at step 0, same evaluation scenes.
    """
    from cribo.train import apply_init, build_trainer, fit
    from cribo.viz import plot_training_curves

    output_dir = Path(config.run.output_dir)
    trainer = build_trainer(config)
    baseline = DemoResult.baseline
    if config.model.init:  # the run starts from these weights (fit loads them again on a fresh run)
        apply_init(trainer)
        baseline = f"its --init weights {config.model.init}"
    initial = copy.deepcopy(trainer.modules.teacher.backbone)
    random_init = score_backbone(initial, config, output_dir / "nn_random_init.json", evaluation)
    del initial
    result = fit(trainer, progress_bar=progress_bar)
    trained = score_backbone(trainer.modules.teacher.backbone, config, output_dir / "nn_teacher.json", evaluation)
    curves = plot_training_curves(result.history, result.output_dir / "training_curves.png")
    return DemoResult(
        evaluation,
        result.output_dir,
        result.epoch,
        result.step,
        result.history,
        random_init,
        trained,
        curves,
        baseline,
    )


def summary_text(result: DemoResult) -> str:
    """The end-of-demo summary: files, per-epoch training numbers, then the retrieval scores (last line)."""
    from cribo.cli import summary_text as training_summary

    gain = result.trained.miou - result.random_init.miou
    object_gain = result.trained.object_miou - result.random_init.object_miou
    lines = [
        training_summary(result.output_dir, result.history, result.epoch, result.step),
        f"  curves     : {result.curves}",
        f"\n  Dense NN retrieval of the teacher's patch tokens on {result.evaluation.val_scenes} held-out scenes "
        f"(bank: {result.evaluation.train_scenes} scenes, k = 30, temperature 0.02; {result.trained.path.name}):",
        f"    object classes only: {result.trained.object_miou:.3f} (start {result.random_init.object_miou:.3f}, "
        f"{object_gain:+.3f})",
        f"  dense NN mIoU: {result.trained.miou:.3f} ({result.baseline}: {result.random_init.miou:.3f}, {gain:+.3f})",
    ]
    return "\n".join(lines)
