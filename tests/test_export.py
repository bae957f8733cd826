"""``cribo export``: a training checkpoint's backbone written as safetensors loads back to identical tokens."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from cribo import config as config_lib
from cribo.cli import main
from cribo.config import TrainConfig
from cribo.hub import load_backbone
from cribo.models import backbone_tokens
from cribo.train import train


def tiny_config(output_dir: Path) -> TrainConfig:
    """A seconds-long run: 2-block ViT-Tiny with 8-px patches on 32-px views, stopped after one step (no lr warm-up, so
    the student moves and the EMA teacher differs from it)."""
    overrides: dict[str, Any] = {
        "arch": "vit_tiny",
        "patch_size": 8,
        "depth": 2,
        "out_dim": 64,
        "out_dim_c": 64,
        "head_hidden_dim": 64,
        "head_bottleneck_dim": 32,
        "image_size": 32,
        "scenes_num_images": 4,
        "scenes_image_size": 48,
        "num_workers": 0,
        "n_tokens": 4,
        "queue_size": 4,
        "epochs": 1,
        "batch_size_per_gpu": 4,
        "warmup_epochs": 0,
        "warmup_teacher_temp_epochs": 0,
        "device": "cpu",
        "precision": "fp32",
        "log_every": 1,
        "checkpoint_every": 0,
        "saveckp_freq": 0,
        "max_steps": 1,
        "output_dir": str(output_dir),
    }
    return config_lib.resolve(overrides=overrides)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("run")
    train(tiny_config(run), progress_bar=False)
    path = run / "checkpoint.pth"
    assert path.is_file()
    return path


def run_cli(argv: list[str]) -> int:
    with pytest.raises(SystemExit) as exited:
        main(argv)
    return int(exited.value.code or 0)


def tokens_of(backbone: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return backbone_tokens(backbone, images)  # type: ignore[arg-type]


@pytest.mark.parametrize("which", ["teacher", "student"])
def test_export_round_trips_to_identical_tokens(
    which: str, checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    output = tmp_path / f"{which}.safetensors"
    assert run_cli(["export", str(checkpoint), str(output), "--which", which]) == 0
    assert str(output) in capsys.readouterr().out
    assert output.is_file() and output.with_suffix(".json").is_file()
    facts = json.loads(output.with_suffix(".json").read_text())
    assert facts["arch"] == "vit_tiny" and facts["patch_size"] == 8

    exported, info = load_backbone(output)
    assert info.source == "safetensors" and info.patch_size == 8 and len(exported.blocks) == 2
    original, _ = load_backbone(checkpoint, which=which)  # type: ignore[arg-type]
    assert exported.state_dict().keys() == original.state_dict().keys()
    assert all(torch.equal(value, original.state_dict()[key]) for key, value in exported.state_dict().items())
    images = torch.randn(2, 3, 32, 48, generator=torch.Generator().manual_seed(0))  # non-native grid too
    assert torch.equal(tokens_of(exported, images), tokens_of(original, images))


def test_exported_file_alone_is_enough_and_teacher_differs_from_student(checkpoint: Path, tmp_path: Path) -> None:
    teacher, student = tmp_path / "teacher.safetensors", tmp_path / "student.safetensors"
    assert run_cli(["export", str(checkpoint), str(teacher)]) == 0  # --which teacher is the default
    assert run_cli(["export", str(checkpoint), str(student), "--which", "student"]) == 0
    teacher.with_suffix(".json").unlink()  # the safetensors header holds the same facts
    images = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    exported = tokens_of(load_backbone(teacher)[0], images)
    assert torch.equal(exported, tokens_of(load_backbone(checkpoint)[0], images))
    assert not torch.equal(exported, tokens_of(load_backbone(student)[0], images))  # the EMA lags the student


def test_export_rejects_a_bad_destination(checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(["export", str(checkpoint), str(tmp_path / "backbone.pt")]) == 2
    assert ".safetensors" in capsys.readouterr().err
    assert run_cli(["export", str(tmp_path / "missing.pth"), str(tmp_path / "b.safetensors")]) == 2
