"""Scaling curves of one CrIBo step: time and peak memory against batch size, K, tokens per view and bank size.

A small model keeps the sweep to a few minutes: configuration B (ViT-Tiny/16, 96 px, batch 16, K 16, out_dim
4 096, bank 2 000, fp32, 2 threads) is the centre, and one knob moves at a time. Every point runs in its own
fresh subprocess (``bench_step.measure``: median of the plain ``train_step`` after warm-up, the split from the
instrumented step, the process's peak RSS). Each curve gets its log-log slope (the measured growth exponent)
beside the exponent the algorithm predicts; the plots go to ``benchmarks/results/scaling_<knob>.png``.

``python benchmarks/bench_scaling.py`` (full) or ``--quick``. Importing this module has no side effects.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import bench_step
import common

SCRIPT = Path(__file__).resolve()
CENTRE = bench_step.SETTINGS["B"]
QUICK_CENTRE = bench_step.QUICK_SETTINGS["tiny"]


@dataclass(frozen=True)
class Series:
    """One curve of a sweep: a quantity measured at every point and the exponent the algorithm predicts."""

    label: str
    key: str  # "total", "memory", or one of bench_step.AUTHOR_PHASES
    expected: str  # the predicted exponent, as text ("1", "0 → 1", ...)
    why: str


@dataclass(frozen=True)
class Sweep:
    """A knob (a StepSetting field), its values, and the curves to fit."""

    name: str
    field: str
    axis: str
    values: tuple[int, ...]
    quick_values: tuple[int, ...]
    series: tuple[Series, ...]


MEMORY_WHY = "peak RSS above the RSS after imports: parameters, optimiser state and bank are constant"
SWEEPS: tuple[Sweep, ...] = (
    Sweep(
        "batch",
        "batch",
        "batch size B (images per step)",
        (4, 8, 16, 32, 64),
        (2, 4),
        (
            Series("step", "total", "1", "every phase is per image; the bank is searched by n ∝ B objects"),
            Series("clustering", "clustering", "1", "independent per image: O(B·T²) scatter-min, O(B·T·K·D) cost"),
            Series("bank search + update", "bank search and update", "1", "O(n·M·D) with n ∝ B, M fixed"),
            Series("object heads + loss", "object heads and loss", "1", "rows ∝ n ∝ B"),
            Series("peak memory", "memory", "< 1", "activations ∝ B on top of a constant (" + MEMORY_WHY + ")"),
        ),
    ),
    Sweep(
        "clusters",
        "n_tokens",
        "clusters K (n_tokens)",
        (4, 8, 16, 32, 64),
        (2, 4),
        (
            Series("step", "total", "≈ 0", "the backbones (independent of K) dominate at this size"),
            Series(
                "clustering",
                "clustering",
                "0 → 1",
                "O(B·T·K·D) for the cost grows with K; the O(B·T²) scatter-min over members does not",
            ),
            Series(
                "bank search + update",
                "bank search and update",
                "2 (while n ∝ K)",
                "O(n·M·D): n queries, M = Q·K keys; n stops growing as K nears T = 72 tokens (clusters then "
                "miss one view and are dropped), see the objects column",
            ),
            Series("object heads + loss", "object heads and loss", "1 (while n ∝ K)", "rows ∝ n"),
            Series("peak memory", "memory", "0 → 1", "bank Q·K·D and object logits n·C grow; the rest is constant"),
        ),
    ),
    Sweep(
        "tokens",
        "image_size",
        "tokens per view N = (S/16)² (view size S = 64 … 224 px)",
        (64, 96, 128, 160, 224),
        (32, 48),
        (
            Series("step", "total", "1 → 2", "backbone O(N·D²) + attention O(N²·D); heads and bank do not grow"),
            Series("student forward + backward", "student forward + backward", "1 → 2", "O(N·D²) + O(N²·D) per image"),
            Series(
                "clustering",
                "clustering",
                "1 → 2",
                "the cost and centroid products are O(B·T·K·D) and dominate while T < K·D (3 072 here); the "
                "pairwise distances and scatter-min, O(B·T²), take over only beyond",
            ),
            Series("peak memory", "memory", "1 → 2", "activations O(N) per layer, attention maps O(N²)"),
        ),
    ),
    Sweep(
        "bank",
        "bank",
        "bank size Q (images; M = Q·K keys)",
        (250, 1000, 4000, 16000, 64000),
        (8, 32),
        (
            Series("step", "total", "0 → 1", "constant work plus a search O(n·M·D) that takes over at large Q"),
            Series("bank search + update", "bank search and update", "1", "O(n·M·D); the push is O(n·D)"),
            Series("peak memory", "memory", "0 → 1", "the bank is 2·Q·K·D·4 bytes on top of a constant"),
        ),
    ),
)


def sweep_points(sweep: Sweep, quick: bool) -> list[bench_step.StepSetting]:
    """The settings of one sweep: the centre with one field changed."""
    centre = QUICK_CENTRE if quick else CENTRE
    values = sweep.quick_values if quick else sweep.values
    return [dataclasses.replace(centre, name=f"{sweep.name}={v}", **{sweep.field: v}) for v in values]


def x_value(sweep: Sweep, setting: bench_step.StepSetting) -> float:
    """The x coordinate of a point (tokens per view for the image-size sweep)."""
    if sweep.field == "image_size":
        return float((setting.image_size // setting.patch_size) ** 2)
    return float(getattr(setting, sweep.field))


def y_value(series: Series, result: dict[str, Any]) -> float:
    """Seconds (median) or MiB of one curve at one point."""
    if series.key == "total":
        return result["seconds"]
    if series.key == "memory":
        return result["peak_rss_mib"] - result["rss_start_mib"]
    return bench_step.author_phase_seconds(result["phases"])[series.key]


# ------------------------------------------------------------------------------------------------ report


def sweep_table(sweep: Sweep, settings: list[bench_step.StepSetting], results: list[dict[str, Any]]) -> str:
    """Points of a sweep: x, step time, the phases of interest, peak RSS."""
    headers = [sweep.axis.split(" (")[0], "s / step"]
    headers += [f"{s.label} s" for s in sweep.series if s.key not in ("total", "memory")]
    headers += ["peak RSS MiB", "rise above imports MiB", "objects n"]
    rows = []
    for setting, result in zip(settings, results):
        row = [f"{x_value(sweep, setting):.0f}", common.fmt(result["seconds"], 3)]
        row += [common.fmt(y_value(s, result), 4) for s in sweep.series if s.key not in ("total", "memory")]
        row += [common.fmt(result["peak_rss_mib"], 0), common.fmt(y_value(Series("", "memory", "", ""), result), 0)]
        row += [f"{result['objects']:.0f}"]
        rows.append(row)
    return common.markdown_table(headers, rows)


def exponent_table(sweep: Sweep, settings: list[bench_step.StepSetting], results: list[dict[str, Any]]) -> str:
    """Measured log-log slope of every curve beside the predicted exponent."""
    xs = [x_value(sweep, s) for s in settings]
    rows = []
    for series in sweep.series:
        ys = [y_value(series, r) for r in results]
        rows.append(
            [
                series.label,
                common.fmt(common.loglog_slope(xs, ys)),
                common.fmt(common.loglog_slope(xs[-2:], ys[-2:])),
                series.expected,
                series.why,
            ]
        )
    headers = ["curve", "measured exponent (all points)", "last two points", "expected", "why"]
    return common.markdown_table(headers, rows)


def plot_sweep(
    sweep: Sweep,
    settings: list[bench_step.StepSetting],
    results: list[dict[str, Any]],
    folder: Path,
    centre: bench_step.StepSetting,
) -> str:
    """Log-log plot of the time curves (left) and the memory rise (right); returns the file name."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [x_value(sweep, s) for s in settings]
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for series in sweep.series:
        ys = [y_value(series, r) for r in results]
        axis = right if series.key == "memory" else left
        slope = common.loglog_slope(xs, ys)
        shown = [(x, y) for x, y in zip(xs, ys) if y > 0]  # a log axis has no place for a zero rise
        if shown:
            label = f"{series.label} (slope {slope:.2f}, expected {series.expected})"
            axis.loglog(*zip(*shown), "o-", label=label)
    left.set_ylabel("seconds per step")
    right.set_ylabel("peak RSS above imports (MiB)")
    for axis in (left, right):
        axis.set_xlabel(sweep.axis)
        axis.grid(True, which="both", alpha=0.3)
        if axis.get_legend_handles_labels()[0]:
            axis.legend(fontsize=7)
    figure.suptitle(f"CrIBo step scaling: {sweep.name} (centre: {centre.describe()})", fontsize=9)
    figure.tight_layout()
    name = f"scaling_{sweep.name}.png"
    figure.savefig(folder / name, dpi=110)
    plt.close(figure)
    return name


def report(args: Any, measured: dict[str, tuple[list[Any], list[dict[str, Any]]]], argv: Sequence[str]) -> Path:
    folder = common.output_dir(args)
    centre = QUICK_CENTRE if args.quick else CENTRE
    body = [
        f"Centre: {centre.describe()}; one knob moves at a time. Each point: "
        + ("in this process (--in-process)" if args.in_process else "a fresh subprocess")
        + f", {args.warmup} warm-up + {args.repeat} measured plain steps (median), then {args.repeat} instrumented "
        "steps for the phases (bench_step.py). *Measured exponent* = least-squares slope of log(y) on log(x) "
        "over all the points, and over the last two (where the growing term dominates most); *expected* = "
        "what the algorithm's cost predicts (a → b: a at small x, b where the growing term dominates). Fixed "
        "costs (parameters, optimiser, the other phases) pull the all-points slopes below the expected ones."
        + (" **Quick mode: tiny settings, not comparable.**" if args.quick else ""),
    ]
    for sweep in (s for s in SWEEPS if s.name in measured):
        settings, results = measured[sweep.name]
        image = plot_sweep(sweep, settings, results, folder, centre)
        body += [
            f"### Against {sweep.axis}",
            sweep_table(sweep, settings, results),
            exponent_table(sweep, settings, results),
            f"![{sweep.name} scaling]({image})",
        ]
    command = common.command_line(SCRIPT.name, argv)
    return common.write_section(folder, "bench_scaling", "Scaling curves (CPU)", command, args.info, body, args.loads)


def parse_args(argv: Sequence[str]) -> Any:
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--sweeps", default=None, help="comma-separated subset of batch,clusters,tokens,bank")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up steps per point (default 1; 0 --quick)")
    parser.add_argument("--repeat", type=int, default=None, help="measured steps per point (default 3; 1 --quick)")
    parser.add_argument("--in-process", action="store_true", help="measure in this process (no fresh subprocess)")
    args = parser.parse_args(argv)
    args.repeat = args.repeat if args.repeat is not None else (1 if args.quick else 3)
    args.warmup = args.warmup if args.warmup is not None else (0 if args.quick else 1)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    job = common.worker_job(argv)
    if job is not None:  # the points are bench_step jobs
        common.emit_result(bench_step.measure(job))
        return 0
    args = parse_args(argv)
    args.info, args.loads = common.machine_info(args.threads), []
    wanted = args.sweeps.split(",") if args.sweeps else [s.name for s in SWEEPS]
    measured: dict[str, tuple[list[Any], list[dict[str, Any]]]] = {}
    for sweep in SWEEPS:
        if sweep.name not in wanted:
            continue
        settings = sweep_points(sweep, args.quick)
        results = []
        for setting in settings:
            job = {"setting": dataclasses.asdict(setting), "device": "cpu", "threads": args.threads, "kind": "cribo"}
            job |= {"warmup": args.warmup, "repeat": args.repeat}
            result = measure_point(job, args.in_process)
            args.loads.append(common.load_1min())
            results.append(result)
            print(
                f"{setting.name}: {result['seconds']:.3f} s/step, peak RSS {result['peak_rss_mib']:.0f} MiB", flush=True
            )
        measured[sweep.name] = (settings, results)
    path = report(args, measured, argv)
    print(f"wrote {path}")
    return 0


def measure_point(job: dict[str, Any], in_process: bool) -> dict[str, Any]:
    return bench_step.measure(job) if in_process else common.run_worker(SCRIPT, job)


if __name__ == "__main__":
    sys.exit(main())
