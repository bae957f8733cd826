"""The step and part benchmarks on an accelerator, with the paper's configuration (issue 5, item 5).

``python benchmarks/bench_gpu.py`` (``--device cuda``, the default) runs, in one process and in under five
minutes on one GPU:

* one CrIBo step and the DINO floor (``bench_step``) at A, B, C (fp32) and at the paper's per-GPU setting
  P = ViT-S/16, 224 px, batch 128, K 32, out_dim 65 536, bank 25 000 images, bf16 autocast; goal at P:
  CrIBo / DINO <= 1.3 (time per step);
* the parts (``bench_parts``): clustering and bank search + update at 16 images and at the paper's 128
  images per GPU (4 096 objects per view against 800 000 stored objects).

Peak memory is ``torch.cuda.max_memory_allocated`` during the measured steps. ``--device cpu --quick`` runs the
same code on tiny settings (a smoke test). Without CUDA, ``--device cuda`` writes a section saying that nothing
was measured. Importing this module has no side effects.
"""

from __future__ import annotations

import dataclasses
import gc
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import bench_parts
import bench_step
import common

SCRIPT = Path(__file__).resolve()
PAPER = bench_step.StepSetting("P", "vit_small", 224, 128, 32, 65536, bank=25000, precision="bf16")
GPU_SETTINGS: dict[str, bench_step.StepSetting] = {**bench_step.SETTINGS, "P": PAPER}
_TINY = bench_step.QUICK_SETTINGS["tiny"]
QUICK_SETTINGS: dict[str, bench_step.StepSetting] = {
    "tiny": _TINY,
    "tiny-bf16": dataclasses.replace(_TINY, name="tiny-bf16", precision="bf16"),
}
PAPER_GOAL = 1.3  # CrIBo / DINO time per step at the paper's configuration
# Parts on the accelerator: (row label, part, sizes).
_GPU_COUNTS = {"warmup": 3, "repeat": 10}
GPU_PARTS: tuple[tuple[str, str, dict[str, Any]], ...] = (
    ("clustering, 16 images", "clustering", {**bench_parts.FULL["clustering"], **_GPU_COUNTS}),
    ("clustering, 128 images", "clustering", {**bench_parts.FULL["clustering"], "images": 128, **_GPU_COUNTS}),
    ("bank search + update, 16 images", "bank", {**bench_parts.FULL["bank"], **_GPU_COUNTS}),
    ("bank search + update, 128 images", "bank", {**bench_parts.FULL["bank"], "images": 128, **_GPU_COUNTS}),
)
QUICK_PARTS: tuple[tuple[str, str, dict[str, Any]], ...] = (
    ("clustering (tiny)", "clustering", bench_parts.QUICK["clustering"]),
    ("bank search + update (tiny)", "bank", bench_parts.QUICK["bank"]),
)


def free_memory() -> None:
    """Release what the previous measurement left (Python garbage and the CUDA cache)."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def measure_steps(args: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """CrIBo and the DINO floor at every setting, in this process."""
    settings = QUICK_SETTINGS if args.quick else GPU_SETTINGS
    cribo: dict[str, Any] = {}
    dino: dict[str, Any] = {}
    for name, setting in settings.items():
        for kind, store in (("cribo", cribo), ("dino", dino)):
            job = {"setting": dataclasses.asdict(setting), "device": args.device, "threads": args.threads}
            job |= {"kind": kind, "warmup": args.warmup, "repeat": args.repeat}
            store[name] = bench_step.measure(job)
            free_memory()
            args.loads.append(common.load_1min())
            res = store[name]
            print(f"{name} {kind:5s}: {res['seconds']:.4f} s/step, peak {peak_mib(res):.0f} MiB", flush=True)
    return cribo, dino


def measure_parts(args: Any) -> dict[str, Any]:
    """Clustering and bank search + update on the device, in this process."""
    results = {}
    for label, part, sizes in QUICK_PARTS if args.quick else GPU_PARTS:
        job = {"part": part, "threads": args.threads, "device": args.device, "state": "uniform", **sizes}
        results[label] = bench_parts.measure(job)
        free_memory()
        args.loads.append(common.load_1min())
        print(f"{label}: {results[label]['seconds'] * 1e3:.2f} ms, +{results[label]['rise_mib']:.0f} MiB", flush=True)
    return results


def peak_mib(result: dict[str, Any]) -> float:
    """Peak device memory (CUDA) or peak RSS (CPU) of a step measurement, MiB."""
    return result.get("peak_device_mib", result["peak_rss_mib"])


# ------------------------------------------------------------------------------------------------ report


def steps_table(cribo: dict[str, Any], dino: dict[str, Any], settings: dict[str, bench_step.StepSetting]) -> str:
    rows = []
    for name in cribo:
        ratio = cribo[name]["seconds"] / dino[name]["seconds"]
        goal = f"≤ {PAPER_GOAL} {'**pass**' if ratio <= PAPER_GOAL else '**FAIL**'}" if name == "P" else "–"
        rows.append(
            [
                name,
                settings[name].describe(),
                common.fmt(cribo[name]["seconds"], 4),
                common.fmt(settings[name].batch / cribo[name]["seconds"], 1),
                common.fmt(dino[name]["seconds"], 4),
                common.fmt(ratio) + "×",
                goal,
                common.fmt(peak_mib(cribo[name]), 0),
                common.fmt(peak_mib(dino[name]), 0),
            ]
        )
    headers = [
        "config",
        "setting",
        "CrIBo s / step",
        "images / s",
        "DINO s / step",
        "CrIBo / DINO",
        "goal",
        "CrIBo peak MiB",
        "DINO peak MiB",
    ]
    return common.markdown_table(headers, rows)


def phases_table(cribo: dict[str, Any], dino: dict[str, Any]) -> str:
    names = list(cribo)
    rows = []
    ours = {n: bench_step.author_phase_seconds(cribo[n]["phases"]) for n in names}
    floor = {n: bench_step.author_phase_seconds(dino[n]["phases"]) for n in names}
    for phase in bench_step.AUTHOR_PHASES:
        rows.append([phase] + [f"{ours[n][phase]:.4f} / {floor[n][phase]:.4f}" for n in names])
    rows.append(
        ["sum of phases"]
        + [f"{cribo[n]['instrumented_seconds']:.4f} / {dino[n]['instrumented_seconds']:.4f}" for n in names]
    )
    return common.markdown_table(["phase: CrIBo / DINO, s", *names], rows)


def parts_table(parts: dict[str, Any]) -> str:
    rows = [
        [label, common.fmt(res["seconds"] * 1e3, 2), f"+{res['rise_mib']:.0f}", res.get("chunk_size", "–")]
        for label, res in parts.items()
    ]
    return common.markdown_table(["part", "ms per call", "peak memory rise MiB", "bank chunk"], rows)


def report(args: Any, cribo: dict[str, Any], dino: dict[str, Any], parts: dict[str, Any], argv: Sequence[str]) -> Path:
    settings = QUICK_SETTINGS if args.quick else GPU_SETTINGS
    memory = "`torch.cuda.max_memory_allocated`" if args.device.startswith("cuda") else "peak RSS (whole process)"
    body = [
        f"Device `{args.device}`, one process; {args.warmup} warm-up + {args.repeat} measured steps per "
        f"configuration (median); peak memory: {memory}. Steps as in bench_step.py (random tensors, epoch 1, "
        "drop-path 0.1); P uses bf16 autocast (`--precision bf16`), A/B/C fp32."
        + (" **Quick mode: tiny settings, not comparable.**" if args.quick else ""),
        "### One step: CrIBo and the DINO floor",
        steps_table(cribo, dino, settings),
        "### Split (the authors' six phases)",
        phases_table(cribo, dino),
        "### Parts on the device",
        parts_table(parts),
        f"Total wall time of the script: {args.elapsed:.0f} s.",
    ]
    command = common.command_line(SCRIPT.name, argv)
    folder = common.output_dir(args)
    return common.write_section(folder, "bench_gpu", "Accelerator (GPU)", command, args.info, body, args.loads)


def report_unavailable(args: Any, argv: Sequence[str]) -> Path:
    """The section when CUDA is asked for but absent: say so, and how to run it."""
    body = [
        "**Not measured: no GPU was available for this task.** The script was smoke-tested on CPU with "
        "`python benchmarks/bench_gpu.py --device cpu --quick` (tiny settings, fp32 and bf16 autocast). On a "
        "machine with one CUDA GPU, `python benchmarks/bench_gpu.py` takes under five minutes and fills this "
        "section with: CrIBo vs the DINO floor at A, B, C (fp32) and at the paper's per-GPU configuration "
        f"P = {PAPER.describe()} (goal: CrIBo / DINO ≤ {PAPER_GOAL}), the split of each step, and the "
        "clustering and bank search + update at 16 and 128 images per step (the latter is the paper's 4 096 "
        "objects per view against 800 000 stored objects).",
    ]
    info = common.machine_info(args.threads, "cpu")
    command = common.command_line(SCRIPT.name, argv)
    return common.write_section(common.output_dir(args), "bench_gpu", "Accelerator (GPU)", command, info, body)


def parse_args(argv: Sequence[str]) -> Any:
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="torch device (default cuda; cpu for a smoke test)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up steps (default 3; 1 with --quick)")
    parser.add_argument("--repeat", type=int, default=None, help="measured steps (default 10; 1 with --quick)")
    args = parser.parse_args(argv)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
    args.repeat = args.repeat if args.repeat is not None else (1 if args.quick else 10)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        path = report_unavailable(args, argv)
        print(f"CUDA is not available: nothing measured; wrote {path}")
        return 0
    common.set_threads(args.threads)
    args.info, args.loads = common.machine_info(args.threads, args.device), []
    started = time.perf_counter()
    cribo, dino = measure_steps(args)
    parts = measure_parts(args)
    args.elapsed = time.perf_counter() - started
    path = report(args, cribo, dino, parts, argv)
    print(f"wrote {path} ({args.elapsed:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
