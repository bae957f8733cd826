"""The training loop: a smoke run, exact resume, non-finite loss, bad data, and the 2-process run."""

from __future__ import annotations

import ctypes.util
import json
import os
import socket
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp

import conftest
from cribo import config as config_lib
from cribo.config import TrainConfig
from cribo.train import NonFiniteLossError, build_trainer, train


def tiny_config(output_dir: Path, **extra: Any) -> TrainConfig:
    """The suite's tiny run (conftest.TINY_RUN) with stochastic depth on, as in pretraining."""
    return conftest.tiny_config(output_dir, **{"drop_path_rate": 0.1, **extra})


def read_log(output_dir: Path) -> list[dict[str, float]]:
    return [json.loads(line) for line in (output_dir / "log.txt").read_text().splitlines()]


def test_smoke_run_writes_checkpoint_log_and_config(tmp_path: Path) -> None:
    result = train(tiny_config(tmp_path / "run"), progress_bar=False)
    assert result.step == 8 and result.epoch == 2
    rows = read_log(tmp_path / "run")
    assert len(rows) == 8
    for key in ("d_loss", "s_loss", "nn_loss", "r_cnt", "lr", "wd", "bootstrap_centroid_ratio", "images_per_s"):
        assert all(key in row for row in rows)
    assert all(row["nn_loss"] == 0.0 for row in rows if row["epoch"] == 0)  # cross-image loss off in epoch 0
    assert all(torch.isfinite(torch.tensor(row["loss"])) for row in rows)
    assert (tmp_path / "run" / "checkpoint.pth").is_file() and (tmp_path / "run" / "config.yaml").is_file()
    saved = torch.load(tmp_path / "run" / "checkpoint.pth", weights_only=True)
    assert saved["step"] == 8 and set(saved) >= {"student", "teacher", "optimizer", "bank", "criterion", "rng"}


def assert_same_state(a: dict[str, Any], b: dict[str, Any]) -> None:
    for part in ("student", "teacher", "criterion", "bank"):
        assert a[part].keys() == b[part].keys()
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), f"{part}.{key} differs"


def test_stop_and_resume_is_bit_identical(tmp_path: Path) -> None:
    # 6 steps straight vs. 3 steps, a new trainer from the checkpoint, 3 more (crossing the epoch boundary).
    train(tiny_config(tmp_path / "straight", max_steps=6), progress_bar=False)
    train(tiny_config(tmp_path / "resumed", max_steps=3), progress_bar=False)
    half = torch.load(tmp_path / "resumed" / "checkpoint.pth", weights_only=True)
    assert half["step"] == 3
    train(tiny_config(tmp_path / "resumed", max_steps=6), progress_bar=False)
    straight = torch.load(tmp_path / "straight" / "checkpoint.pth", weights_only=True)
    resumed = torch.load(tmp_path / "resumed" / "checkpoint.pth", weights_only=True)
    assert straight["step"] == resumed["step"] == 6
    assert_same_state(straight, resumed)
    assert straight["optimizer"]["state"].keys() == resumed["optimizer"]["state"].keys()
    assert straight["rng"]["python"] == resumed["rng"]["python"]
    timing = ("images_per_s", "peak_mem_mb")  # the only fields that differ between identical runs
    logs = [
        [{k: v for k, v in row.items() if k not in timing} for row in read_log(tmp_path / name)]
        for name in ("straight", "resumed")
    ]
    assert logs[0] == logs[1] and [row["step"] for row in logs[0]] == [1, 2, 3, 4, 5, 6]  # no step twice


def test_larger_epochs_continues_a_finished_run(tmp_path: Path) -> None:
    train(tiny_config(tmp_path / "run", epochs=1), progress_bar=False)
    result = train(tiny_config(tmp_path / "run", epochs=2), progress_bar=False)
    assert result.step == 8
    assert len(read_log(tmp_path / "run")) == 8


def test_non_finite_loss_stops_and_keeps_last_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tiny_config(tmp_path / "run", max_steps=2)
    train(cfg, progress_bar=False)
    before = (tmp_path / "run" / "checkpoint.pth").read_bytes()
    import cribo.step as step_module

    original = step_module.student_terms

    def poisoned(*args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        terms = original(*args, **kwargs)
        terms["global"] = terms["global"] * float("nan")
        return terms

    monkeypatch.setattr(step_module, "student_terms", poisoned)
    with pytest.raises(NonFiniteLossError, match="non-finite loss"):
        train(tiny_config(tmp_path / "run", max_steps=4), progress_bar=False)
    assert (tmp_path / "run" / "checkpoint.pth").read_bytes() == before


def test_unreadable_images_are_skipped_and_counted(tmp_path: Path) -> None:
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    for index in range(9):
        Image.new("RGB", (40, 48), (index * 20, 100, 50)).save(folder / f"img{index}.png")
    (folder / "broken.jpg").write_bytes(b"not a jpeg at all")
    cfg = tiny_config(tmp_path / "run", data_path=str(folder), epochs=1, batch_size_per_gpu=5)
    result = train(cfg, progress_bar=False)
    assert result.step == 2
    saved = torch.load(tmp_path / "run" / "checkpoint.pth", weights_only=True)
    assert saved["skipped_images"] == 1


def test_missing_data_folder_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="nowhere"):
        build_trainer(tiny_config(tmp_path / "run", data_path=str(tmp_path / "nowhere")))


# ----------------------------------------------------------------------------------------------------------------
# Two processes (gloo)
# ----------------------------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _worker(rank: int, world: int, port: int, output_dir: str, dump_dir: str) -> None:
    os.environ.update(
        {
            "RANK": str(rank),
            "WORLD_SIZE": str(world),
            "LOCAL_RANK": "0",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        }
    )
    torch.set_num_threads(1)
    from cribo import distributed
    from cribo.train import build_trainer as build
    from cribo.train import fit

    distributed.init("gloo")
    cfg = tiny_config(Path(output_dir), epochs=1, scenes_num_images=16, batch_size_per_gpu=4, queue_size=32)
    trainer = build(cfg)
    result = fit(trainer, progress_bar=False)
    state = {
        "step": result.step,
        "student": trainer.modules.student.state_dict(),
        "teacher": trainer.modules.teacher.state_dict(),
        "bank": trainer.modules.bank.state_dict(),
        "criterion": trainer.modules.criterion.state_dict(),
    }
    torch.save(state, Path(dump_dir) / f"rank{rank}.pt")
    distributed.shutdown()


def test_two_process_run_shares_banks_and_weights(tmp_path: Path) -> None:
    port = free_port()
    mp.spawn(_worker, args=(2, port, str(tmp_path / "run"), str(tmp_path)), nprocs=2, join=True)
    rank0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    rank1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert rank0["step"] == rank1["step"] == 2  # 16 images / (4 per process x 2 processes)
    # Identical weights, centres and banks on both ranks. The banks can only agree if each received the other's
    # objects (the two ranks cluster different images), so this also checks the ragged all-gather.
    assert_same_state(rank0, rank1)
    from cribo.memory import ObjectMemoryBank

    bank = ObjectMemoryBank(32, 4, rank0["bank"]["objects"].shape[-1])
    bank.load_state_dict(rank0["bank"])
    fresh = ObjectMemoryBank(32, 4, bank.dim, generator=torch.Generator().manual_seed(0))
    replaced = (bank.objects != fresh.objects).flatten(2).any(-1).any(0)  # (Q,) slots written
    assert int(replaced.sum()) == 2 * 2 * 4  # 2 steps x 2 ranks x 4 images
    # Rank 0's checkpoint resumes in one process (a warning says the step count per epoch changed).
    result = train(tiny_config(tmp_path / "run", epochs=2, scenes_num_images=16, queue_size=32), progress_bar=False)
    assert result.epoch == 2 and result.step == 8


def test_keep_freed_memory_is_a_run_flag_applied_on_cpu() -> None:
    from cribo.runtime import keep_freed_memory

    assert config_lib.resolve(overrides={"keep_freed_memory": False}).run.keep_freed_memory is False
    assert config_lib.TrainConfig().run.keep_freed_memory is True
    applied = keep_freed_memory()
    assert applied is (sys.platform.startswith("linux") and ctypes.util.find_library("c") is not None)
