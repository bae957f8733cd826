"""CPU regression benchmark: one short CrIBo pretraining run on the built-in scenes, checked against stated
expectations (issue 5, item 6). It guards the training loop's health, not the method's benefit.

Expectations (``EXPECTATIONS``; each one's rule is printed in the table):

1. every logged loss is finite (and the loop raised no ``NonFiniteLossError``);
2. the object cross-view loss falls: its mean over the last quarter of the logged steps is below its mean over
   the first quarter;
3. the object cross-image loss falls: same rule over the steps where it is on (from the second epoch);
4. the image-level teacher is not uniform: the global loss over the last quarter stays below 0.98 ln(out_dim)
   (the pilot's failure mode at a teacher temperature of 0.07 was a loss sitting at ln(out_dim));
5. the cycle-consistent ratio (share of object retrievals whose cycle closes), averaged over the second half of
   the run, lies in [0.05, 0.95]: above 0 means the bank returns matches, below 1 means the objects did not
   collapse onto one point;
6. the valid objects per image, averaged over the run, lie in [2, K]: the clustering splits every image into
   several objects seen in both views;
7. the teacher's dense NN mIoU on the val scenes is at or above its random initialisation's (tolerance 0.002,
   about a tenth of the seed-to-seed spread of the initialisation).

    python benchmarks/bench_regression.py            # CPU scale, 96 steps (about 2 minutes on a quiet 2-core machine)
    python benchmarks/bench_regression.py --quick    # seconds; only the finiteness check is enforced

Writes ``benchmarks/results/regression.md`` (``--quick``: a temporary folder); exits 1 when an enforced
expectation fails. Importing this module has no side effects.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import common
import quality_common as qc

SCRIPT = "bench_regression.py"
DEFAULT_STEPS = 96  # 3 epochs of 32 steps: the cross-image term is on for the last 64
# The CPU scale is the tiny-cpu preset (64 steps per epoch); the regression run keeps its epochs of 32 steps.
CPU_EXTRA: dict[str, Any] = {"scenes_num_images": 512}
CYCLE_RATIO_RANGE = (0.05, 0.95)
MIN_OBJECTS_PER_IMAGE = 2.0
UNIFORM_TEACHER_FRACTION = 0.98  # of ln(out_dim)
MIOU_TOLERANCE = 0.002
logger = logging.getLogger("bench_regression")


@dataclass(frozen=True)
class Check:
    """One expectation's outcome."""

    name: str
    rule: str
    value: str
    passed: bool
    enforced: bool = True


def quarter_means(
    history: list[dict[str, float]], key: str, active: Callable[[dict[str, float]], bool]
) -> tuple[float, float]:
    """Means of ``key`` over the first and the last quarter of the logged rows where ``active`` holds."""
    values = [row[key] for row in history if key in row and active(row)]
    if len(values) < 2:
        return math.nan, math.nan
    size = max(1, len(values) // 4)
    return sum(values[:size]) / size, sum(values[-size:]) / size


def check_run(record: qc.RunRecord, config: Any, quick: bool) -> list[Check]:
    """Evaluate every expectation on a finished run (in quick mode only finiteness is enforced)."""
    history = record.history
    keys = ("loss", "d_loss", "s_loss", "nn_loss")
    finite = bool(history) and all(math.isfinite(row[k]) for row in history for k in keys if k in row)
    checks = [Check("no NaN / Inf", "every logged loss term finite", f"{len(history)} log rows", finite)]
    first, last = quarter_means(history, "s_loss", lambda row: True)
    checks.append(
        Check(
            "object loss falls",
            "last-quarter mean < first-quarter mean",
            f"{first:.3f} → {last:.3f}",
            last < first,
            not quick,
        )
    )
    first, last = quarter_means(history, "nn_loss", lambda row: row["epoch"] >= 1 and row["nn_loss"] > 0)
    checks.append(
        Check(
            "cross-image loss falls",
            "same, over the steps where it is on",
            f"{first:.3f} → {last:.3f}",
            last < first,
            not quick,
        )
    )
    bound = UNIFORM_TEACHER_FRACTION * math.log(config.model.out_dim)
    _, global_last = quarter_means(history, "d_loss", lambda row: True)
    checks.append(
        Check(
            "teacher not uniform",
            f"last-quarter global loss < {UNIFORM_TEACHER_FRACTION} ln(out_dim) = {bound:.3f}",
            f"{global_last:.3f}",
            global_last < bound,
            not quick,
        )
    )
    half = history[len(history) // 2 :]
    ratio = sum(r["bootstrap_centroid_ratio"] for r in half) / max(1, len(half))
    low, high = CYCLE_RATIO_RANGE
    checks.append(
        Check(
            "cycle-consistent ratio",
            f"second-half mean in [{low}, {high}]",
            f"{ratio:.3f}",
            low <= ratio <= high,
            not quick,
        )
    )
    objects = sum(r["r_cnt"] for r in history) / max(1, len(history))
    k = config.method.n_tokens
    checks.append(
        Check(
            "objects per image",
            f"mean in [{MIN_OBJECTS_PER_IMAGE:g}, K = {k}]",
            f"{objects:.2f}",
            MIN_OBJECTS_PER_IMAGE <= objects <= k,
            not quick,
        )
    )
    start, end = record.evals[0]["nn"]["miou"], record.final()["nn"]["miou"]
    checks.append(
        Check(
            "teacher NN mIoU ≥ init",
            f"final ≥ step-0 − {MIOU_TOLERANCE}",
            f"{start:.4f} → {end:.4f}",
            end >= start - MIOU_TOLERANCE,
            not quick,
        )
    )
    return checks


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny settings; only finiteness is enforced")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="one run per seed (default 0)")
    parser.add_argument("--steps", type=int, default=None, help=f"training steps (default {DEFAULT_STEPS})")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="config override")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default 2; --quick 1)")
    parser.add_argument("--runs-dir", type=Path, default=None, help="run folder (default: a temporary one)")
    parser.add_argument("--results-dir", type=Path, default=None, help="where regression.md goes")
    return parser


def run_one(args: argparse.Namespace, scale: qc.Scale, seed: int, runs_dir: Path) -> tuple[qc.RunRecord, Any]:
    extra = {**({} if args.quick else CPU_EXTRA), **qc.parse_overrides(args.set)}
    probe = qc.training_config(scale, runs_dir, seed, args.device, args.threads, extra)
    iters = probe.data.scenes_num_images // probe.optim.batch_size_per_gpu
    steps = args.steps or (qc.steps_per_run(probe) if args.quick else DEFAULT_STEPS)
    extra.update({"epochs": math.ceil(steps / iters), "max_steps": steps})
    config = qc.training_config(scale, runs_dir / f"cribo-seed{seed}", seed, args.device, args.threads, extra)
    data = qc.EvalData.build(scale.evaluation, args.device)
    settings = {"extra": {k: str(v) for k, v in extra.items()}, "scale": scale.name}
    record = qc.train_and_evaluate(config, "cribo", data, steps, settings, logger.info, linear=False)
    return record, config


def write_report(
    args: argparse.Namespace,
    argv: Sequence[str],
    scale: qc.Scale,
    results: list[tuple[int, qc.RunRecord, list[Check]]],
    info: dict[str, Any],
) -> Path:
    rows = [
        [
            seed,
            c.name,
            c.rule,
            c.value,
            ("pass" if c.passed else "**FAIL**") + ("" if c.enforced else " (not enforced)"),
        ]
        for seed, _, checks in results
        for c in checks
    ]
    record = results[0][1]
    all_pass = all(c.passed for _, _, checks in results for c in checks if c.enforced)
    body = [
        f"Setup: {scale.description}, full CrIBo (paper semantics), {record.steps} steps"
        f"{' (quick smoke run)' if args.quick else ''}; teacher evaluated by dense NN retrieval on "
        f"{scale.evaluation.val_images} val scenes (bank {scale.evaluation.train_images} train scenes). Extra "
        f"overrides: `{' '.join(args.set) or 'none'}`. Wall time of the run with its evaluations: "
        f"{record.seconds / 60:.1f} min.",
        common.markdown_table(["seed", "expectation", "rule", "value", "result"], rows),
        f"**{'All enforced expectations met.' if all_pass else 'Some enforced expectation failed: see FAIL.'}**",
        ("What a pass shows" if all_pass else "What a pass would show")
        + ": the loop trains without numerical failure, the object-level terms are optimised, the teacher's "
        "targets are not uniform, the clustering and the memory-bank matching give a non-degenerate number of "
        "objects and of cycle-consistent pairs, and a short run does not make the teacher's dense features worse "
        "than their initialisation. What it does NOT show: that CrIBo learns object semantics in this budget, or "
        "that it beats DINO (see the ablation section); the mIoU check is a floor, not an improvement. The ranges "
        "were set from pilot runs of this configuration (seed 0 at 192 steps: cycle-consistent ratio 0.10-0.15, "
        "about 4 objects per image of K = 8, object loss 5.9 -> 2.0, cross-image loss 4.8 -> 1.5).",
        qc.noise_note(info),
    ]
    folder = qc.results_folder(args.results_dir, args.quick)
    title = "Quality: CPU regression run" + (" (quick smoke run)" if args.quick else "")
    return common.write_section(folder, "regression", title, common.command_line(SCRIPT, argv), info, body)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    qc.start(args)
    scale = qc.scale_for(args.quick, args.device)
    info = common.machine_info(args.threads, args.device)
    results = []
    with tempfile.TemporaryDirectory(prefix="cribo-regression-") as scratch:
        runs_dir = args.runs_dir or Path(scratch)
        for seed in args.seeds:
            record, config = run_one(args, scale, seed, runs_dir)
            results.append((seed, record, check_run(record, config, args.quick)))
    path = write_report(args, argv, scale, results, info)
    print(path.read_text())
    return 0 if all(c.passed for _, _, checks in results for c in checks if c.enforced) else 1


if __name__ == "__main__":
    sys.exit(main())
