"""cribo.demo: train, then dense NN retrieval of the teacher against the random-init teacher of the same seed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cribo import config as config_lib
from cribo.demo import DemoEval, run_demo, score_backbone, summary_text
from cribo.train import build_trainer

# A network and schedule small enough for seconds on CPU (the numbers mean nothing).
TINY = {
    "arch": "vit_tiny",
    "patch_size": 8,
    "depth": 1,
    "out_dim": 64,
    "out_dim_c": 64,
    "head_hidden_dim": 64,
    "head_bottleneck_dim": 32,
    "image_size": 32,
    "scenes_num_images": 16,
    "scenes_image_size": 48,
    "n_tokens": 4,
    "queue_size": 12,
    "epochs": 2,
    "batch_size_per_gpu": 4,
    "warmup_epochs": 1,
    "log_every": 1,
    "checkpoint_every": 0,
}
EVAL = DemoEval(train_scenes=6, val_scenes=3)


def tiny_config(output_dir: Path) -> config_lib.TrainConfig:
    return config_lib.resolve(preset="tiny-cpu", overrides={**TINY, "output_dir": str(output_dir)})


def test_demo_scores_the_teacher_against_its_random_init(tmp_path: Path) -> None:
    config = tiny_config(tmp_path / "run")
    result = run_demo(config, progress_bar=False, evaluation=EVAL)
    assert result.step == 8 and (tmp_path / "run" / "checkpoint.pth").is_file()
    assert result.curves.is_file()
    for score in (result.random_init, result.trained):
        assert 0.0 <= score.miou <= 1.0 and score.path.is_file()
        assert set(score.per_class_iou) >= {"background", "disc"}
        assert json.loads(score.path.read_text())["miou"] == pytest.approx(score.miou)
    # The random init is the teacher the run started from: a fresh trainer of the same seed scores the same.
    fresh = build_trainer(config).modules.teacher.backbone
    again = score_backbone(fresh, config, tmp_path / "again.json", EVAL)
    assert again.miou == pytest.approx(result.random_init.miou, abs=1e-9)
    text = summary_text(result)
    last = text.splitlines()[-1]
    assert last.startswith("  dense NN mIoU:") and f"{result.trained.miou:.3f}" in last
    assert f"random init of the same seed: {result.random_init.miou:.3f}" in last
    # Rerunning resumes the finished run: no more steps, the same trained teacher.
    rerun = run_demo(config, progress_bar=False, evaluation=EVAL)
    assert rerun.step == result.step and rerun.trained.miou == pytest.approx(result.trained.miou, abs=1e-9)


def test_demo_from_init_weights_scores_those_weights_as_its_start(tmp_path: Path) -> None:
    first = run_demo(tiny_config(tmp_path / "first"), progress_bar=False, evaluation=EVAL)
    weights = tmp_path / "first" / "checkpoint.pth"
    config = config_lib.resolve(
        preset="tiny-cpu", overrides={**TINY, "output_dir": str(tmp_path / "second"), "init": str(weights)}
    )
    second = run_demo(config, progress_bar=False, evaluation=EVAL)
    # The start is the first run's trained teacher, not a random network.
    assert second.random_init.miou == pytest.approx(first.trained.miou, abs=1e-9)
    assert f"its --init weights {weights}" in summary_text(second).splitlines()[-1]
