"""Ablation of CrIBo's loss terms on the built-in scenes: random init, DINO-only, CrIBo without the cross-image
term, full CrIBo; several seeds each; dense NN retrieval and linear-probe mIoU of the teacher (issue 5, item 6).

Every trained variant is the library's own loop (``cribo.train.build_trainer`` / ``fit``) with the loss-term
weights of ``LossConfig`` set by configuration overrides; "random init" is the teacher before the first step,
i.e. the weights every variant of that seed starts from, so differences are paired by seed. The teacher is
evaluated at step 0, every ``--eval-every`` steps (NN) and at the end (NN and linear).

    python benchmarks/bench_ablation.py                      # CPU scale: 3 seeds x 3 trained variants
    python benchmarks/bench_ablation.py --device cuda        # ViT-S/16 at 224 px (meant to separate the variants)
    python benchmarks/bench_ablation.py --quick              # seconds; smoke test

Runs live in ``runs/quality/ablation/<scale>-<hash of the settings>/<variant>-seed<seed>/`` (gitignored); a
finished run is reused and an interrupted one resumes. Results: ``benchmarks/results/ablation.md`` and
``ablation_curves.png`` (``--quick`` writes to a temporary folder). Importing this module has no side effects.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import common
import quality_common as qc

SCRIPT = "bench_ablation.py"
TRAINED = ("dino", "no_cross_image", "cribo")
CURVES: tuple[tuple[str, str], ...] = (
    ("d_loss", "global (DINO) loss"),
    ("s_loss", "object cross-view loss"),
    ("nn_loss", "object cross-image loss"),
    ("bootstrap_centroid_ratio", "cycle-consistent ratio"),
    ("r_cnt", "objects per image"),
)
COMPARISONS: tuple[tuple[str, str], ...] = (
    ("cribo", "dino"),
    ("cribo", "no_cross_image"),
    ("no_cross_image", "dino"),
    ("dino", "random"),
    ("no_cross_image", "random"),
    ("cribo", "random"),
)
EFFECT = 0.01  # mIoU difference the budget estimate asks to resolve
# ViT-S/16 at 224 px (197 tokens, 12 blocks of width 384) against the 4-block ViT-Tiny/8 at 64 px (65 tokens,
# width 192): FLOPs per image of the backbone, counted by hand from the token counts and widths (issue 5).
FLOPS_RATIO_GPU = 38
CPU_BATCH = 16  # the tiny-cpu preset's batch_size_per_gpu
GPU_BATCH = 64  # CUDA_OVERRIDES' batch_size_per_gpu

logger = logging.getLogger("bench_ablation")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="tiny network and data, a few steps (smoke test)")
    parser.add_argument("--device", default="cpu", help="cpu (CPU scale) or cuda / cuda:N (GPU scale)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="pretraining seeds (default 0 1 2)")
    parser.add_argument(
        "--variants", nargs="+", choices=list(qc.VARIANTS), default=list(qc.VARIANTS), help="arms to run"
    )
    parser.add_argument("--steps", type=int, default=None, help="training steps per run (default: the scale's)")
    parser.add_argument("--eval-every", type=int, default=None, help="NN evaluation every N steps (default steps/4)")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="config override (all)")
    parser.add_argument(
        "--scenes",
        nargs="+",
        default=[],
        metavar="NAME=VALUE",
        help="SyntheticScenes options for training and evaluation scenes (e.g. class_cue=texture palette_size=4)",
    )
    parser.add_argument("--no-linear", action="store_true", help="dense NN only (no linear probe at the end)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default 2; --quick 1)")
    parser.add_argument("--runs-dir", type=Path, default=qc.RUNS_DIR / "ablation", help="where runs are kept")
    parser.add_argument("--results-dir", type=Path, default=None, help="where ablation.md / the PNG go")
    parser.add_argument("--name", default="ablation", help="results file stem (ablation -> ablation.md)")
    return parser


def run_settings(args: argparse.Namespace, scale: qc.Scale) -> tuple[dict[str, Any], dict[str, Any], int]:
    """The overrides shared by every variant (scale + --steps + --set), the settings that identify a run (the
    resolved configuration without output folder, seed and threads; the evaluation) and the evaluation interval."""
    from cribo import config as config_lib

    extra = qc.parse_overrides(args.set)
    probe = qc.training_config(scale, Path("unused"), 0, args.device, args.threads, extra)
    iters = probe.data.scenes_num_images // probe.optim.batch_size_per_gpu
    if args.steps is not None:
        if args.steps < 1:
            raise ValueError(f"--steps must be >= 1, got {args.steps}")
        extra["epochs"] = math.ceil(args.steps / iters)
        extra["max_steps"] = args.steps
    config = qc.training_config(scale, Path("unused"), 0, args.device, args.threads, extra)
    total = qc.steps_per_run(config)
    every = args.eval_every if args.eval_every is not None else max(1, total // (2 if args.quick else 4))
    shared = config_lib.to_dict(config)
    for section in ("run",):
        for key in ("output_dir", "seed", "threads"):
            shared[section].pop(key, None)
    settings = {"config": shared, "eval": vars(scale.evaluation), "eval_every": every}
    if args.scenes:
        settings["scenes"] = qc.parse_scene_options(args.scenes)
    if args.no_linear:
        settings["linear"] = False
    return extra, settings, every


def settings_tag(scale: qc.Scale, settings: dict[str, Any]) -> str:
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]
    return f"{scale.name}-{digest}"


def run_all(args: argparse.Namespace, scale: qc.Scale, seeds: Sequence[int]) -> dict[tuple[str, int], qc.RunRecord]:
    """Train (or reuse) every (variant, seed); seed-major so that partial sweeps hold whole seeds."""
    shared_extra, settings, every = run_settings(args, scale)
    root = args.runs_dir / settings_tag(scale, settings)
    root.mkdir(parents=True, exist_ok=True)
    (root / "settings.json").write_text(json.dumps(settings, indent=1))
    data = qc.EvalData.build(scale.evaluation, args.device)
    trained = [v for v in TRAINED if v in args.variants]
    records: dict[tuple[str, int], qc.RunRecord] = {}
    for seed in seeds:
        for variant in trained or ["random"]:
            extra = dict(shared_extra)
            extra.update(qc.VARIANTS[variant].weights or {})
            config = qc.training_config(scale, root / f"{variant}-seed{seed}", seed, args.device, args.threads, extra)
            record = qc.train_and_evaluate(
                config, variant, data, every, {**settings, "variant": variant}, _log, linear=not args.no_linear
            )
            records[(variant, seed)] = record
            _log(f"done {variant} seed {seed}: final NN mIoU {record.final()['nn']['miou']:.4f}")
        if "random" in args.variants:
            source = records[(trained[0] if trained else "random", seed)]
            records[("random", seed)] = qc.RunRecord("random", seed, 0, evals={0: source.evals[0]}, complete=True)
    (root / "summary.json").write_text(json.dumps({f"{v}/{s}": r.to_json() for (v, s), r in records.items()}))
    return records


def _log(message: str) -> None:
    logger.info(message)
    sys.stderr.flush()


# ------------------------------------------------------------------------------------------------ tables

METRICS: dict[str, str] = {
    "nn": "NN mIoU",
    "nn_objects": "NN object-class mIoU",
    "linear": "linear mIoU",
}


def final_metric(record: qc.RunRecord, metric: str, step: int | None = None) -> float:
    """``nn`` / ``linear``: mIoU; ``nn_objects``: NN IoU averaged over the object classes (background left out)."""
    evaluation = record.evals[max(record.evals) if step is None else step]
    scores = evaluation["linear" if metric == "linear" else "nn"]
    if scores is None:
        return math.nan
    if metric == "nn_objects":
        return qc.object_class_miou(scores)
    return float(scores["miou"])


def per_variant(records: dict[tuple[str, int], qc.RunRecord], variant: str, seeds: Sequence[int]) -> list[qc.RunRecord]:
    return [records[(variant, seed)] for seed in seeds if (variant, seed) in records]


def last_window(history: list[dict[str, float]], key: str, fraction: float = 0.25) -> float:
    """Mean of ``key`` over the last ``fraction`` of the logged rows."""
    values = [row[key] for row in history if key in row]
    if not values:
        return math.nan
    tail = values[-max(1, int(len(values) * fraction)) :]
    return sum(tail) / len(tail)


def logged(variant: str, key: str) -> bool:
    """Whether ``variant`` computes the loss term ``key`` (DINO-only's step skips the object terms)."""
    return variant != "random" and (variant != "dino" or key == "d_loss")


def main_table(records: dict[tuple[str, int], qc.RunRecord], variants: Sequence[str], seeds: Sequence[int]) -> str:
    rows = []
    for variant in variants:
        runs = per_variant(records, variant, seeds)
        cells: list[object] = [qc.VARIANTS[variant].label, len(runs)]
        for metric in METRICS:
            values = [final_metric(r, metric) for r in runs]
            cells.append(qc.summarize(values).text() + "<br>(" + ", ".join(qc.fmt(v) for v in values) + ")")
        losses = [
            qc.fmt(qc.summarize([last_window(r.history, key) for r in runs]).mean, 2) if logged(variant, key) else "–"
            for key in ("d_loss", "s_loss", "nn_loss")
        ]
        cells.append(" / ".join(losses))
        rows.append(cells)
    headers = [
        "variant",
        "seeds",
        *(f"{name}: mean ± std [95 % CI] (per seed)" for name in METRICS.values()),
        "last-quarter global / object / cross-image loss",
    ]
    return common.markdown_table(headers, rows)


def paired(
    records: dict[tuple[str, int], qc.RunRecord], a: str, b: str, seeds: Sequence[int], metric: str
) -> qc.Summary:
    """Same-seed differences ``a - b`` of a final metric."""
    values = [
        final_metric(records[(a, s)], metric) - final_metric(records[(b, s)], metric)
        for s in seeds
        if (a, s) in records and (b, s) in records
    ]
    return qc.summarize(values)


def sign_of(summary: qc.Summary) -> str:
    if summary.n < 2 or not math.isfinite(summary.half_width):
        return "–"
    low, high = summary.mean - summary.half_width, summary.mean + summary.half_width
    return "> 0" if low > 0 else "< 0" if high < 0 else "0 inside"


def difference_table(
    records: dict[tuple[str, int], qc.RunRecord], variants: Sequence[str], seeds: Sequence[int]
) -> str:
    rows = []
    for a, b in COMPARISONS:
        if a not in variants or b not in variants:
            continue
        cells: list[object] = [f"{qc.VARIANTS[a].label} − {qc.VARIANTS[b].label}"]
        for metric in METRICS:
            summary = paired(records, a, b, seeds, metric)
            cells.append(f"{summary.text(4)} ({sign_of(summary)})")
        rows.append(cells)
    headers = ["paired difference (same seed)", *(f"Δ {name} mean ± std [95 % CI]" for name in METRICS.values())]
    return common.markdown_table(headers, rows)


def step_table(records: dict[tuple[str, int], qc.RunRecord], variants: Sequence[str], seeds: Sequence[int]) -> str:
    trained = [v for v in variants if v != "random"]
    steps = sorted({step for v in trained for r in per_variant(records, v, seeds) for step in r.evals})
    rows = []
    for step in steps:
        row: list[object] = [step]
        for variant in trained:
            runs = [r for r in per_variant(records, variant, seeds) if step in r.evals]
            row.append(qc.summarize([final_metric(r, "nn", step) for r in runs]).text(interval=False))
        rows.append(row)
    return common.markdown_table(["step", *(qc.VARIANTS[v].label for v in trained)], rows)


def class_table(
    records: dict[tuple[str, int], qc.RunRecord], variants: Sequence[str], seeds: Sequence[int], names: Sequence[str]
) -> str:
    rows = []
    for variant in variants:
        runs = per_variant(records, variant, seeds)
        cells = []
        for name in names:
            values = [r.final()["nn"]["per_class_iou"].get(name) for r in runs]
            cells.append(qc.fmt(qc.summarize([v for v in values if v is not None]).mean))
        rows.append([qc.VARIANTS[variant].label, *cells])
    return common.markdown_table(["NN IoU per class (mean over seeds)", *names], rows)


# ------------------------------------------------------------------------------------------------ figure


def plot_curves(
    records: dict[tuple[str, int], qc.RunRecord], variants: Sequence[str], seeds: Sequence[int], path: Path
) -> Path:
    """Training curves (mean over seeds) per variant, and the teacher's NN mIoU against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(13, 7), constrained_layout=True)
    trained = [v for v in variants if v != "random"]
    for ax, (key, title) in zip(axes.flat, CURVES):
        for variant in (v for v in trained if logged(v, key)):
            steps, means = mean_curve([r.history for r in per_variant(records, variant, seeds)], key)
            ax.plot(steps, means, label=qc.VARIANTS[variant].label)
        note = "\n(logged but not trained where its weight is 0)" if key == "nn_loss" else ""
        ax.set_title(title + note, fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    ax = axes.flat[5]
    for variant in trained:
        runs = per_variant(records, variant, seeds)
        eval_steps = sorted({step for r in runs for step in r.evals})
        means = [
            qc.summarize([final_metric(r, "nn", step) for r in runs if step in r.evals]).mean for step in eval_steps
        ]
        ax.plot(eval_steps, means, marker="o", label=qc.VARIANTS[variant].label)
    if "random" in variants:
        start = qc.summarize([final_metric(r, "nn") for r in per_variant(records, "random", seeds)]).mean
        ax.axhline(start, color="grey", linestyle="--", label="random init")
    ax.set_title("teacher dense NN mIoU (val scenes)", fontsize=9)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=8)
    fig.suptitle(f"CrIBo ablation on the built-in scenes: mean over seeds {list(seeds)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def mean_curve(histories: list[list[dict[str, float]]], key: str) -> tuple[list[float], list[float]]:
    """Mean of ``key`` over runs at each logged step present in every run."""
    by_step: dict[float, list[float]] = {}
    for history in histories:
        for row in history:
            if key in row:
                by_step.setdefault(row["step"], []).append(row[key])
    steps = sorted(s for s, v in by_step.items() if len(v) == len(histories))
    return steps, [sum(by_step[s]) / len(by_step[s]) for s in steps]


# ------------------------------------------------------------------------------------------------ report


def comparison_lines(
    records: dict[tuple[str, int], qc.RunRecord], variants: Sequence[str], seeds: Sequence[int]
) -> list[str]:
    """One sentence per paired comparison: the difference, whether its 95 % interval excludes 0, the seeds needed."""
    lines = []
    for a, b in COMPARISONS:
        if a not in variants or b not in variants:
            continue
        d = paired(records, a, b, seeds, "nn")
        if d.n < 2:
            continue
        state = "resolved" if abs(d.mean) > d.half_width else "not resolved (the interval contains 0)"
        if abs(d.mean) > d.half_width and abs(d.mean) - d.half_width < 0.1 * d.half_width:
            state += ", but only just (the interval ends next to 0)"
        need = qc.seeds_needed(d.std, EFFECT)
        lines.append(
            f"- {qc.VARIANTS[a].label} − {qc.VARIANTS[b].label}: NN mIoU {d.mean:+.4f} ± {d.half_width:.4f} (95 %, "
            f"{d.n} seeds), {state}; paired std {d.std:.4f}, so a ±{EFFECT} interval needs about {need} seeds here."
        )
    return lines


def findings(records: dict[tuple[str, int], qc.RunRecord], variants: Sequence[str], seeds: Sequence[int]) -> str:
    """The numbers a reader needs first: ranking, best object class, linear-probe collapse."""
    means = {v: qc.summarize([final_metric(r, "nn") for r in per_variant(records, v, seeds)]).mean for v in variants}
    ranking = " > ".join(f"{qc.VARIANTS[v].label} ({means[v]:.4f})" for v in sorted(means, key=lambda v: -means[v]))
    best_class = max(
        (
            (value, name, v)
            for v in variants
            for r in per_variant(records, v, seeds)
            for name, value in r.final()["nn"]["per_class_iou"].items()
            if name != "background" and value is not None
        ),
        default=(math.nan, "–", "–"),
    )
    linear_runs = [r.final()["linear"] for v in variants for r in per_variant(records, v, seeds) if r.final()["linear"]]
    collapsed = sum(qc.predicts_background_only(scores) for scores in linear_runs)
    lines = [
        f"- Ranking by mean NN mIoU: {ranking}.",
        f"- Best object-class NN IoU of any run: {best_class[0]:.3f} ({best_class[1]}, "
        f"{qc.VARIANTS[best_class[2]].label if best_class[2] in qc.VARIANTS else '–'}); background IoU dominates "
        "every mIoU (see the per-class table).",
    ]
    if linear_runs:
        lines.append(
            f"- Linear probe: {collapsed} of {len(linear_runs)} probes label every val pixel as background (their "
            "mIoU is the background IoU divided by the number of classes)"
            + (", so the linear column separates nothing at this budget." if collapsed == len(linear_runs) else ".")
        )
    else:
        lines.append("- Linear probe: not run (`--no-linear`).")
    return "\n".join(lines)


def budget_paragraph(
    records: dict[tuple[str, int], qc.RunRecord], variants: Sequence[str], seeds: Sequence[int]
) -> str:
    """What resolution the seeds give here, and what the separation in the paper's direction would need."""
    stds = [paired(records, a, b, seeds, "nn").std for a, b in COMPARISONS[:3] if a in variants and b in variants]
    stds = [s for s in stds if math.isfinite(s)]
    if not stds:
        return ""
    worst = max(stds)
    resolution = qc.t_quantile(len(seeds) - 1) * worst / math.sqrt(len(seeds))
    trained = [r for (v, _), r in records.items() if v != "random"]
    cpu_images = trained[0].steps * CPU_BATCH if trained else 0
    gpu_images = qc.steps_per_run(qc.training_config(qc.SCALES["cuda"], Path("unused"), 0, "cuda", 1)) * GPU_BATCH
    ratio = f"{gpu_images / cpu_images:.0f} times the images of this run" if cpu_images else "more images"
    return (
        f"Budget: between variants the paired seed-to-seed std of the NN mIoU is at most {worst:.4f}, so "
        f"{len(seeds)} seeds resolve differences of about ±{resolution:.4f}; more seeds would not change which "
        "variant is ahead. Where the trained variants stand against each other and against the label oracle "
        "(scenes.md) is a matter of what a few CPU minutes teach: the search for a CPU regime in the paper's "
        'order (section "search for a CPU learning regime") tried the scenes, the schedule and the heads. The GPU '
        "scale of this script (`--device cuda`: ViT-S/16, 224-px views, 3200 steps of 64 images) is about "
        f"{FLOPS_RATIO_GPU} times the FLOPs per image and {ratio}; estimated at about 10 minutes per run on one "
        "current GPU, bounded by generating the scenes on 8 loader workers rather than by the GPU (an estimate, "
        "not a measurement)."
    )


LIMITS = (
    "What this does NOT show: the paper's claim (CrIBo > DINO on dense tasks) is made after hundreds of epochs on "
    "ImageNet / COCO with ViT-S/16 and ViT-B/16; a few hundred CPU steps of a 4-block ViT on synthetic scenes "
    "whose classes are defined by shape only (colour and texture random per instance) test whether the losses "
    "are wired and optimised, and what the first steps of training do, not the method's benefit at scale. The "
    "intervals cover seed-to-seed variation of pretraining only: the evaluation data are fixed (one set of "
    "val scenes), so the spread between different val sets is not in them. The GPU scale (`--device cuda`) is "
    "the configuration meant to separate the variants; it was not run for this section."
)


def write_report(
    args: argparse.Namespace,
    argv: Sequence[str],
    scale: qc.Scale,
    records: dict[tuple[str, int], qc.RunRecord],
    seeds: Sequence[int],
    names: Sequence[str],
    info: dict[str, Any],
) -> Path:
    folder = qc.results_folder(args.results_dir, args.quick)
    variants = [v for v in qc.VARIANTS if v in args.variants]
    figure = plot_curves(records, variants, seeds, folder / f"{args.name}_curves.png")
    trained = [r for (v, _), r in records.items() if v != "random"]
    steps = trained[0].steps if trained else 0
    minutes = [r.seconds / 60 for r in trained if r.seconds]
    wall = f"{min(minutes):.1f}–{max(minutes):.1f} min" if minutes else "–"
    threads = ", ".join(str(t) for t in sorted({r.threads for r in trained if r.threads})) or "not recorded"
    loads = [r.load_average[0] for r in trained if r.load_average]
    load = f"{min(loads):.1f}–{max(loads):.1f}" if loads else "not recorded for these runs; the machine was shared"
    e = scale.evaluation
    body = [
        f"Setup: {scale.description}; {steps} steps per run; seeds {list(seeds)}; extra overrides "
        f"`{' '.join(args.set) or 'none'}`. Variants are loss-term weights (`weight_global`, `weight_object`, "
        "`weight_cross_image` of the loss config): DINO-only = 1/0/0, CrIBo w/o cross-image = 1/1/0, CrIBo = "
        "1/1/1; DINO-only runs the step's DINO path (no clustering, matching or object bank; its object terms "
        "log as 0), the other two variants run everything. "
        f"The teacher is scored on {e.val_images} held-out val scenes at {e.input_size} px: dense NN retrieval "
        f"(bank = {e.train_images} train scenes, k = {e.k}, temperature {e.temperature})"
        + ("" if args.no_linear else f" and a linear probe ({e.linear_steps} steps)")
        + ". Random init = the teacher at step 0 of the same seed, so every difference is "
        f"paired by seed. Wall time per training run with its evaluations: {wall} on this machine (torch "
        f"threads per run: {threads}; 1-minute load average when the runs started: {load}; the load average "
        "below is the one when this file was assembled). Runs are kept under `runs/quality/ablation/` and "
        "reused, so several `--seeds` invocations can run side by side and a final call assembles them.",
        main_table(records, variants, seeds),
        difference_table(records, variants, seeds),
        "Teacher dense NN mIoU against the training step (mean ± std over seeds):",
        step_table(records, variants, seeds),
        class_table(records, variants, seeds, names),
        f"![training curves]({figure.name})",
        findings(records, variants, seeds),
        "\n".join(comparison_lines(records, variants, seeds)),
        budget_paragraph(records, variants, seeds),
        LIMITS,
        qc.noise_note(info),
    ]
    title = "Quality: loss-term ablation on the built-in scenes"
    title += " (quick smoke run)" if args.quick else f" ({args.steps} steps)" if args.steps else ""
    command = common.command_line(SCRIPT, argv)
    return common.write_section(folder, args.name, title, command, info, [block for block in body if block])


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    qc.start(args)
    scale = qc.scale_for(args.quick, args.device)
    seeds = args.seeds if args.seeds is not None else ([0, 1] if args.quick else [0, 1, 2])
    info = common.machine_info(args.threads, args.device)
    with qc.scene_options(qc.parse_scene_options(args.scenes)):
        records = run_all(args, scale, seeds)
        names = qc.EvalData.build(scale.evaluation, "cpu").class_names
    path = write_report(args, argv, scale, records, seeds, names, info)
    print(path.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
