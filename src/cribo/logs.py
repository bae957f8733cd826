"""The run's log: the running means of a logging window, the JSON lines of ``log.txt``, and its trimming on resume.

``log.txt`` holds one JSON line per window of ``log_every`` steps (and one for an epoch's last, partial window) in
the authors' keys (``d_loss``, ``s_loss``, ``nn_loss``, ``r_cnt``, ``bootstrap_centroid_ratio``, ``lr``, ``wd``)
plus images/s, peak memory and the skipped images. The window is saved with each checkpoint and the file cut back
to the checkpoint's step on resume, so a resumed run writes exactly the lines of an uninterrupted one.
"""

from __future__ import annotations

import json
import logging
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cribo import distributed
from cribo.files import atomic_write_text

__all__ = ["LOG_NAME", "RunningMeans", "append_line", "log_record", "peak_memory_mb", "trim_log"]

logger = logging.getLogger(__name__)

LOG_NAME = "log.txt"


@dataclass
class RunningMeans:
    """Averages of the logged numbers since the last log line (saved in checkpoints, so that a resumed run writes
    the lines an uninterrupted one would)."""

    sums: dict[str, float] = field(default_factory=dict)
    count: int = 0
    images: int = 0
    started: float = field(default_factory=time.perf_counter)

    def add(self, numbers: dict[str, float], images: int) -> None:
        for key, value in numbers.items():
            self.sums[key] = self.sums.get(key, 0.0) + value
        self.count += 1
        self.images += images

    def flush(self) -> dict[str, float]:
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        means = {key: value / max(self.count, 1) for key, value in self.sums.items()}
        means["images_per_s"] = self.images * distributed.world_size() / elapsed
        self.sums, self.count, self.images, self.started = {}, 0, 0, time.perf_counter()
        return means

    def state(self) -> dict[str, Any]:
        """The window as plain numbers (for the checkpoint)."""
        elapsed = time.perf_counter() - self.started
        return {"sums": dict(self.sums), "count": self.count, "images": self.images, "elapsed": elapsed}

    def restore(self, state: dict[str, Any]) -> None:
        """Continue the window that :meth:`state` captured (an empty one when ``state`` is empty)."""
        self.sums = {key: float(value) for key, value in state.get("sums", {}).items()}
        self.count, self.images = int(state.get("count", 0)), int(state.get("images", 0))
        self.started = time.perf_counter() - float(state.get("elapsed", 0.0))


def peak_memory_mb(device: torch.device) -> float:
    """Peak accelerator memory (CUDA) or peak resident set size (CPU) in MiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def log_record(
    position: tuple[int, int], numbers: dict[str, float], device: torch.device, skipped: int
) -> dict[str, float]:
    """One line of the log: ``(epoch, step)``, the window's means, peak memory and the images skipped so far."""
    epoch, step = position
    return {"epoch": epoch, "step": step, **numbers, "peak_mem_mb": peak_memory_mb(device), "skipped_images": skipped}


def append_line(output_dir: Path, record: dict[str, float]) -> None:
    """Append one JSON line to ``log.txt`` (rank 0 only)."""
    if distributed.is_main_process():
        with open(Path(output_dir) / LOG_NAME, "a") as handle:
            handle.write(json.dumps(record) + "\n")


def trim_log(output_dir: Path, step: int) -> None:
    """Keep the lines of ``log.txt`` up to global step ``step`` (a resumed run writes the later ones again).

    Lines a killed run wrote after its last checkpoint, and a torn last line, are dropped.
    """
    path = Path(output_dir) / LOG_NAME
    if not path.is_file():
        return
    lines = path.read_text().splitlines()
    steps = [_log_step(line) for line in lines]
    kept = [line for line, line_step in zip(lines, steps) if line_step is not None and line_step <= step]
    if len(kept) != len(lines):
        atomic_write_text(path, "".join(line + "\n" for line in kept))
        logger.info("log.txt: %d line(s) after step %d dropped (written again on resume)", len(lines) - len(kept), step)


def _log_step(line: str) -> int | None:
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    return int(record["step"]) if isinstance(record, dict) and isinstance(record.get("step"), (int, float)) else None
