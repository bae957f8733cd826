"""CrIBo's own parts alone: clustering, bank search + update, and the two-view augmentation (issue 5, item 2).

* Clustering: ``joint_space_clustering`` on 16 images, 2N = 392 tokens (two 224 px views), d = 384, K = 32,
  5 rounds of 5 Sinkhorn iterations; random tokens and realistic patch positions (two random crops of a
  500x375 image). Goal <= 0.25 s per call and <= 46 MiB peak RSS rise (authors: 1.75 s, +730 MiB).
* Bank search + update: ``match_objects`` (both views, cycle check) then ``ObjectMemoryBank.push`` with a bank of
  25 000 images x 32 objects x 384 dims (2.4 GB) and 16 images (512 objects per view) per call. The peak rise is
  measured *after* the bank is allocated. Goal <= 2 s and <= 256 MiB (authors: 8.8 s, +6.5 GiB). Measured with
  the bank in its initial state (uniform [0, 1) values, the authors' initialisation: every pair of entries has
  a cosine near 0.75, the hard case for the bfloat16 screen) and filled with Gaussian vectors; fresh queries at
  every call (a pushed batch would otherwise find itself at the next call).
* Augmentation: ``TwoViewAugmentation(224)`` on one 500x375 RGB image -> two views with positions. Goal
  <= 2.3 ms per image (authors: 6.96 ms); also with ``colour=False`` and with 1 thread.

Every part runs in its own fresh subprocess. ``python benchmarks/bench_parts.py`` (full) or ``--quick``.
Importing this module has no side effects.
"""

from __future__ import annotations

import random
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import common

SCRIPT = Path(__file__).resolve()
SOURCE_WH = (500, 375)  # the authors' augmentation benchmark image (width, height)


@dataclass(frozen=True)
class PartGoal:
    """The authors' figure and our goal for one part (reference/README.md; issue 5)."""

    authors_time: str
    authors_memory: str
    max_seconds: float
    max_rise_mib: float | None


GOALS: dict[str, PartGoal] = {
    "clustering": PartGoal("1.75 s", "+730 MiB", 0.25, 46.0),
    "bank": PartGoal("8.8 s", "+6.5 GiB", 2.0, 256.0),
    "augment": PartGoal("6.96 ms", "763 MiB table kept per process (3 GB transient)", 2.3e-3, None),
}
FULL = {
    "clustering": {"images": 16, "image_size": 224, "dim": 384, "clusters": 32, "warmup": 1, "repeat": 5},
    "bank": {"capacity": 25000, "objects": 32, "dim": 384, "images": 16, "warmup": 1, "repeat": 5},
    "augment": {"output_size": 224, "calls": 100, "rounds": 5, "warmup": 10},
}
QUICK = {
    "clustering": {"images": 2, "image_size": 64, "dim": 16, "clusters": 4, "warmup": 1, "repeat": 1},
    "bank": {"capacity": 64, "objects": 4, "dim": 16, "images": 2, "warmup": 1, "repeat": 1},
    "augment": {"output_size": 64, "calls": 3, "rounds": 1, "warmup": 1},
}
# (row key, bank contents, chunk size; None = the training loop's MethodConfig.bank_chunk_size)
BANK_VARIANTS: tuple[tuple[str, str, int | None], ...] = (
    ("bank_uniform", "uniform", None),
    ("bank_gaussian", "gaussian", None),
)
AUGMENT_VARIANTS: tuple[tuple[str, bool, int | None], ...] = (
    ("colour", True, None),  # the goal's row: full pipeline, --threads threads
    ("no colour", False, None),
    ("colour 1 thread", True, 1),
    ("no colour 1 thread", False, 1),
)


# ------------------------------------------------------------------------------------------------ measurements


def measure_clustering(job: dict[str, Any]) -> dict[str, Any]:
    """Seconds per ``joint_space_clustering`` call and the peak RSS rise of the calls."""
    import torch

    from bench_step import random_positions
    from cribo.clustering import joint_space_clustering

    device = torch.device(job.get("device", "cpu"))
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randn(job["images"], 2 * (job["image_size"] // 16) ** 2, job["dim"], generator=generator)
    positions = random_positions(job["images"], job["image_size"], 16, random.Random(0)).flatten(1, 2)
    tokens, positions = tokens.to(device), positions.to(device)

    def call() -> None:
        joint_space_clustering(tokens, positions, job["clusters"], 1.0, generator=generator)

    sync = common.device_sync(device)
    with common.PeakRise(device) as first:
        common.time_calls(call, 0, job["warmup"], sync)
    with common.PeakRise(device) as rise:
        times = common.time_calls(call, 0, job["repeat"], sync)
    return {
        "seconds": common.median(times),
        "times": times,
        "rise_mib": rise.rise_mib,
        "first_rise_mib": first.rise_mib,
        "exact": rise.exact,
    }


def measure_bank(job: dict[str, Any]) -> dict[str, Any]:
    """Seconds per ``match_objects`` + ``push`` call with a bank in the given state, and the peak RSS rise."""
    import torch

    from cribo.config import MethodConfig
    from cribo.matching import match_objects
    from cribo.memory import ObjectMemoryBank
    from cribo.search import BankKeys

    chunk_size = job.get("chunk_size") or MethodConfig().bank_chunk_size
    device = torch.device(job.get("device", "cpu"))
    sync = common.device_sync(device) or (lambda: None)
    generator = torch.Generator().manual_seed(0)
    started = time.perf_counter()
    bank = ObjectMemoryBank(job["capacity"], job["objects"], job["dim"], generator=generator)
    if job["state"] == "gaussian":
        bank.objects.normal_(generator=generator)
    bank, keys = bank.to(device), BankKeys()  # the screening keys, kept as the trainer keeps them
    alloc_s = time.perf_counter() - started
    bank_mib = bank.objects.numel() * 4 / common.MIB
    calls = job["warmup"] + job["repeat"]
    per_view = job["images"] * job["objects"]
    queries = [torch.randn(per_view, 2, job["dim"], generator=generator).to(device) for _ in range(calls)]
    per_image = torch.full((job["images"],), job["objects"], dtype=torch.int64, device=device)
    times, found = [], []

    def call(objects: Any) -> None:
        sync()
        start = time.perf_counter()
        matches = match_objects(objects, bank, chunk_size=chunk_size, keys=keys)
        keys.update(bank, bank.push(objects, per_image))
        sync()
        times.append(time.perf_counter() - start)
        found.append(float(matches.cycle_mask.sum()))

    with common.PeakRise(device) as first:
        for objects in queries[: job["warmup"]]:
            call(objects)
    del times[:]
    with common.PeakRise(device) as rise:
        for objects in queries[job["warmup"] :]:
            call(objects)
    return {
        "seconds": common.median(times),
        "times": times,
        "rise_mib": rise.rise_mib,
        "first_rise_mib": first.rise_mib,
        "exact": rise.exact,
        "bank_mib": bank_mib,
        "alloc_s": alloc_s,
        "baseline_mib": rise.baseline_mib,
        "cycle_consistent": common.median(found),
        "chunk_size": chunk_size,
    }


def source_image() -> Any:
    """A 500x375 RGB test image: smooth colour gradients plus noise (content barely matters for the cost)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    width, height = SOURCE_WH
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([xx / width * 255, yy / height * 255, (xx + yy) / (width + height) * 255], axis=-1)
    pixels = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels, "RGB")


def measure_augment(job: dict[str, Any]) -> dict[str, Any]:
    """Milliseconds per image (two views + positions): median over rounds of the mean of ``calls`` calls."""
    import torch

    from cribo.augment import TwoViewAugmentation

    if job.get("aug_threads"):
        torch.set_num_threads(job["aug_threads"])
    augmentation = TwoViewAugmentation(output_size=job["output_size"], colour=job["colour"])
    image = source_image()
    seed = 0
    for _ in range(job["warmup"]):
        augmentation(image, seed=seed)
        seed += 1
    rounds = []
    with common.PeakRise() as rise:
        for _ in range(job["rounds"]):
            start = time.perf_counter()
            for _ in range(job["calls"]):
                augmentation(image, seed=seed)
                seed += 1
            rounds.append((time.perf_counter() - start) / job["calls"])
    return {
        "seconds": common.median(rounds),
        "times": rounds,
        "rise_mib": rise.rise_mib,
        "exact": rise.exact,
        "threads": torch.get_num_threads(),
        "colour": job["colour"],
    }


# Expected calls per image of each step of the two-view pipeline (authors' probabilities, both views).
COLOUR_STEP_CALLS: dict[str, float] = {
    "crop + resize (bicubic, antialias)": 2.0,
    "brightness": 1.6,
    "contrast": 1.6,
    "saturation": 1.6,
    "hue (exact HSV rotation)": 1.6,
    "grayscale": 0.4,
    "Gaussian blur (sigma U[0.1, 2])": 1.1,
    "solarise": 0.2,
}


def measure_augment_steps(job: dict[str, Any]) -> dict[str, Any]:
    """Milliseconds per call of each step of the pipeline on one view (where the augmentation's time goes)."""
    import numpy as np
    import torch

    from cribo import augment

    image = source_image()
    size = job["output_size"]
    source = torch.from_numpy(np.array(image)).permute(2, 0, 1)
    box = augment.CropBox(20, 30, 300, 360, False)
    view = augment.crop_view(source, box, size).float()
    rng = random.Random(0)
    steps = {
        "crop + resize (bicubic, antialias)": lambda: augment.crop_view(source, box, size),
        "brightness": lambda: augment.adjust_brightness(view, 1.2),
        "contrast": lambda: augment.adjust_contrast(view, 1.2),
        "saturation": lambda: augment.adjust_saturation(view, 1.1),
        "hue (exact HSV rotation)": lambda: augment.shift_hue(view, 0.05),
        "grayscale": lambda: augment.grayscale(view),
        "Gaussian blur (sigma U[0.1, 2])": lambda: augment.gaussian_blur(view, rng.uniform(0.1, 2.0)),
        "solarise": lambda: augment.solarize(view),
    }
    calls = job["calls"]
    return {name: common.median(common.time_calls(step, job["warmup"], calls)) for name, step in steps.items()} | {
        "seconds": 0.0,
        "rise_mib": 0.0,
    }


MEASURES = {
    "clustering": measure_clustering,
    "bank": measure_bank,
    "augment": measure_augment,
    "augment_steps": measure_augment_steps,
}


def measure(job: dict[str, Any]) -> dict[str, Any]:
    """Dispatch one job (in this process)."""
    common.set_threads(job["threads"])
    return MEASURES[job["part"]](job)


def run_job(job: dict[str, Any], in_process: bool) -> dict[str, Any]:
    return measure(job) if in_process else common.run_worker(SCRIPT, job)


# ------------------------------------------------------------------------------------------------ report


def _rise(res: dict[str, Any]) -> str:
    """Steady-state rise, with the first (warm-up) call's rise beside it."""
    return f"+{res['rise_mib']:.0f} MiB (first call +{res['first_rise_mib']:.0f})"


def _ok(ok: bool) -> str:
    return "**pass**" if ok else "**FAIL**"


def parts_table(results: dict[str, dict[str, Any]], sizes: dict[str, dict[str, Any]]) -> str:
    """One row per measurement: ours, the authors', the goals."""
    rows = []
    clustering = results["clustering"]
    goal = GOALS["clustering"]
    c = sizes["clustering"]
    rows.append(
        [
            "clustering",
            f"{c['images']} images, 2N = {2 * (c['image_size'] // 16) ** 2}, d = {c['dim']}, K = {c['clusters']}",
            f"{clustering['seconds']:.3f} s",
            _rise(clustering),
            goal.authors_time,
            goal.authors_memory,
            f"≤ {goal.max_seconds} s {_ok(clustering['seconds'] <= goal.max_seconds)}; "
            f"≤ {goal.max_rise_mib:.0f} MiB {_ok(clustering['rise_mib'] <= goal.max_rise_mib)}",
        ]
    )
    goal = GOALS["bank"]
    b = sizes["bank"]
    for key, state, _ in BANK_VARIANTS:
        res = results[key]
        contents = "initial state, uniform [0, 1)" if state == "uniform" else "Gaussian bank"
        rows.append(
            [
                f"bank search + update ({contents}; chunk {res['chunk_size']})",
                f"bank {b['capacity']} images x {b['objects']} x {b['dim']} ({res['bank_mib']:.0f} MiB), "
                f"{b['images']} images ({b['images'] * b['objects']} objects / view)",
                f"{res['seconds']:.3f} s",
                _rise(res),
                goal.authors_time,
                goal.authors_memory,
                f"≤ {goal.max_seconds} s {_ok(res['seconds'] <= goal.max_seconds)}; "
                f"≤ {goal.max_rise_mib:.0f} MiB {_ok(res['rise_mib'] <= goal.max_rise_mib)}",
            ]
        )
    goal = GOALS["augment"]
    for label, _, _ in AUGMENT_VARIANTS:
        res = results[f"augment {label}"]
        is_goal = label == AUGMENT_VARIANTS[0][0]
        rows.append(
            [
                f"augmentation ({'colour=True' if res['colour'] else 'colour=False'}, {res['threads']} "
                f"thread{'s' if res['threads'] > 1 else ''})",
                f"one 500x375 RGB image -> two {sizes['augment']['output_size']} px views + positions",
                f"{res['seconds'] * 1e3:.2f} ms",
                f"+{res['rise_mib']:.0f} MiB",
                goal.authors_time if is_goal else "–",
                goal.authors_memory if is_goal else "–",
                f"≤ {goal.max_seconds * 1e3} ms {_ok(res['seconds'] <= goal.max_seconds)}" if is_goal else "–",
            ]
        )
    headers = ["part", "setting", "time (ours)", "peak RSS rise (ours)", "time (authors)", "memory (authors)", "goal"]
    return common.markdown_table(headers, rows)


def report(args: Any, results: dict[str, dict[str, Any]], sizes: dict[str, Any], argv: Sequence[str]) -> Path:
    bank = results["bank_uniform"]
    body = [
        ("Each part in this process (--in-process)" if args.in_process else "Each part in its own fresh subprocess")
        + "; times are medians after warm-up (clustering and bank: "
        f"{sizes['clustering']['warmup']} warm-up + {sizes['clustering']['repeat']} measured calls; augmentation: "
        f"median over {sizes['augment']['rounds']} rounds of the mean of {sizes['augment']['calls']} images). "
        "*Peak RSS rise* is the process's peak resident set during the measured calls above its resident set "
        "just before them (the kernel's peak counter is reset first), so the 2.4 GB bank itself is not counted; "
        "the goals are checked on the measured (steady-state) calls; the rise of the first (warm-up) call, "
        "which includes one-time growth of the process (allocator arenas, kernels' first use), is shown beside it. "
        "The authors' figures come from another run of their code on a machine of the same kind (2 cores), "
        "reference/README.md." + (" **Quick mode: tiny settings, not comparable.**" if args.quick else ""),
        parts_table(results, sizes),
        f"Bank allocation (uniform initial values, {bank['bank_mib']:.0f} MiB) took {bank['alloc_s']:.1f} s; "
        f"process RSS before the measured calls {bank['baseline_mib']:.0f} MiB. Cycle-consistent retrievals per "
        f"call (median): {results['bank_uniform']['cycle_consistent']:.0f} (uniform bank), "
        f"{results['bank_gaussian']['cycle_consistent']:.0f} (Gaussian bank). The first search builds the "
        "bank's bfloat16 copy of its unit-norm objects (half the bank's size, kept between calls and updated by "
        "`push` for the written slots only; not saved in checkpoints): it is most of the first call's rise and is "
        "included in the resident set before the measured calls. The search screens with it in bfloat16 (about "
        "400 GFLOP/s on this CPU against 180 in float32) and rescores the candidates in float32, so the indices "
        "are those of the exact float32 search.",
    ]
    body += augment_steps_blocks(results["augment steps"])
    command = common.command_line(SCRIPT.name, argv)
    folder = common.output_dir(args)
    return common.write_section(folder, "bench_parts", "Parts alone (CPU)", command, args.info, body, args.loads)


def augment_steps_blocks(steps: dict[str, Any]) -> list[str]:
    """Where the augmentation's time goes: each step's time per call times its expected calls per image."""
    rows, total = [], 0.0
    for name, calls in COLOUR_STEP_CALLS.items():
        per_image = steps[name] * calls
        total += per_image
        rows.append([name, f"{steps[name] * 1e3:.3f}", f"{calls:g}", f"{per_image * 1e3:.3f}"])
    rows.append(["sum", "", "", f"{total * 1e3:.3f}"])
    return [
        "Where the augmentation's time goes (one view, median per call; expected calls per image from the "
        "authors' probabilities: jitter p = 0.8 per view, grayscale 0.2, blur 1.0 / 0.1, solarise 0 / 0.2):",
        common.markdown_table(["step", "ms per call", "calls per image", "ms per image"], rows),
    ]


def parse_args(argv: Sequence[str]) -> Any:
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--in-process", action="store_true", help="measure in this process (no fresh subprocess)")
    return parser.parse_args(argv)


def jobs(args: Any) -> dict[str, dict[str, Any]]:
    """Every measurement of the section, keyed by its row name."""
    sizes = QUICK if args.quick else FULL
    base = {"threads": args.threads}
    todo: dict[str, dict[str, Any]] = {"clustering": {**base, "part": "clustering", **sizes["clustering"]}}
    for key, state, chunk in BANK_VARIANTS:
        todo[key] = {**base, "part": "bank", "state": state, "chunk_size": chunk, **sizes["bank"]}
    for label, colour, threads in AUGMENT_VARIANTS:
        todo[f"augment {label}"] = {**base, "part": "augment", "colour": colour, "aug_threads": threads}
        todo[f"augment {label}"] |= sizes["augment"]
    todo["augment steps"] = {**base, "part": "augment_steps", **sizes["augment"]}
    return todo


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    job = common.worker_job(argv)
    if job is not None:
        common.emit_result(measure(job))
        return 0
    args = parse_args(argv)
    args.info, args.loads = common.machine_info(args.threads), []
    results = {}
    for name, job in jobs(args).items():
        results[name] = run_job(job, args.in_process)
        args.loads.append(common.load_1min())
        res = results[name]
        print(f"{name}: {res['seconds'] * 1e3:.2f} ms per call, peak RSS rise {res['rise_mib']:.0f} MiB", flush=True)
    path = report(args, results, QUICK if args.quick else FULL, argv)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
