"""Tests of cribo.files: atomic writes keep the old file on failure, a full disk is told apart, file types."""

from __future__ import annotations

import errno
import os
import socket
from pathlib import Path

import pytest
import torch

from cribo.files import (
    TEMP_PATTERN,
    atomic_save,
    atomic_write_bytes,
    atomic_write_text,
    check_regular_file,
    disk_full_cause,
    temp_path,
)


def test_atomic_writes_replace_the_file_and_leave_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "state.pth"
    atomic_save({"step": 1}, target)
    atomic_save({"step": 2}, target)
    assert torch.load(target, weights_only=True) == {"step": 2}
    atomic_write_text(tmp_path / "note.txt", "one\n")
    atomic_write_bytes(tmp_path / "note.txt", b"two\n")
    assert (tmp_path / "note.txt").read_text() == "two\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["note.txt", "state.pth"]
    assert TEMP_PATTERN.fullmatch(temp_path(target).name)["name"] == "state.pth"  # type: ignore[index]


def test_a_failed_write_keeps_the_previous_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "state.pth"
    atomic_save({"step": 1}, target)
    before = target.read_bytes()

    def full(*args: object, **kwargs: object) -> None:
        raise RuntimeError("write failed") from OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(RuntimeError) as error:
        atomic_save({"step": 2}, target)
    assert target.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["state.pth"]
    cause = disk_full_cause(error.value)
    assert cause is not None and cause.errno == errno.ENOSPC
    assert disk_full_cause(RuntimeError("other")) is None


def test_check_regular_file_refuses_fifos_and_sockets(tmp_path: Path) -> None:
    plain = tmp_path / "image.png"
    plain.write_bytes(b"x")
    check_regular_file(plain)
    fifo = tmp_path / "fifo.png"
    os.mkfifo(fifo)
    with pytest.raises(OSError, match="FIFO"):
        check_regular_file(fifo)
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(tmp_path / "s.png"))
        with pytest.raises(OSError, match="socket"):
            check_regular_file(tmp_path / "s.png")
    with pytest.raises(OSError, match="folder"):
        check_regular_file(tmp_path)
