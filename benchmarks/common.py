"""Shared helpers of the benchmark scripts: machine description, timing, peak memory, markdown sections.

Every script measures in *fresh worker subprocesses* (one per configuration) so that a peak resident set size
belongs to one measurement only: the parent runs ``python benchmarks/<script>.py --worker '<json job>'`` and
reads back one JSON line. Inside a worker, the peak rise of a piece of work is its ``VmHWM`` (peak RSS) above
the RSS just before it, after resetting the kernel's peak counter (``/proc/self/clear_refs``), so memory that
was allocated before (a 2.4 GB bank) does not count. Where that reset is not available the whole-process
peak (``getrusage(RUSAGE_SELF).ru_maxrss``) is used instead and the rise is then an upper bound.

Importing this module has no side effects.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"
# --quick runs are for development: their sections go to a temporary folder, never over the committed results.
QUICK_DIR = Path(tempfile.gettempdir()) / "cribo-bench-quick"
WORKER_FLAG = "--worker"
RESULT_MARK = "@@cribo-bench-result@@"
DEFAULT_THREADS = 2  # the authors' figures were taken with 2 threads on a 2-core machine
MIB = 2**20
WORKER_TIMEOUT_S = 1800
BUSY_LOAD = 1.5  # 1-min load average above which a 2-core machine is flagged as busy


# ------------------------------------------------------------------------------------------------ machine


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), or the platform's processor string."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def memory_total_mib() -> float:
    """Physical memory in MiB (``/proc/meminfo``), NaN when unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return math.nan


def machine_info(threads: int, device: str = "cpu") -> dict[str, Any]:
    """What the numbers were measured on: CPU, cores, memory, torch, threads, date and load average."""
    import torch

    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "memory_gib": round(memory_total_mib() / 1024, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": threads,
        "device": device,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "commit": code_version(),
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def code_version() -> str:
    """The measured code: ``git describe``-style short commit, ``+changes`` when the working tree differs; or
    ``unknown`` outside a git checkout."""
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", "src"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("+changes" if dirty else "")


def machine_lines(
    info: dict[str, Any], load_after: Sequence[float] | None = None, load_samples: Sequence[float] | None = None
) -> list[str]:
    """Markdown bullet lines describing the machine (for a section header).

    ``load_after`` is the load average when the section is written; ``load_samples`` are 1-minute load averages
    taken after each measurement of the run (their range is shown).
    """
    load = ", ".join(f"{x:.2f}" for x in info["load_average"])
    line = f"- Load average (1, 5, 15 min) at the start: {load}"
    if load_after:
        line += f"; at the end: {', '.join(f'{x:.2f}' for x in load_after)}"
    if load_samples:
        line += (
            f"; 1-min load after each measurement: {min(load_samples):.2f} to {max(load_samples):.2f} (this "
            f"includes the benchmark's own {info['threads']} threads)"
        )
    # During the run the benchmark itself adds about `threads` to the load.
    others = max([0.0, *(x - info["threads"] for x in load_samples or [])])
    if info["load_average"][0] > BUSY_LOAD or others > BUSY_LOAD:
        line += " — **the machine was busy: timings are inflated**"
    return [
        f"- Machine: {info['cpu']}, {info['cores']} cores, {info['memory_gib']} GiB; Python {info['python']}, "
        f"torch {info['torch']}; {info['threads']} torch threads; device `{info['device']}`"
        + (f" ({info['gpu']})" if "gpu" in info else ""),
        f"- Date: {info['date']}" + (f"; code: commit `{info['commit']}`" if info.get("commit") else ""),
        line,
    ]


def load_1min() -> float:
    """The current 1-minute load average."""
    return os.getloadavg()[0]


def set_threads(threads: int) -> None:
    """Fix torch's intra-op threads (the measurements are per thread count)."""
    import torch

    torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------------------ timing


def median(values: Iterable[float]) -> float:
    """Median of a non-empty sequence (NaN for an empty one)."""
    values = list(values)
    return statistics.median(values) if values else math.nan


def time_calls(
    fn: Callable[[], object], warmup: int, repeat: int, sync: Callable[[], None] | None = None
) -> list[float]:
    """Wall-clock seconds of ``repeat`` calls of ``fn`` after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    if sync is not None:
        sync()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        if sync is not None:
            sync()
        times.append(time.perf_counter() - start)
    return times


def gemm_gflops(size: int = 2048, repeat: int = 7, device: str = "cpu") -> float:
    """This machine's dense float32 matrix-product rate right now: median GFLOP/s of ``repeat`` square
    ``size``-sized ``torch.mm`` calls (after two warm-up calls), with the current torch thread setting."""
    import torch

    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    out = torch.empty(size, size, device=device)
    times = time_calls(lambda: torch.mm(a, b, out=out), 2, repeat, device_sync(device))
    return 2 * size**3 / median(times) / 1e9


@dataclass
class PhaseClock:
    """Accumulates wall-clock time per named phase of one step: ``lap(name)`` closes the phase since the last lap.

    ``sync`` (e.g. a CUDA synchronise) runs before each reading so that asynchronous work lands in its phase.
    """

    sync: Callable[[], None] | None = None
    phases: dict[str, float] = field(default_factory=dict)
    _last: float = 0.0

    def start(self) -> None:
        if self.sync is not None:
            self.sync()
        self.phases = {}
        self._last = time.perf_counter()

    def lap(self, name: str) -> None:
        if self.sync is not None:
            self.sync()
        now = time.perf_counter()
        self.phases[name] = self.phases.get(name, 0.0) + now - self._last
        self._last = now


def median_phases(runs: Sequence[dict[str, float]]) -> dict[str, float]:
    """Per-phase median over several steps (phases in the order of the first step)."""
    return {name: median(run.get(name, 0.0) for run in runs) for name in runs[0]} if runs else {}


def loglog_slope(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Least-squares slope of log(y) against log(x): the measured growth exponent."""
    points = [(math.log(x), math.log(y)) for x, y in zip(xs, ys) if x > 0 and y > 0]
    if len(points) < 2:
        return math.nan
    mean_x = sum(p[0] for p in points) / len(points)
    mean_y = sum(p[1] for p in points) / len(points)
    var = sum((p[0] - mean_x) ** 2 for p in points)
    return sum((p[0] - mean_x) * (p[1] - mean_y) for p in points) / var if var else math.nan


# ------------------------------------------------------------------------------------------------ memory


def _status_mib(key: str) -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return math.nan


def rss_mib() -> float:
    """Current resident set size of this process in MiB."""
    return _status_mib("VmRSS")


def peak_rss_mib() -> float:
    """Peak resident set size in MiB: ``VmHWM`` (resettable) or, without /proc, ``ru_maxrss``."""
    peak = _status_mib("VmHWM")
    if math.isnan(peak):
        scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / MIB
    return peak


def process_peak_rss_mib() -> float:
    """Whole-process peak RSS since start (``ru_maxrss``; never reset), in MiB."""
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / MIB


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (``VmHWM``) to the current RSS; False where not supported."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


@dataclass
class PeakRise:
    """Context manager: the peak memory rise (MiB) of the work inside it above the usage at its start.

    On CPU: resident set (VmHWM after a reset, minus VmRSS before). On CUDA (``device``): allocated tensor memory
    (``max_memory_allocated`` after a reset, minus ``memory_allocated`` before).
    """

    device: Any = None
    baseline_mib: float = math.nan
    rise_mib: float = math.nan
    exact: bool = False

    def _cuda(self) -> bool:
        return getattr(self.device, "type", str(self.device)) == "cuda"

    def __enter__(self) -> PeakRise:
        import gc

        gc.collect()
        if self._cuda():
            import torch

            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.exact = True
            self.baseline_mib = torch.cuda.memory_allocated(self.device) / MIB
        else:
            self.exact = reset_peak_rss()
            self.baseline_mib = rss_mib()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._cuda():
            import torch

            torch.cuda.synchronize(self.device)
            self.rise_mib = torch.cuda.max_memory_allocated(self.device) / MIB - self.baseline_mib
        else:
            self.rise_mib = peak_rss_mib() - self.baseline_mib


@dataclass
class CpuTimes:
    """User and system CPU seconds and minor page faults of this process, between ``start()`` and ``stop()``."""

    user_s: float = 0.0
    system_s: float = 0.0
    minor_faults: int = 0

    def start(self) -> CpuTimes:
        self._start = resource.getrusage(resource.RUSAGE_SELF)
        return self

    def stop(self) -> CpuTimes:
        end = resource.getrusage(resource.RUSAGE_SELF)
        self.user_s = end.ru_utime - self._start.ru_utime
        self.system_s = end.ru_stime - self._start.ru_stime
        self.minor_faults = end.ru_minflt - self._start.ru_minflt
        return self


def device_sync(device: Any) -> Callable[[], None] | None:
    """A synchronise function for an asynchronous device (CUDA), None on CPU."""
    import torch

    if getattr(device, "type", str(device)) == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return None


# ------------------------------------------------------------------------------------------------ workers


def worker_env() -> dict[str, str]:
    """Environment of a worker: the package sources and this folder importable."""
    env = dict(os.environ)
    paths = [str(REPO_ROOT / "src"), str(BENCH_DIR)]
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    return env


def run_worker(script: str | Path, job: dict[str, Any], timeout: float = WORKER_TIMEOUT_S) -> dict[str, Any]:
    """Run one measurement in a fresh interpreter (``script --worker JSON``) and return its JSON result."""
    command = [sys.executable, str(script), WORKER_FLAG, json.dumps(job)]
    done = subprocess.run(command, capture_output=True, text=True, env=worker_env(), timeout=timeout, check=False)
    for line in reversed(done.stdout.splitlines()):
        if line.startswith(RESULT_MARK):
            return json.loads(line[len(RESULT_MARK) :])
    tail = "\n".join((done.stdout + done.stderr).splitlines()[-30:])
    raise RuntimeError(f"worker {Path(script).name} {job} failed (exit {done.returncode}):\n{tail}")


# ------------------------------------------------------------------------------------------------ the authors' code

HARNESS_ENV = "CRIBO_REFHARNESS"  # overrides the path of the shared harness's bench.py
HARNESS_MARK = "RESULT "  # the harness's result lines


def official_harness() -> Path:
    """``shared/refharness/bench.py`` next to the repository (or ``$CRIBO_REFHARNESS``): it times the authors'
    code, imported at run time from a scratch folder outside the project."""
    return Path(os.environ.get(HARNESS_ENV, REPO_ROOT.parent / "shared" / "refharness" / "bench.py"))


def run_official(what: list[str], official: Path, threads: int) -> dict[str, Any]:
    """One measurement of the authors' code through the shared harness, in its own fresh process (their code is
    imported from ``official`` at run time, never copied): the harness's last ``RESULT`` line."""
    harness = official_harness()
    if not harness.is_file():
        raise SystemExit(f"--official: the harness {harness} is missing (set {HARNESS_ENV} to its bench.py)")
    command = [sys.executable, str(harness), "--official", str(official), "--threads", str(threads), *what]
    done = subprocess.run(
        command, capture_output=True, text=True, env=worker_env(), timeout=WORKER_TIMEOUT_S, check=False
    )
    lines = [line[len(HARNESS_MARK) :] for line in done.stdout.splitlines() if line.startswith(HARNESS_MARK)]
    if done.returncode or not lines:
        tail = "\n".join((done.stdout + done.stderr).splitlines()[-20:])
        raise RuntimeError(f"the authors' harness failed ({' '.join(command)}, exit {done.returncode}):\n{tail}")
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def worker_job(argv: Sequence[str]) -> dict[str, Any] | None:
    """The job of a worker invocation (``--worker JSON``), or None for a normal run."""
    if len(argv) >= 2 and argv[0] == WORKER_FLAG:
        return json.loads(argv[1])
    return None


def emit_result(result: dict[str, Any]) -> None:
    """A worker's answer to its parent: one marked JSON line on stdout."""
    sys.stdout.write(RESULT_MARK + json.dumps(result) + "\n")
    sys.stdout.flush()


# ------------------------------------------------------------------------------------------------ CLI + markdown


def base_parser(description: str) -> argparse.ArgumentParser:
    """The flags every script shares: --quick, --threads, --output-dir."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="tiny settings and iteration counts (smoke test)")
    parser.add_argument("--threads", type=int, default=DEFAULT_THREADS, help="torch CPU threads (default 2)")
    parser.add_argument(
        "--output-dir",
        type=Path,
        default=None,
        help=f"where the markdown section goes (default {RESULTS_DIR.relative_to(REPO_ROOT)}, or {QUICK_DIR} "
        "with --quick)",
    )
    return parser


def output_dir(args: argparse.Namespace) -> Path:
    """The section folder: --output-dir, else results/ (full mode) or a temporary folder (--quick)."""
    folder = args.output_dir or (QUICK_DIR if args.quick else RESULTS_DIR)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def command_line(script: str, argv: Sequence[str]) -> str:
    """How the section was produced, as one shell line."""
    return " ".join(["python", f"benchmarks/{script}", *(shlex.quote(a) for a in argv)])


def fmt(value: float, digits: int = 2) -> str:
    """A number for a table cell ("–" for NaN)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.{digits}f}"


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """A GitHub markdown table."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(" --- " for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def write_section(
    folder: Path,
    name: str,
    title: str,
    command: str,
    info: dict[str, Any],
    body: Sequence[str],
    load_samples: Sequence[float] | None = None,
) -> Path:
    """Write ``<folder>/<name>.md``: a ``##`` title, the command line, the machine, then the body blocks.

    ``info`` should be taken at the start of the run (:func:`machine_info`); the load average at the end is
    added here, and the range of ``load_samples`` (1-min loads taken during the run) when given.
    """
    header = machine_lines(info, os.getloadavg(), load_samples)
    text = [f"## {title}", "", f"Command: `{command}`", "", *header, ""]
    for block in body:
        text += [block, ""]
    path = folder / f"{name}.md"
    path.write_text("\n".join(text).rstrip() + "\n")
    return path
