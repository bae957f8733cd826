"""The error surface of the `cribo` command (issue 10): each bad input, built in a temp folder, ends in one line that
names the file or flag and says what to do, with a non-zero exit code, no traceback and an untouched run folder;
nothing hangs (FIFOs, sockets, devices in a data folder); nothing is left behind (temp files of a killed writer);
logs continue exactly after a resume.

The commands run in-process (``cribo.cli.main``) to keep the suite fast; one test kills a real `cribo train`
process with SIGKILL.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import TINY_RUN, tiny_config
from cribo import checkpoint
from cribo.cli import main
from cribo.train import train

REPO_ROOT = Path(__file__).resolve().parents[1]
TINY = TINY_RUN  # the suite's tiny run, given as flags or overrides
TIMING_FIELDS = ("images_per_s", "peak_mem_mb")  # the only log fields that may differ between identical runs
SMALL_EVAL = ["--scenes-train-images", "4", "--scenes-val-images", "2", "--scenes-image-size", "32", "--no-progress"]
SMALL_VIZ = ["--num-images", "1", "--image-size", "32", "--input-size", "32"]
CORRUPTIONS = ("random", "zeros", "empty", "truncated", "pickle")
INFO_LINE = re.compile(r"\d\d:\d\d:\d\d INFO ")  # cli.setup_logging's format


def tiny_flags(output_dir: Path, **extra: Any) -> list[str]:
    values = {**TINY, "output_dir": str(output_dir), **extra}
    return [item for key, value in values.items() for item in (f"--{key}", str(value))] + ["--no-progress"]


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """Run `cribo ARGV` in-process; (exit code, stderr). The logging set-up of `main` is undone afterwards."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        with pytest.raises(SystemExit) as exited:
            main(argv)
    finally:
        root.handlers[:], root.level = handlers, level
    code = exited.value.code
    return (code if isinstance(code, int) else 1), capsys.readouterr().err


def assert_one_line_error(code: int, err: str, command: str, *names: str) -> str:
    """Exit code 2 and one line, `cribo COMMAND: error: ...` naming each of ``names``, after at most the INFO log
    lines of what ran before (no warning, no traceback)."""
    lines = [line for line in err.splitlines() if line.strip() and not INFO_LINE.match(line)]
    assert code == 2, err
    assert "Traceback" not in err, err
    assert len(lines) == 1, err
    assert err.rstrip().splitlines()[-1] == lines[0]
    assert lines[0].startswith(f"cribo {command}: error: "), lines[0]
    for name in names:
        assert name in lines[0], (name, lines[0])
    return lines[0]


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` with its bytes (to check that a failure left it untouched)."""
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def strip_timing(row: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in row.items() if key not in TIMING_FIELDS}


def read_log(output_dir: Path) -> list[dict[str, Any]]:
    return [strip_timing(json.loads(line)) for line in (output_dir / "log.txt").read_text().splitlines()]


class Refused:
    """A class the safe loader does not allow: a checkpoint holding one is a genuine pickle."""


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-step tiny run (its checkpoint and log); tests copy what they change."""
    output_dir = tmp_path_factory.mktemp("trained") / "run"
    train(tiny_config(output_dir, max_steps=2), progress_bar=False)
    return output_dir


def write_corrupt(path: Path, kind: str, real: Path) -> None:
    """A bad weights file of ``kind``: random bytes, zeros, empty, the first half of a real checkpoint, a pickle."""
    data = real.read_bytes()
    if kind == "random":
        path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    elif kind == "zeros":
        path.write_bytes(bytes(len(data)))
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        path.write_bytes(data[: len(data) // 2])
    else:
        torch.save({"student": {}, "teacher": {}, "config": {}, "step": 1, "extra": Refused()}, path)


def check_corrupt_message(line: str, kind: str) -> None:
    if kind == "pickle":
        assert "pickled" in line
    else:
        assert "is not a valid checkpoint" in line and "--allow-pickle" not in line
        assert {"random": "not a PyTorch file", "zeros": "zero", "empty": "empty", "truncated": "truncated"}[
            kind
        ] in line


# ----------------------------------------------------------------------------------------------------------------
# 1. Damaged, truncated, random and pickled files, for every command that reads one


@pytest.mark.parametrize("kind", CORRUPTIONS)
def test_damaged_checkpoint_on_resume(
    kind: str, trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    run.mkdir()
    write_corrupt(run / "checkpoint.pth", kind, trained / "checkpoint.pth")
    before = snapshot(run)
    line = assert_one_line_error(*run_cli(["train", *tiny_flags(run)], capsys), "train", str(run / "checkpoint.pth"))
    check_corrupt_message(line, kind)
    assert "--allow-pickle" not in line  # `cribo train` has no such flag: its checkpoints never hold pickles
    assert "--output_dir" in line  # how to start over
    assert snapshot(run) == before


@pytest.mark.parametrize("kind", CORRUPTIONS)
@pytest.mark.parametrize("command", ["eval", "export", "viz"])
def test_damaged_weights_file(
    kind: str, command: str, trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "weights.pth"
    write_corrupt(path, kind, trained / "checkpoint.pth")
    argv = {
        "eval": ["eval", "nn", "--backbone", str(path), *SMALL_EVAL, "--output", str(tmp_path / "r.json")],
        "export": ["export", str(path), str(tmp_path / "out.safetensors")],
        "viz": ["viz", "pca", "--backbone", str(path), *SMALL_VIZ, "--output", str(tmp_path / "p.png")],
    }[command]
    line = assert_one_line_error(*run_cli(argv, capsys), command, str(path))
    check_corrupt_message(line, kind)
    if kind == "pickle":
        assert "--allow-pickle" in line  # only a genuine pickle gets that hint
    assert sorted(p.name for p in tmp_path.iterdir()) == ["weights.pth"]  # nothing written


@pytest.mark.parametrize("content", ["random", "pickle", "truncated"])
def test_bad_safetensors_file(content: str, trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "weights.safetensors"
    if content == "random":
        path.write_bytes(np.random.default_rng(1).integers(0, 256, 2048, dtype=np.uint8).tobytes())
    elif content == "pickle":
        path.write_bytes((trained / "checkpoint.pth").read_bytes())
    else:
        code, _ = run_cli(["export", str(trained / "checkpoint.pth"), str(path)], capsys)
        assert code == 0
        path.write_bytes(path.read_bytes()[:-100])
    argv = ["viz", "pca", "--backbone", str(path), *SMALL_VIZ, "--output", str(tmp_path / "p.png")]
    line = assert_one_line_error(*run_cli(argv, capsys), "viz", str(path), "not a valid safetensors file")
    assert "--allow-pickle" not in line
    if content == "pickle":
        assert ".pth" in line  # says to name it as what it is


def test_pickle_is_read_only_with_allow_pickle(
    trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state = torch.load(trained / "checkpoint.pth", weights_only=True)
    state["extra"] = Refused()
    torch.save(state, tmp_path / "pickled.pth")
    argv = ["export", str(tmp_path / "pickled.pth"), str(tmp_path / "out.safetensors")]
    assert_one_line_error(*run_cli(argv, capsys), "export", "--allow-pickle")
    code, _ = run_cli([*argv, "--allow-pickle"], capsys)
    assert code == 0 and (tmp_path / "out.safetensors").is_file()


def test_corrupt_cache_entry_is_recomputed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cache = tmp_path / "cache"
    argv = ["eval", "nn", "--backbone", "random:vit_tiny", *SMALL_EVAL, "--cache-dir", str(cache)]
    code, _ = run_cli([*argv, "--output", str(tmp_path / "a.json")], capsys)
    assert code == 0
    entries = sorted(cache.glob("*.pt"))
    assert entries
    good = {path: path.read_bytes() for path in entries}
    for index, path in enumerate(entries):  # one truncated, the others random bytes
        path.write_bytes(good[path][: len(good[path]) // 2] if index == 0 else os.urandom(1000))
    code, err = run_cli([*argv, "--output", str(tmp_path / "b.json")], capsys)
    assert code == 0 and "Traceback" not in err
    assert err.count("is damaged") == len(entries) and "computing it again" in err
    assert all(torch.load(path, weights_only=True) for path in entries)  # written again
    first, second = (json.loads((tmp_path / name).read_text()) for name in ("a.json", "b.json"))
    assert first["per_class_iou"] == second["per_class_iou"]


# ----------------------------------------------------------------------------------------------------------------
# Configuration files, output folder, device


def test_malformed_yaml_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  arch: vit_tiny\n  depth: [2\nrun:\n  seed: 0\n")
    line = assert_one_line_error(
        *run_cli(["train", "--config", str(path), "--output_dir", str(tmp_path / "run")], capsys),
        "train",
        f"--config {path}",
        "not valid YAML",
    )
    assert "line " in line
    assert not (tmp_path / "run").exists()


def test_missing_config_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "nowhere.yaml"
    argv = ["train", "--config", str(path), "--output_dir", str(tmp_path / "run")]
    assert_one_line_error(*run_cli(argv, capsys), "train", f"--config {path}", "no such file")


def test_verbose_shows_the_traceback(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["train", "--config", str(tmp_path / "nowhere.yaml"), "--output_dir", str(tmp_path / "run")]
    code, err = run_cli(["-v", *argv], capsys)
    assert code == 2 and "Traceback" in err
    assert err.rstrip().splitlines()[-1].startswith("cribo train: error: --config")


def test_corrupt_training_log_for_viz_curves(trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "log.txt").write_text((trained / "log.txt").read_text() + '{"epoch": 0, "st\n')
    line = assert_one_line_error(*run_cli(["viz", "curves", str(tmp_path)], capsys), "viz", str(tmp_path / "log.txt"))
    assert "line 3" in line


def test_missing_data_folder_leaves_no_output_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["train", *tiny_flags(tmp_path / "run", data_path=str(tmp_path / "nowhere"))]
    assert_one_line_error(*run_cli(argv, capsys), "train", str(tmp_path / "nowhere"))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("layout", ["file", "under_file"])
def test_output_dir_that_cannot_be_a_folder(layout: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("a file\n")
    output_dir = blocker if layout == "file" else blocker / "run"
    line = assert_one_line_error(*run_cli(["train", *tiny_flags(output_dir)], capsys), "train", "--output_dir")
    assert str(blocker) in line and "is a file" in line
    assert blocker.read_text() == "a file\n" and sorted(tmp_path.iterdir()) == [blocker]


def test_read_only_output_dir(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    output_dir = tmp_path / "run"
    output_dir.mkdir()
    output_dir.chmod(0o555)
    try:
        if os.geteuid() != 0:  # root writes through chmod: the real check only runs as another user
            line = assert_one_line_error(*run_cli(["train", *tiny_flags(output_dir)], capsys), "train", "--output_dir")
            assert "not writable" in line
    finally:
        output_dir.chmod(0o755)
    # The same, simulated (any user): the folder refuses new files, as a read-only mount would.
    original = Path.write_bytes

    def refuse(self: Path, data: bytes) -> int:
        if self.parent == output_dir:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
        return original(self, data)

    monkeypatch.setattr(Path, "write_bytes", refuse)
    line = assert_one_line_error(*run_cli(["train", *tiny_flags(output_dir)], capsys), "train", "--output_dir")
    assert f"{output_dir} is not writable" in line and list(output_dir.iterdir()) == []


@pytest.mark.parametrize("command", ["train", "eval", "viz"])
def test_unavailable_device(command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    device = "mps" if torch.cuda.is_available() else "cuda"  # mps is never there on Linux, cuda only with a GPU
    if device == "mps" and torch.backends.mps.is_available():
        pytest.skip("this machine has both CUDA and MPS")
    argv = {
        "train": ["train", *tiny_flags(tmp_path / "run", device=device)],
        "eval": ["eval", "nn", "--backbone", "random:vit_tiny", *SMALL_EVAL, "--device", device],
        "viz": ["viz", "pca", "--backbone", "random:vit_tiny", *SMALL_VIZ, "--device", device],
    }[command]
    line = assert_one_line_error(*run_cli(argv, capsys), command, f"--device {device}")
    assert "--device cpu" in line
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------------------------------------------
# Resuming with settings that change a tensor shape or the optimiser's groups


@pytest.mark.parametrize(
    ("flag", "value", "saved"),
    [
        ("arch", "vit_small", "vit_tiny"),
        ("depth", "3", "2"),
        ("queue_size", "16", "12"),
        ("n_tokens", "6", "4"),
        ("frozen_blocks", "1", "0"),
        ("backbone_lr_scale", "0.5", "1.0"),
    ],
)
def test_resume_with_a_shape_changing_setting(
    flag: str, value: str, saved: str, trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    run.mkdir()
    for name in ("checkpoint.pth", "log.txt", "config.yaml"):
        (run / name).write_bytes((trained / name).read_bytes())
    before = snapshot(run)
    argv = ["train", *tiny_flags(run, **{flag: value})]
    line = assert_one_line_error(*run_cli(argv, capsys), "train", f"--{flag} {saved} in the checkpoint", "--output_dir")
    assert f"{value} in this run" in line and f"Resume with --{flag} {saved}" in line
    assert snapshot(run) == before


# ----------------------------------------------------------------------------------------------------------------
# A full disk while writing a checkpoint or an export


def fill_disk_in_torch_save(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch.save writes part of the file, then the device is full: torch reports a RuntimeError raised while
    handling the OSError (ENOSPC) of the failed write, as it does on a real full disk."""

    def full(obj: Any, handle: Any, *args: Any, **kwargs: Any) -> None:
        handle.write(b"PK\x03\x04 partial")
        try:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc] unexpected pos") from None

    monkeypatch.setattr(torch, "save", full)


@pytest.mark.parametrize("previous", [True, False])
def test_full_disk_while_writing_a_checkpoint(
    previous: bool, trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    run = tmp_path / "run"
    run.mkdir()
    if previous:
        for name in ("checkpoint.pth", "log.txt", "config.yaml"):
            (run / name).write_bytes((trained / name).read_bytes())
    before = (run / "checkpoint.pth").read_bytes() if previous else None
    fill_disk_in_torch_save(monkeypatch)
    argv = ["train", *tiny_flags(run, max_steps=3)]
    code, err = run_cli(argv, capsys)
    step = "2" if previous else "none"
    assert_one_line_error(code, err, "train", f"no space left on device, last good checkpoint: step {step}")
    if previous:
        assert (run / "checkpoint.pth").read_bytes() == before
    else:
        assert not (run / "checkpoint.pth").exists()
    assert not [path for path in run.iterdir() if ".tmp-" in path.name]


def test_full_disk_while_exporting(
    trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    output = tmp_path / "backbone.safetensors"
    code, _ = run_cli(["export", str(trained / "checkpoint.pth"), str(output)], capsys)
    assert code == 0
    before = snapshot(tmp_path)
    original = Path.write_bytes

    def full(self: Path, data: bytes) -> int:
        original(self, data[:10])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))

    monkeypatch.setattr(Path, "write_bytes", full)
    code, err = run_cli(["export", str(trained / "checkpoint.pth"), str(output), "--which", "student"], capsys)
    assert_one_line_error(code, err, "export", str(output), "no space left on device")
    assert snapshot(tmp_path) == before  # the previous export intact, no temp file


# ----------------------------------------------------------------------------------------------------------------
# 2. Nothing hangs: special files in a data folder; a folder of unreadable files


@pytest.fixture
def alarm() -> Iterator[None]:
    """Fail instead of hanging: SIGALRM after 120 s."""

    def timeout(signum: int, frame: Any) -> None:
        raise TimeoutError("the command hung")

    previous = signal.signal(signal.SIGALRM, timeout)
    signal.alarm(120)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def test_fifo_socket_and_device_files_are_skipped(tmp_path: Path, alarm: None) -> None:
    folder = tmp_path / "images"
    folder.mkdir()
    for index in range(9):
        Image.new("RGB", (40, 48), (index * 25, 90, 60)).save(folder / f"img{index}.png")
    os.mkfifo(folder / "fifo.jpg")
    (folder / "zero.png").symlink_to("/dev/zero")  # a device that never ends
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(folder / "socket.jpg"))
    try:
        result = train(tiny_config(tmp_path / "run", data_path=str(folder), epochs=1), progress_bar=False)
    finally:
        server.close()
    assert result.step == 3  # 12 files, 3 batches of 4: every file is read once
    saved = torch.load(tmp_path / "run" / "checkpoint.pth", weights_only=True)
    assert saved["skipped_images"] == 3


def test_folder_of_unreadable_images_stops_without_a_checkpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], alarm: None
) -> None:
    folder = tmp_path / "images"
    folder.mkdir()
    for index in range(8):
        (folder / f"broken{index}.jpg").write_bytes(b"not an image")
    run = tmp_path / "run"
    code, err = run_cli(["train", *tiny_flags(run, data_path=str(folder))], capsys)
    errors = [line for line in err.splitlines() if line.startswith("cribo train: error:")]
    assert code == 2 and "Traceback" not in err and len(errors) == 1
    assert f"--data_path {folder}" in errors[0] and "could be read" in errors[0]
    assert not (run / "checkpoint.pth").exists()


# ----------------------------------------------------------------------------------------------------------------
# 3. and 4. Nothing left behind; logs continue exactly


def test_resume_after_a_kill_continues_the_log_and_removes_temp_files(tmp_path: Path) -> None:
    """A kill after step 6 whose last checkpoint is step 4: log.txt holds lines the resumed run writes again, and
    the killed writer's temp file is still there. The resumed run's log equals an uninterrupted run's."""
    settings = {"log_every": 3, "checkpoint_every": 2}
    train(tiny_config(tmp_path / "straight", **settings), progress_bar=False)
    run = tmp_path / "killed"
    train(tiny_config(run, max_steps=4, **settings), progress_bar=False)
    at_step_4 = (run / "checkpoint.pth").read_bytes()
    train(tiny_config(run, max_steps=6, **settings), progress_bar=False)
    (run / "checkpoint.pth").write_bytes(at_step_4)  # the state of a kill right before step 6's checkpoint
    with (run / "log.txt").open("a") as handle:
        handle.write('{"epoch": 1, "step": 7, "d_lo')  # a line torn by the kill
    stale = [run / ".checkpoint.pth.tmp-999999", run / ".log.txt.tmp-999998"]
    for path in stale:
        path.write_bytes(b"PK\x03\x04 half-written")
    train(tiny_config(run, **settings), progress_bar=False)
    assert read_log(run) == read_log(tmp_path / "straight")
    assert [row["step"] for row in read_log(run)] == [3, 4, 6, 8]  # windows of 3 steps, cut at each epoch's end
    assert not any(path.exists() for path in stale)


def test_stop_mid_window_and_resume_writes_the_same_log(tmp_path: Path) -> None:
    train(tiny_config(tmp_path / "straight", log_every=3, max_steps=6), progress_bar=False)
    for stop in (2, 5, 6):  # the first two stops cut a window
        train(tiny_config(tmp_path / "stopped", log_every=3, max_steps=stop), progress_bar=False)
    assert read_log(tmp_path / "stopped") == read_log(tmp_path / "straight")
    straight = torch.load(tmp_path / "straight" / "checkpoint.pth", weights_only=True)
    stopped = torch.load(tmp_path / "stopped" / "checkpoint.pth", weights_only=True)
    assert [strip_timing(row) for row in straight["history"]] == [strip_timing(row) for row in stopped["history"]]


def test_python_random_is_seeded(tmp_path: Path) -> None:
    states = []
    for name in ("a", "b"):
        random.seed(12345 if name == "a" else 54321)  # whatever ran before in the process
        train(tiny_config(tmp_path / name, max_steps=1), progress_bar=False)
        states.append(torch.load(tmp_path / name / "checkpoint.pth", weights_only=True)["rng"]["python"])
    assert states[0] == states[1]


@pytest.mark.timeout(600)
def test_sigkill_and_resume(tmp_path: Path) -> None:
    """A real `cribo train` killed with SIGKILL mid-run, then the same command: the log equals an uninterrupted
    run's, no temp file is left, and the checkpoint loads."""
    settings = {"log_every": 3, "checkpoint_every": 1, "scenes_num_images": 24, "epochs": 1}  # 6 steps
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT / "src")}
    run = tmp_path / "killed"
    command = [sys.executable, "-m", "cribo", "train", *tiny_flags(run, **settings)]
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        rows = read_log(run) if (run / "log.txt").is_file() else []
        if rows and rows[-1]["step"] >= 3:
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    train(tiny_config(tmp_path / "straight", **settings), progress_bar=False)
    finished = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr
    assert read_log(run) == read_log(tmp_path / "straight")
    assert not [path for path in run.iterdir() if ".tmp-" in path.name]
    assert checkpoint.load(run / "checkpoint.pth")["step"] == 6


# ----------------------------------------------------------------------------------------------------------------
# 5. Evaluation images with an EXIF orientation


def test_eval_on_voc_with_exif_rotated_images(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """VOC-style JPEGs stored 40x24 with EXIF orientation 6 (displayed 24x40), masks drawn on the displayed image."""
    for folder in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (tmp_path / folder).mkdir(parents=True)
    exif = Image.Exif()
    exif[0x0112] = 6  # the EXIF orientation tag: turn 90 degrees clockwise to display
    for index, stem in enumerate(["a", "b", "c", "d"]):
        Image.new("RGB", (40, 24), (60 * index, 80, 120)).save(
            tmp_path / "JPEGImages" / f"{stem}.jpg", exif=exif.tobytes() if index % 2 else b""
        )
        size = (24, 40) if index % 2 else (40, 24)
        mask = np.zeros(size[::-1], dtype=np.uint8)
        mask[: size[1] // 2] = index + 1
        Image.fromarray(mask, mode="L").save(tmp_path / "SegmentationClass" / f"{stem}.png")
    (tmp_path / "ImageSets/Segmentation/train.txt").write_text("a\nb\n")
    (tmp_path / "ImageSets/Segmentation/val.txt").write_text("c\nd\n")
    argv = ["eval", "nn", "--backbone", "random:vit_tiny", "--dataset", "voc", "--data-root", str(tmp_path)]
    code, err = run_cli([*argv, "--input-size", "32", "--no-progress", "--output", str(tmp_path / "r.json")], capsys)
    assert code == 0, err
    warnings = [line for line in err.splitlines() if "EXIF orientation" in line]
    assert len(warnings) == 2 and all("of 1 image(s)" in line for line in warnings)  # one per split


# ----------------------------------------------------------------------------------------------------------------
# 6. Small ones


@pytest.mark.parametrize(
    ("flag", "value", "expected"),
    [
        ("image_size", "0", "--image_size must be a positive multiple of --patch_size 8, got 0"),
        ("lr", "-0.001", "--lr must not be negative"),
        ("patch_size", "0", "--patch_size must be positive"),
        ("log_every", "0", "--log_every must be at least 1"),
    ],
)
def test_bad_numbers(flag: str, value: str, expected: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["train", *tiny_flags(tmp_path / "run", **{flag: value})]
    line = assert_one_line_error(*run_cli(argv, capsys), "train", expected)
    assert "n_tokens" not in line
    assert not (tmp_path / "run").exists()


def test_folder_labels_beyond_the_other_split_name_the_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for split, labels in (("train", (0, 1, 2)), ("val", (0, 7))):
        for folder in ("images", "masks"):
            (tmp_path / split / folder).mkdir(parents=True)
        for index in range(2):
            Image.new("RGB", (32, 24), (index * 90, 50, 90)).save(tmp_path / split / "images" / f"im{index}.png")
            mask = np.full((24, 32), labels[index], np.uint8)
            mask[:4] = labels[-1]
            Image.fromarray(mask, "L").save(tmp_path / split / "masks" / f"im{index}.png")
    argv = ["eval", "nn", "--backbone", "random:vit_tiny", "--dataset", "folder", "--data-root", str(tmp_path)]
    line = assert_one_line_error(*run_cli([*argv, "--no-progress"], capsys), "eval", "classes.txt", "--num-classes")
    assert str(tmp_path / "val" / "masks" / "im0.png") in line and "largest label 7" in line
