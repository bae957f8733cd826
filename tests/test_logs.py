"""Tests of cribo.logs: the logging window's state round trip, the lines, and trimming on resume."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from cribo.logs import LOG_NAME, RunningMeans, append_line, log_record, trim_log


def test_window_state_round_trips_and_flushes_means() -> None:
    window = RunningMeans()
    window.add({"loss": 2.0}, images=4)
    window.add({"loss": 4.0}, images=4)
    restored = RunningMeans()
    restored.restore(window.state())
    assert (restored.count, restored.images, restored.sums) == (2, 8, {"loss": 6.0})
    means = restored.flush()
    assert means["loss"] == 3.0 and means["images_per_s"] > 0
    assert restored.count == 0 and RunningMeans().state()["count"] == 0
    empty = RunningMeans()
    empty.restore({})  # a checkpoint older than the window: an empty one
    assert empty.count == 0


def test_lines_and_trimming(tmp_path: Path) -> None:
    for step in (1, 2, 3):
        append_line(tmp_path, log_record((0, step), {"loss": float(step)}, torch.device("cpu"), skipped=0))
    with open(tmp_path / LOG_NAME, "a") as handle:
        handle.write('{"step": 4, "lo')  # a line torn by a kill
    trim_log(tmp_path, 2)
    rows = [json.loads(line) for line in (tmp_path / LOG_NAME).read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2] and rows[0]["peak_mem_mb"] > 0 and rows[0]["skipped_images"] == 0
    trim_log(tmp_path / "absent", 5)  # no log yet: nothing to do
