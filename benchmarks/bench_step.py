"""One CrIBo training step: seconds, images/s, peak RSS and where the time goes; and the DINO floor.

Configurations (issue 5, item 1), all fp32, 2 threads, drop-path 0.1, a bank of 2 000 images, epoch 1 (so the
cross-image term is on), random image tensors and random patch positions of the right shape (no data loading):

* A: ViT-Tiny/16, 224 px, batch 8, K 32, out_dim = out_dim_c = 65 536
* B: ViT-Tiny/16, 96 px, batch 16, K 16, out_dim = out_dim_c = 4 096
* C: ViT-S/16, 224 px, batch 4, K 32, out_dim = out_dim_c = 65 536

Each configuration runs in its own fresh subprocess (peak RSS is per configuration). The time per step is the
median of the library's own ``cribo.train.train_step`` after warm-up. The split comes from the
same library step with its ``lap`` hook (``cribo.step.train_step(..., lap=clock.lap)``), which closes a timed
phase at each of its phases (see ``PHASE_MAP`` for how they map onto the authors' six phases). The DINO floor
(item 3) is the same library step with the object-level loss weights at 0, which makes it DINO's: both views
through teacher and student, the [CLS] head and DINO loss only, the optimiser step and the EMA; no clustering,
no object head, no bank.

Run ``python benchmarks/bench_step.py`` (full) or ``--quick`` (tiny settings, smoke test). Importing this
module has no side effects.
"""

from __future__ import annotations

import dataclasses
import math
import os
import random
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import common

SCRIPT = Path(__file__).resolve()
# The authors' source image size in the augmentation benchmark; positions are drawn on an image of this size.
SOURCE_WH = (500, 375)
POSITIONS_CROP_SCALE = (0.25, 1.0)  # global_crops_scale (authors)
POSITIONS_CROP_RATIO = (3 / 4, 4 / 3)
DROP_PATH_RATE = 0.1  # authors' pretraining value
BANK_IMAGES = 2000  # bank size of the authors' step measurements (reference/README.md)


@dataclass(frozen=True)
class StepSetting:
    """One benchmarked configuration."""

    name: str
    arch: str
    image_size: int
    batch: int
    n_tokens: int
    out_dim: int
    bank: int = BANK_IMAGES
    depth: int = 0  # 0 = the architecture's own depth
    precision: str = "fp32"
    patch_size: int = 16

    def describe(self) -> str:
        depth = f" depth {self.depth}" if self.depth else ""
        return (
            f"{self.arch}/{self.patch_size}{depth}, {self.image_size} px, batch {self.batch}, K {self.n_tokens}, "
            f"out_dim {self.out_dim}, bank {self.bank}, {self.precision}"
        )


SETTINGS: dict[str, StepSetting] = {
    "A": StepSetting("A", "vit_tiny", 224, 8, 32, 65536),
    "B": StepSetting("B", "vit_tiny", 96, 16, 16, 4096),
    "C": StepSetting("C", "vit_small", 224, 4, 32, 65536),
}
QUICK_SETTINGS: dict[str, StepSetting] = {
    "tiny": StepSetting("tiny", "vit_tiny", 32, 2, 4, 256, bank=8, depth=1),
}


@dataclass(frozen=True)
class AuthorsStep:
    """The authors' implementation on a 2-core CPU: measured in this run (``--official``) or quoted."""

    seconds: float
    peak_mib: float
    split: tuple[float, ...]  # in AUTHOR_PHASES order
    rounds: tuple[float, ...] = ()  # seconds per step of every round, when measured in this run
    measured: bool = False


AUTHOR_PHASES: tuple[str, ...] = (
    "teacher forward",
    "clustering",
    "student forward + backward",
    "bank search and update",
    "object heads and loss",
    "optimiser and EMA",
)
# Quoted from reference/README.md ("Performance ..."): another run, another day; a labelled secondary column only
# when the authors' code is measured in the same run (--official).
QUOTED_AUTHORS: dict[str, AuthorsStep] = {
    "A": AuthorsStep(5.40, 4291, (0.28, 0.91, 1.34, 0.17, 2.62, 0.21)),
    "B": AuthorsStep(0.75, 1623, (0.10, 0.03, 0.36, 0.07, 0.12, 0.06)),
    "C": AuthorsStep(3.57, 4210, (0.43, 0.33, 1.59, 0.27, 0.67, 0.19)),
}
# The harness's phases (shared/refharness/bench.py, breakdown_median_s) in AUTHOR_PHASES order.
HARNESS_PHASES: tuple[str, ...] = (
    "teacher backbone forward",
    "clustering (compute_teacher_centroids)",
    "student forward+backward",
    "get_nn_centroids",
    "heads+loss",
    "optimizer+EMA",
)
SPEED_GOALS: dict[str, float] = {"A": 2.0, "B": 1.2, "C": 1.5}  # required authors/ours time ratio

# Our fine phases (the laps of cribo.step.train_step, cribo.step.PHASES) -> the authors' six phases.
PHASE_MAP: dict[str, tuple[str, ...]] = {
    "teacher forward": ("teacher_backbone",),
    "clustering": ("clustering",),
    "student forward + backward": ("student_backbone_forward", "student_backbone_backward"),
    "bank search and update": ("bank_search", "bank_push"),
    "object heads and loss": ("teacher_head_mlp", "teacher_targets", "student_head_mlp", "loss", "heads_loss_backward"),
    "optimiser and EMA": ("optimiser", "ema"),
}
PHASE_NOTES: dict[str, str] = {
    "teacher_backbone": "teacher ViT forward (no grad)",
    "clustering": "joint_space_clustering + valid_objects + pool_objects + select_valid",
    "bank_search": "match_objects: NN search of both views + cycle check (before the push)",
    "teacher_head_mlp": "teacher head MLP on [CLS], objects and the cycle-consistent neighbours",
    "teacher_targets": "TargetBuilder: fused teacher last layers + sharpening (3 targets), centre updates",
    "student_backbone_forward": "student ViT forward (drop-path 0.1)",
    "student_head_mlp": "student object pooling + head MLP on [CLS] and objects",
    "loss": "student_terms: fused student last layers + the 3 cross-entropies (forward)",
    "heads_loss_backward": "backward from the loss to the student tokens (heads + loss; a gradient hook laps)",
    "student_backbone_backward": "backward through the student ViT",
    "optimiser": "AdamW step (+ last-layer freeze / clipping when on)",
    "ema": "ema_update (foreach lerp)",
    "bank_push": "ObjectMemoryBank.push + BankKeys.update",
}


# ------------------------------------------------------------------------------------------------ building


def train_config(
    setting: StepSetting, device: str, threads: int, dino: bool = False, keep_freed_memory: bool = True
) -> Any:
    """The TrainConfig of a setting; ``dino`` turns the object-level terms off (their weights 0: the step skips
    clustering, matching, the object heads and the bank) and shrinks the unused object head and bank to size one."""
    from cribo import config as config_lib

    overrides: dict[str, Any] = {
        "arch": setting.arch,
        "patch_size": setting.patch_size,
        "depth": setting.depth,
        "image_size": setting.image_size,
        "batch_size_per_gpu": setting.batch,
        "n_tokens": 1 if dino else setting.n_tokens,
        "out_dim": setting.out_dim,
        "out_dim_c": 1 if dino else setting.out_dim,
        "queue_size": 1 if dino else setting.bank,
        "weight_object": 0.0 if dino else 1.0,
        "weight_cross_image": 0.0 if dino else 1.0,
        "drop_path_rate": DROP_PATH_RATE,
        "device": device,
        "precision": setting.precision,
        "threads": threads,
        "keep_freed_memory": keep_freed_memory,
        "num_workers": 0,
        "scenes_num_images": setting.batch * 4,  # the data source is built but never read
        "output_dir": str(Path(tempfile.gettempdir()) / "cribo-bench-unused"),
    }
    return config_lib.resolve(overrides=overrides)


def build_step_trainer(
    setting: StepSetting, device: str, threads: int, dino: bool = False, keep_freed_memory: bool = True
) -> Any:
    """A Trainer (``cribo.train.build_trainer``) placed at the first step of epoch 1 (cross-image term on)."""
    from cribo.runtime import keep_freed_memory as keep_freed
    from cribo.train import build_trainer

    config = train_config(setting, device, threads, dino=dino, keep_freed_memory=keep_freed_memory)
    if keep_freed_memory and config.run.device == "cpu":
        keep_freed()  # what `cribo train` does on CPU
    trainer = build_trainer(config)
    trainer.epoch = 1
    trainer.step = trainer.iters_per_epoch
    return trainer


def random_positions(batch: int, image_size: int, patch_size: int, rng: random.Random) -> Any:
    """(B, V=2, N, 2) patch-centre positions of two random crops per image of a 500x375 source image."""
    import torch

    from cribo.augment import patch_centres, random_crop_box

    views = []
    for _ in range(batch):
        boxes = [
            dataclasses.replace(
                random_crop_box(*SOURCE_WH, POSITIONS_CROP_SCALE, POSITIONS_CROP_RATIO, rng), flipped=rng.random() < 0.5
            )
            for _ in range(2)
        ]
        views.append(torch.stack([patch_centres(box, image_size, patch_size) for box in boxes]))
    return torch.stack(views)


def random_batch(setting: StepSetting, seed: int = 0) -> Any:
    """A collated batch of random normalised images (B, V, 3, S, S) and random positions (B, V, N, 2)."""
    import torch

    from cribo.data.pretrain import Batch

    generator = torch.Generator().manual_seed(seed)
    size = setting.image_size
    images = torch.randn(setting.batch, 2, 3, size, size, generator=generator)
    positions = random_positions(setting.batch, size, setting.patch_size, random.Random(seed))
    return Batch(images=images, positions=positions, num_skipped=0)


# ------------------------------------------------------------------------------------------------ steps


def step(trainer: Any, batch: Any, clock: common.PhaseClock | None = None) -> dict[str, float]:
    """The library's ``cribo.step.train_step`` at the trainer's position; with a clock, a lap after each phase.

    Returns per-step counts (objects, cycle-consistent matches). The DINO floor is the same step on a trainer
    built with ``dino=True`` (object-level loss weights 0: no clustering, matching, object heads or bank push).
    """
    from cribo.step import train_step

    if clock is not None:
        clock.start()
    output = train_step(
        trainer.modules,
        trainer.settings,
        batch,
        trainer.values(),
        lap=clock.lap if clock is not None else None,
        inspect=True,
    )
    assert output.teacher is not None
    return {
        "objects": float(output.teacher.objects.shape[0]),
        "cycle_consistent": float(output.teacher.matches.cycle_mask.sum()),
    }


# ------------------------------------------------------------------------------------------------ worker


def measure(job: dict[str, Any]) -> dict[str, Any]:
    """One configuration in this process: build, warm up, time the plain step, then the instrumented one."""
    common.set_threads(job["threads"])
    glibc_default = bool(job.get("glibc_default"))
    import torch

    setting = StepSetting(**job["setting"])
    dino = job["kind"] == "dino"
    rss_start = common.rss_mib()
    with common.PeakRise() as whole:
        started = time.perf_counter()
        trainer = build_step_trainer(
            setting, job["device"], job["threads"], dino=dino, keep_freed_memory=not glibc_default
        )
        build_s = time.perf_counter() - started
        rss_built = common.rss_mib()
        batch = random_batch(setting, seed=0)
        sync = common.device_sync(trainer.device)
        if trainer.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(trainer.device)

        def plain() -> None:
            step(trainer, batch)

        for _ in range(job["warmup"]):
            plain()
        cpu = common.CpuTimes().start()
        times = common.time_calls(plain, 0, job["repeat"], sync)
        cpu.stop()
    result: dict[str, Any] = {
        "setting": setting.name,
        "kind": job["kind"],
        "seconds": common.median(times),
        "times": times,
        "build_s": build_s,
        "rss_start_mib": rss_start,
        "rss_built_mib": rss_built,
        "peak_rss_mib": whole.baseline_mib + whole.rise_mib,
        "process_peak_rss_mib": common.process_peak_rss_mib(),
        "peak_exact": whole.exact,
        "user_s": cpu.user_s / job["repeat"],
        "system_s": cpu.system_s / job["repeat"],
        "minor_faults": cpu.minor_faults / job["repeat"],
        "glibc_default": glibc_default,
    }
    if trainer.device.type == "cuda":
        result["peak_device_mib"] = torch.cuda.max_memory_allocated(trainer.device) / common.MIB
    if job.get("split", True):
        result.update(_measure_split(trainer, batch, job, dino, sync))
    result["gemm_gflops"] = common.gemm_gflops(device=job["device"])
    return result


def _measure_split(trainer: Any, batch: Any, job: dict[str, Any], dino: bool, sync: Any) -> dict[str, Any]:
    """Per-phase medians over ``repeat`` instrumented steps (after one untimed instrumented step)."""
    clock = common.PhaseClock(sync=sync)
    runs, counts = [], []
    for index in range(job["repeat"] + 1):
        count = step(trainer, batch, clock)
        if index:
            runs.append(dict(clock.phases))
            counts.append(count)
    return {
        "phases": common.median_phases(runs),
        "instrumented_seconds": common.median(sum(run.values()) for run in runs),
        "objects": common.median(c.get("objects", 0.0) for c in counts),
        "cycle_consistent": common.median(c.get("cycle_consistent", 0.0) for c in counts),
    }


def run_job(job: dict[str, Any], in_process: bool) -> dict[str, Any]:
    """Measure a job in this process or in a fresh worker subprocess."""
    return measure(job) if in_process else common.run_worker(SCRIPT, job)


def official_step(name: str, args: Any) -> dict[str, Any]:
    """The authors' step of configuration ``name`` (same warm-up and measured steps as ours)."""
    what = ["step", "--config", name, "--iters", str(args.repeat), "--warmup", str(args.warmup)]
    raw = common.run_official(what, args.official, args.threads)
    breakdown = raw["breakdown_median_s"]
    return {
        "seconds": float(raw["median_s"]),
        "peak_rss_mib": float(raw["peak_rss_MB"]),
        "split": [float(breakdown[phase]) for phase in HARNESS_PHASES],
        "user_s": float(raw["cpu_user_s_per_iter"]),
        "system_s": float(raw["cpu_sys_s_per_iter"]),
    }


def measured_authors(rounds: Sequence[dict[str, Any]]) -> AuthorsStep:
    """The authors' figures of this run: the median round's split and peak RSS, every round's seconds."""
    middle = median_round(rounds)
    return AuthorsStep(
        seconds=middle["seconds"],
        peak_mib=middle["peak_rss_mib"],
        split=tuple(middle["split"]),
        rounds=tuple(res["seconds"] for res in rounds),
        measured=True,
    )


# ------------------------------------------------------------------------------------------------ FLOP account


def _dims(arch: str) -> tuple[int, int]:
    """(depth, width) of a short arch name."""
    return {"vit_tiny": (12, 192), "vit_small": (12, 384), "vit_base": (12, 768)}[arch]


def flop_account(setting: StepSetting, objects: float, neighbours: float) -> dict[str, float]:
    """GFLOP per step of the matrix products the method needs (multiply-add = 2 FLOP).

    Backbone: per image ``depth * (24 L D^2 + 4 L^2 D)`` with ``L = N + 1`` tokens; forward counts 1x, forward +
    backward 3x, the student's times the expected share of samples that stochastic depth keeps (the dropped ones
    are skipped; rate ``linspace(0, DROP_PATH_RATE, depth)`` per block). Head: the MLP
    ``2 (D*2048 + 2048^2 + 2048*256)`` plus the last layer ``2 * 256 * C`` per row; the teacher's object head sees
    the ``2n`` objects and the ``c`` cycle-consistent neighbours (the only ones the cross-image term uses), the
    student's ``2n`` objects (x3 with backward; when the student's logits are too large to keep,
    ``cribo.fused`` recomputes them in the backward, one more ``2 * 256 * C`` per row, not counted). Bank search:
    ``2 views * n * M * D * 2`` with ``M = bank * K`` keys (float32-equivalent).
    """
    depth, width = _dims(setting.arch)
    if setting.depth:
        depth = setting.depth
    tokens = (setting.image_size // setting.patch_size) ** 2 + 1
    per_image = depth * (24 * tokens * width**2 + 4 * tokens**2 * width)
    kept = 1.0 - DROP_PATH_RATE / 2 if depth > 1 else 1.0  # mean of linspace(0, rate, depth)
    views = 2 * setting.batch
    head_row = 2 * (width * 2048 + 2048 * 2048 + 2048 * 256) + 2 * 256 * setting.out_dim
    giga = 1e9
    return {
        "teacher backbone": views * per_image / giga,
        "student backbone (fwd+bwd)": 3 * views * per_image * kept / giga,
        "[CLS] heads (teacher + student fwd+bwd)": 4 * views * head_row / giga,
        "object heads (teacher 2n + c rows, student 2n rows fwd+bwd)": (2 * objects + neighbours + 3 * 2 * objects)
        * head_row
        / giga,
        "bank search (2 views, n x M x D)": 2 * objects * setting.bank * setting.n_tokens * width * 2 / giga,
    }


DINO_FLOP_ITEMS = ("teacher backbone", "student backbone (fwd+bwd)", "[CLS] heads (teacher + student fwd+bwd)")


def compute_bound(
    cribo: dict[str, dict[str, Any]], dino: dict[str, dict[str, Any]], authors: dict[str, AuthorsStep]
) -> list[str]:
    """How close each step runs to this machine's matrix-product rate, and what the speed goal would need."""
    settings = SETTINGS | QUICK_SETTINGS
    rows, notes = [], []
    for name in cribo:
        account = flop_account(settings[name], cribo[name]["objects"], cribo[name]["cycle_consistent"])
        total, floor_total = sum(account.values()), sum(account[item] for item in DINO_FLOP_ITEMS)
        rate = common.median([cribo[name]["gemm_gflops"], dino[name]["gemm_gflops"]])
        ours, floor = total / cribo[name]["seconds"], floor_total / dino[name]["seconds"]
        goal = authors[name].seconds / SPEED_GOALS[name] if name in SPEED_GOALS and name in authors else math.nan
        needed = total / goal
        rows.append(
            [
                name,
                f"{total:.0f} / {floor_total:.0f}",
                f"{rate:.0f}",
                f"{total / rate:.2f}",
                common.fmt(goal),
                f"{needed:.0f} ({100 * needed / rate:.0f} %)",
                f"{ours:.0f} ({100 * ours / rate:.0f} %)",
                f"{floor:.0f} ({100 * floor / rate:.0f} %)",
            ]
        )
        if name in SPEED_GOALS and name in authors:
            notes.append(
                f"{name}: the goal needs {100 * needed / rate:.0f} % of the matrix-product rate sustained over the "
                f"whole step; the plain DINO step reaches {100 * floor / rate:.0f} %, CrIBo {100 * ours / rate:.0f} %"
            )
    table = common.markdown_table(
        [
            "config",
            "GFLOP per step: CrIBo / DINO",
            "GEMM rate, GFLOP/s (2048² fp32, measured in the same workers)",
            "CrIBo lower bound s (every FLOP at that rate)",
            "goal s / step",
            "goal needs GFLOP/s (share of the rate)",
            "CrIBo now GFLOP/s (share)",
            "DINO floor now GFLOP/s (share)",
        ],
        rows,
    )
    text = (
        "Sustained rate = the FLOPs of the table above (the matrix products the method needs) divided by the "
        "measured seconds per step. Attention, softmax, normalisation, "
        "clustering and the optimiser run well below the matrix-product rate, so no step sustains 100 %; the DINO "
        "step (backbone-dominated, the most GEMM-friendly work) bounds what is realistic. " + "; ".join(notes) + "."
    )
    return ["#### Compute bound: the step against this machine's matrix-product rate", table, text]


# ------------------------------------------------------------------------------------------------ report


def fine_phases() -> tuple[str, ...]:
    """The laps of the library's step, in order (``cribo.step.PHASES``; imported on use, as torch is)."""
    from cribo.step import PHASES

    return PHASES


def author_phase_seconds(phases: dict[str, float]) -> dict[str, float]:
    """Our fine phases summed into the authors' six phases."""
    return {name: sum(phases.get(p, 0.0) for p in parts) for name, parts in PHASE_MAP.items()}


def _mark(ok: bool) -> str:
    return "**pass**" if ok else "**FAIL**"


def round_ratios(authors: AuthorsStep, ours: Sequence[float]) -> list[float]:
    """authors / ours per round: the same round's figures when the authors' code was measured in this run, else the
    quoted figure over each of our rounds."""
    theirs = authors.rounds if authors.measured else (authors.seconds,) * len(ours)
    return [their / our for their, our in zip(theirs, ours, strict=True)]


def summary_table(results: dict[str, dict[str, Any]], authors: dict[str, AuthorsStep]) -> str:
    """Ours vs the authors: s/step, images/s, peak RSS, ratios (per round) and goals."""
    rows = []
    measured = any(step.measured for step in authors.values())
    for name, res in results.items():
        setting = (SETTINGS | QUICK_SETTINGS)[name]
        ours = res["seconds"]
        spread = res.get("round_seconds", [ours])
        theirs = authors.get(name)
        ratios = round_ratios(theirs, spread) if theirs else []
        ratio = common.median(ratios) if ratios else math.nan
        goal = SPEED_GOALS.get(name)
        speed_ok = _mark(ratio >= goal) if goal and ratios else "–"
        if goal and ratios and len(ratios) > 1:
            speed_ok += f" (met in {sum(r >= goal for r in ratios)} of {len(ratios)} rounds)"
        row = [
            name,
            setting.describe(),
            " / ".join(common.fmt(seconds, 3) for seconds in spread),
            common.fmt(setting.batch / ours, 1),
            " / ".join(common.fmt(seconds, 3) for seconds in theirs.rounds) if theirs and theirs.measured else "–",
            common.fmt(ratio) + "×" + (f" ({' / '.join(common.fmt(r) for r in ratios)})" if len(ratios) > 1 else ""),
            f"≥ {goal}× {speed_ok}" if goal else "–",
            common.fmt(res["peak_rss_mib"], 0),
            common.fmt(theirs.peak_mib if theirs else math.nan, 0),
            f"< authors {_mark(res['peak_rss_mib'] < theirs.peak_mib)}" if theirs else "–",
        ]
        if measured:
            quoted = QUOTED_AUTHORS.get(name)
            row.append(common.fmt(quoted.seconds, 2) if quoted else "–")
        rows.append(row)
    speed = "speed-up, authors / ours (same round: median, every round)" if measured else "speed-up (quoted / ours)"
    headers = [
        "config",
        "setting",
        "ours, s / step (every round)",
        "images / s (median round)",
        "authors, s / step, this run (every round)",
        speed,
        "speed goal",
        "peak RSS MiB (ours)",
        "peak RSS MiB (authors" + (", this run)" if measured else ", quoted)"),
        "memory goal",
    ] + (["authors, quoted s / step (another run, reference/README.md)"] if measured else [])
    return common.markdown_table(headers, rows)


def split_table(results: dict[str, dict[str, Any]], authors: dict[str, AuthorsStep]) -> str:
    """The authors' six phases: ours beside theirs, per configuration (side by side: theirs / ours)."""
    names = list(results)
    theirs = [n for n in names if n in authors]
    headers = ["phase"] + [f"{n} ours" for n in names] + [f"{n} authors" for n in theirs]
    headers += [f"{n} authors / ours" for n in theirs]
    ours = {n: author_phase_seconds(results[n]["phases"]) for n in names}
    rows = []
    for index, phase in enumerate(AUTHOR_PHASES):
        row = [phase] + [common.fmt(ours[n][phase], 3) for n in names]
        row += [common.fmt(authors[n].split[index], 3) for n in theirs]
        row += [common.fmt(authors[n].split[index] / ours[n][phase]) + "×" if ours[n][phase] else "–" for n in theirs]
        rows.append(row)
    total = ["sum of phases"] + [common.fmt(results[n]["instrumented_seconds"], 3) for n in names]
    total += [common.fmt(sum(authors[n].split), 3) for n in theirs]
    total += [common.fmt(sum(authors[n].split) / results[n]["instrumented_seconds"]) + "×" for n in theirs]
    rows.append(total)
    return common.markdown_table(headers, rows)


def fine_table(results: dict[str, dict[str, Any]]) -> str:
    """Every lap of the instrumented step, seconds (median over the measured steps)."""
    names = list(results)
    headers = ["lap", "what", *names]
    rows = [
        [phase, PHASE_NOTES[phase]] + [common.fmt(results[n]["phases"].get(phase, math.nan), 4) for n in names]
        for phase in fine_phases()
    ]
    rows.append(["objects n", "valid objects per step (median)"] + [f"{results[n]['objects']:.0f}" for n in names])
    rows.append(
        ["cycle-consistent", "of the 2n retrievals (median)"] + [f"{results[n]['cycle_consistent']:.0f}" for n in names]
    )
    return common.markdown_table(headers, rows)


def floor_tables(
    cribo: dict[str, dict[str, Any]], dino: dict[str, dict[str, Any]], authors: dict[str, AuthorsStep]
) -> list[str]:
    """CrIBo vs the DINO floor: totals (and the floor against the authors' whole step), per-phase difference, and a
    FLOP account."""
    names = list(cribo)
    settings = SETTINGS | QUICK_SETTINGS
    rows = []
    for n in names:
        floor_rounds = dino[n].get("round_seconds", [dino[n]["seconds"]])
        theirs = authors.get(n)
        floor_ratios = round_ratios(theirs, floor_rounds) if theirs else []
        share = (
            f"{common.fmt(common.median(floor_ratios))}× ({' / '.join(common.fmt(r) for r in floor_ratios)})"
            if floor_ratios
            else "–"
        )
        rows.append(
            [
                n,
                common.fmt(cribo[n]["seconds"], 3),
                common.fmt(dino[n]["seconds"], 3),
                common.fmt(cribo[n]["seconds"] / dino[n]["seconds"]) + "×",
                share,
                f"≥ {SPEED_GOALS[n]}×" if n in SPEED_GOALS else "–",
                common.fmt(cribo[n]["peak_rss_mib"], 0),
                common.fmt(dino[n]["peak_rss_mib"], 0),
            ]
        )
    totals = common.markdown_table(
        [
            "config",
            "CrIBo s / step",
            "DINO floor s / step",
            "CrIBo / DINO",
            "authors' whole step / our DINO floor (every round)",
            "the speed goal CrIBo must reach",
            "CrIBo peak RSS MiB",
            "DINO peak RSS MiB",
        ],
        rows,
    )
    diff_rows = []
    ours = {n: author_phase_seconds(cribo[n]["phases"]) for n in names}
    floor = {n: author_phase_seconds(dino[n]["phases"]) for n in names}
    for phase in AUTHOR_PHASES:
        diff_rows.append(
            [phase]
            + [f"{ours[n][phase]:.3f} / {floor[n][phase]:.3f} ({ours[n][phase] - floor[n][phase]:+.3f})" for n in names]
        )
    diffs = common.markdown_table(["phase: CrIBo / DINO (difference), s", *names], diff_rows)
    accounts = {n: flop_account(settings[n], cribo[n]["objects"], cribo[n]["cycle_consistent"]) for n in names}
    flop_rows = [[item] + [f"{accounts[n][item]:.1f}" for n in names] for item in accounts[names[0]]]
    flops = common.markdown_table(["GFLOP per step (estimate, with the measured n)", *names], flop_rows)
    return [totals, diffs, flops]


def _intro(quick: bool, in_process: bool, measured: bool) -> list[str]:
    where = "all in this process (--in-process)" if in_process else "each in its own fresh subprocess"
    authors = (
        "The authors' code (unmodified, imported from a scratch folder by `shared/refharness/bench.py`, never "
        "copied) runs in the same rounds, interleaved with ours, each in its own fresh process with the same "
        "threads, warm-up and measured steps: every ratio is authors / ours from the same round. The figures "
        "quoted in reference/README.md (another run, another day) appear only in a labelled column."
        if measured
        else "The authors' numbers are quoted from another run (their code, unmodified) on a machine of the same "
        "kind (2 cores), reference/README.md; these machines vary by about 3x from day to day, so ratios against "
        "them are indicative only: run with `--official DIR` to measure both side by side."
    )
    return [
        "One optimisation step of `cribo.step.train_step` on random image tensors and random patch positions "
        f"(no data loading), epoch 1 (cross-image term on), drop-path 0.1, fp32; the configurations and the DINO "
        f"floor {where}. *s / step* is the median of the measured steps after warm-up; "
        "*peak RSS* is the whole process's peak resident set (Python + torch included), as in the authors' "
        "figures. " + authors + (" **Quick mode: tiny settings, not comparable.**" if quick else ""),
    ]


def _split_notes() -> str:
    return (
        "How the split is taken: the library's own `cribo.step.train_step` with its `lap` hook, which closes a "
        "timed phase at the end of each of its phases. The backward is one call; a gradient hook on the student's "
        "tokens laps when the heads' and losses' backward reaches them, so *heads + loss backward* and *backbone "
        "backward* are timed apart without changing the step. The heads' last layers are fused with the losses "
        "(`cribo.fused`), so the [CLS] and object heads cannot be timed apart. Mapping to the authors' phases: "
        "teacher forward = teacher backbone; "
        "clustering = clustering + object pooling; student forward + backward = student backbone forward + "
        "backward; bank search and update = `match_objects` + `push`; object heads and loss = both heads of "
        "teacher and student (MLP and fused last layers, [CLS] included) + the losses + their backward; optimiser "
        "and EMA = AdamW step + EMA. The [CLS] heads (2B rows against the objects' 2n) are counted in *object "
        "heads and loss*; the authors' attribution of the teacher's [CLS] head (their *teacher forward*) is not "
        "documented."
    )


def report(
    args: Any, runs: dict[str, dict[str, dict[str, Any]]], authors: dict[str, AuthorsStep], argv: Sequence[str]
) -> Path:
    """Write benchmarks/results/bench_step.md."""
    cribo, dino = runs["cribo"], runs["dino"]
    measured = any(step.measured for step in authors.values())
    body = [
        *_intro(args.quick, args.in_process, measured),
        f"Warm-up steps: {args.warmup}; measured steps: {args.repeat} (each for the plain and the instrumented step)"
        + (
            f"; {args.rounds} interleaved rounds (every configuration and kind once per round, each in a fresh "
            "worker): every table below shows the round with the median s / step, the summary also every round."
            if args.rounds > 1
            else "."
        ),
        "### Ours vs the authors' implementation",
        summary_table(cribo, authors),
        "### Split of one step (seconds), the authors' six phases",
        split_table(cribo, authors),
        _split_notes(),
        "### Every lap of the instrumented step (seconds)",
        fine_table(cribo),
        "### The floor: a plain two-view DINO step (item 3)",
        "The library's own step with the object-level loss weights at 0 (`--weight_object 0 --weight_cross_image "
        "0`), which makes it DINO's: same backbone, same [CLS] head (`out_dim`), same optimiser and EMA, both views "
        "through teacher and student; no clustering, no object head, no bank. If the authors' whole step is less "
        "than the speed goal times this floor, no CrIBo step on top of this backbone can meet the goal.",
        *floor_tables(cribo, dino, authors),
        _floor_notes(cribo, dino, authors),
        *compute_bound(cribo, dino, authors),
        *malloc_section(cribo, runs["cribo_malloc"], authors),
    ]
    command = common.command_line(SCRIPT.name, argv)
    folder = common.output_dir(args)
    return common.write_section(folder, "bench_step", "One training step (CPU)", command, args.info, body, args.loads)


def malloc_section(
    cribo: dict[str, dict[str, Any]], kept: dict[str, dict[str, Any]], authors: dict[str, AuthorsStep]
) -> list[str]:
    """CPU time split (user / system), page faults, and the same step with glibc's default allocator settings."""
    rows = []
    for name, res in cribo.items():
        row = [
            name,
            common.fmt(res["seconds"], 3),
            f"{res['user_s']:.2f} / {res['system_s']:.2f}",
            f"{res['minor_faults'] / 1e3:.0f} k",
        ]
        if name in kept:
            alt = kept[name]
            theirs = authors.get(name)
            row += [
                common.fmt(alt["seconds"], 3),
                f"{alt['user_s']:.2f} / {alt['system_s']:.2f}",
                f"{alt['minor_faults'] / 1e3:.0f} k",
                common.fmt(theirs.seconds / alt["seconds"]) + "×" if theirs else "–",
                f"{res['peak_rss_mib']:.0f} / {alt['peak_rss_mib']:.0f}",
            ]
        else:
            row += ["–"] * 5
        rows.append(row)
    headers = [
        "config",
        "s / step",
        "CPU user / system s per step",
        "minor page faults per step",
        "s / step, glibc defaults",
        "CPU user / system s",
        "page faults",
        "speed-up vs authors",
        "peak RSS MiB ours / glibc defaults",
    ]
    return [
        "### Diagnostic: kernel time from page faults",
        "The step's CPU time split into user and system (kernel) time, with the minor page faults per step. "
        "glibc serves every allocation above 32 MiB (a (2n, 65 536) float32 tensor is ~125 MB at A) with a fresh "
        "`mmap` and unmaps it when freed, so each large temporary is page-faulted in again. The step avoids "
        "such temporaries (fused head losses in small column blocks, targets in a workspace kept between steps, "
        "the fused AdamW kernel), and on CPU `cribo train` asks glibc to keep freed memory for reuse "
        "(`mallopt(M_MMAP_THRESHOLD / M_TRIM_THRESHOLD, 2 GiB)`, `cribo.runtime.keep_freed_memory`, on by default, "
        "`--keep_freed_memory false` turns it off). The right-hand columns are the same step with it off "
        "(glibc's defaults), to size what it buys and what it costs in memory.",
        common.markdown_table(headers, rows),
    ]


def _floor_notes(
    cribo: dict[str, dict[str, Any]], dino: dict[str, dict[str, Any]], authors: dict[str, AuthorsStep]
) -> str:
    parts = []
    for name in cribo:
        ours = author_phase_seconds(cribo[name]["phases"])
        floor = author_phase_seconds(dino[name]["phases"])
        extra = cribo[name]["instrumented_seconds"] - dino[name]["instrumented_seconds"]
        if extra <= 0:
            continue
        shares = {phase: (ours[phase] - floor[phase]) / extra for phase in AUTHOR_PHASES}
        top = sorted(shares.items(), key=lambda kv: -kv[1])[:3]
        parts.append(
            f"{name}: CrIBo adds {extra:.3f} s per step; "
            + ", ".join(f"{phase} {100 * share:.0f} %" for phase, share in top)
        )
    budget = []
    for name in cribo:
        if name in SPEED_GOALS and name in authors:
            allowed = authors[name].seconds / SPEED_GOALS[name]
            floor_s = dino[name]["seconds"]
            budget.append(
                f"{name}: the goal allows {allowed:.2f} s per step, the DINO floor alone takes {floor_s:.2f} s "
                f"({100 * floor_s / allowed:.0f} %), leaving {allowed - floor_s:+.2f} s for CrIBo's own work "
                f"(now {cribo[name]['seconds'] - floor_s:.2f} s)"
            )
    text = "Where the extra time goes (share of CrIBo − DINO, instrumented steps): " + "; ".join(parts) + "."
    if budget:
        text += " Budget of the speed goals: " + "; ".join(budget) + "."
    return text


# ------------------------------------------------------------------------------------------------ main


def measure_kind(
    kind: str,
    name: str,
    index: int,
    args: Any,
    pool: dict[str, StepSetting],
    rounds: dict[str, dict[str, list[dict[str, Any]]]],
    official: dict[str, list[dict[str, Any]]],
) -> None:
    """One measurement of one round: ours (``cribo``, ``dino``, ``cribo_malloc``) or the authors' step."""
    if kind == "authors":
        res = official_step(name, args)
        official[name].append(res)
        args.loads.append(common.load_1min())
        print(
            f"round {index + 1}/{args.rounds} {name} {kind:12s}: {res['seconds']:.3f} s/step, "
            f"peak RSS {res['peak_rss_mib']:.0f} MiB",
            flush=True,
        )
        return
    base = {"setting": dataclasses.asdict(pool[name]), "device": args.device, "threads": args.threads}
    job = base | {"warmup": args.warmup, "repeat": args.repeat, "kind": kind.split("_")[0]}
    res = run_job(job | {"glibc_default": kind.endswith("malloc")}, args.in_process)
    rounds[kind][name].append(res)
    args.loads.append(common.load_1min())
    print(
        f"round {index + 1}/{args.rounds} {name} {kind:12s}: {res['seconds']:.3f} s/step "
        f"({pool[name].batch / res['seconds']:.1f} img/s), peak RSS {res['peak_rss_mib']:.0f} MiB, "
        f"system {res['system_s']:.2f} s/step, split sum {res['instrumented_seconds']:.3f} s",
        flush=True,
    )


def median_round(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The round with the median seconds per step (the lower one of the two middle rounds for an even count),
    with every round's seconds per step added as ``round_seconds``."""
    ordered = sorted(results, key=lambda res: res["seconds"])
    return {**ordered[(len(ordered) - 1) // 2], "round_seconds": [res["seconds"] for res in results]}


def parse_args(argv: Sequence[str]) -> Any:
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--configs", default=None, help="comma-separated subset of A,B,C (default all)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up steps (default 2; 1 with --quick)")
    parser.add_argument("--repeat", type=int, default=None, help="measured steps (default 5; 1 with --quick)")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument("--in-process", action="store_true", help="measure in this process (no fresh subprocess)")
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="repeat every measurement in this many interleaved rounds (fresh workers each) and report the "
        "median round with the spread (default 1)",
    )
    parser.add_argument(
        "--official",
        type=Path,
        default=os.environ.get("CRIBO_OFFICIAL_DIR") or None,
        help="folder of the authors' CrIBo code (a scratch clone outside the project): measure it side by side, "
        "interleaved in every round (default $CRIBO_OFFICIAL_DIR; without it the authors' figures are quoted)",
    )
    parser.add_argument(
        "--no-malloc-diagnostic",
        dest="malloc_diagnostic",
        action="store_false",
        help="skip the extra CrIBo runs with glibc malloc keeping freed memory (page-fault diagnostic)",
    )
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error(f"--rounds must be at least 1, got {args.rounds}")
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    args.repeat = args.repeat if args.repeat is not None else (1 if args.quick else 5)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    job = common.worker_job(argv)
    if job is not None:
        common.emit_result(measure(job))
        return 0
    args = parse_args(argv)
    args.info, args.loads = common.machine_info(args.threads, args.device), []
    pool = QUICK_SETTINGS if args.quick else SETTINGS
    names = args.configs.split(",") if args.configs else list(pool)
    unknown = [name for name in names if name not in pool]
    if unknown:
        raise SystemExit(f"--configs: unknown configuration {unknown[0]!r}; valid: {sorted(pool)}")
    if args.official is not None and args.quick:
        raise SystemExit("--official measures the authors' A, B and C; it cannot run with --quick")
    # The malloc diagnostic changes the process's allocator for good: only in fresh workers.
    kinds = ["cribo", "dino"] + ([] if args.in_process or not args.malloc_diagnostic else ["cribo_malloc"])
    rounds: dict[str, dict[str, list[dict[str, Any]]]] = {kind: {name: [] for name in names} for kind in kinds}
    official: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    for index in range(args.rounds):  # interleaved, so that a slow spell of the machine hits every config
        for name in names:
            order = ["authors", *kinds] if args.official is not None else list(kinds)
            if index % 2:  # alternate who goes first, so that neither side always runs on a warmer machine
                order.reverse()
            for kind in order:
                measure_kind(kind, name, index, args, pool, rounds, official)
    runs = {"cribo": {}, "dino": {}, "cribo_malloc": {}} | {
        kind: {name: median_round(results) for name, results in by_name.items()} for kind, by_name in rounds.items()
    }
    authors = (
        {name: measured_authors(results) for name, results in official.items()}
        if args.official is not None
        else {name: QUOTED_AUTHORS[name] for name in names if name in QUOTED_AUTHORS}
    )
    path = report(args, runs, authors, argv)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
