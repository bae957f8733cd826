"""Configuration: presets, authors' args JSON, overrides, validation."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from cribo import config as config_lib
from cribo.config import TrainConfig


def test_defaults_resolve_and_field_names_are_unique() -> None:
    cfg = config_lib.resolve()
    assert isinstance(cfg, TrainConfig)
    index = config_lib.field_index()
    assert index["n_tokens"][0] == "method"
    assert index["arch"][0] == "model"


@pytest.mark.parametrize("name", ["vits16-coco", "vits16-in", "vitb16-in"])
def test_published_presets_match_the_authors_runs(name: str) -> None:
    cfg = config_lib.resolve(preset=name)
    expected = {
        "vits16-coco": ("vit_small", 300, 32, 5e-4, 1e-5, 0.0, 1, False, 30, 64, (2.0, 2.0), "fp16"),
        "vits16-in": ("vit_small", 800, 128, 5e-4, 1e-5, 0.0, 1, False, 30, 32, (1.0, 1.0), "fp16"),
        "vitb16-in": ("vit_base", 400, 64, 7.5e-4, 2e-6, 0.3, 3, True, 50, 32, (1.0, 1.0), "fp32"),
    }[name]
    got = (
        cfg.model.arch,
        cfg.optim.epochs,
        cfg.optim.batch_size_per_gpu,
        cfg.optim.lr,
        cfg.optim.min_lr,
        cfg.optim.clip_grad,
        cfg.optim.freeze_last_layer,
        cfg.model.norm_last_layer,
        cfg.loss.warmup_teacher_temp_epochs,
        cfg.method.n_tokens,
        cfg.method.pos_alpha,
        cfg.run.precision,
    )
    assert got == expected
    # Shared by all three published runs.
    assert cfg.model.out_dim == cfg.model.out_dim_c == 65536
    assert cfg.method.queue_size == 25000 and cfg.model.patch_size == 16 and cfg.model.drop_path_rate == 0.1
    assert cfg.optim.weight_decay == 0.04 and cfg.optim.weight_decay_end == 0.4
    assert cfg.optim.momentum_teacher == 0.996 and cfg.optim.warmup_epochs == 10
    assert cfg.data.global_crops_scale == (0.25, 1.0)


def test_every_shipped_preset_resolves() -> None:
    names = config_lib.preset_names()
    assert "tiny-cpu" in names
    for name in names:
        config_lib.resolve(preset=name)


def test_a_preset_builds_on_its_base(monkeypatch: pytest.MonkeyPatch) -> None:
    base, long = config_lib.resolve(preset="tiny-cpu"), config_lib.resolve(preset="tiny-cpu-long")
    assert long.optim.epochs == 2 * base.optim.epochs and long.run.output_dir != base.run.output_dir
    assert dataclasses.replace(long, optim=base.optim, run=base.run) == base  # nothing else differs
    shipped = config_lib.load_preset
    loops = {"a": {"preset": "b"}, "b": {"preset": "a"}}
    monkeypatch.setattr(config_lib, "load_preset", lambda name: loops.get(name) or shipped(name))
    with pytest.raises(ValueError, match="builds on itself"):
        config_lib.resolve(preset="a")


def test_unknown_preset_and_keys_are_errors() -> None:
    with pytest.raises(ValueError, match="unknown preset"):
        config_lib.resolve(preset="nope")
    with pytest.raises(ValueError, match="unknown config key 'n_token'"):
        config_lib.resolve(overrides={"n_token": 3})
    with pytest.raises(ValueError, match=r"unknown field model\.lr"):
        config_lib.apply_overrides(TrainConfig(), {"model": {"lr": 1.0}}, "test.yaml")


def test_overrides_are_coerced_and_checked() -> None:
    cfg = config_lib.resolve(overrides={"n_tokens": "8", "pos_alpha": ["0.5", "2"], "update_c": "false"})
    assert cfg.method.n_tokens == 8 and cfg.method.pos_alpha == (0.5, 2.0) and cfg.method.update_c is False
    cfg = config_lib.resolve(overrides={"method.semantics": "authors"})
    assert cfg.method.semantics == "authors"
    with pytest.raises(ValueError, match="semantics"):
        config_lib.resolve(overrides={"semantics": "both"})
    with pytest.raises(ValueError, match="n_tokens"):
        config_lib.resolve(overrides={"n_tokens": "many"})
    with pytest.raises(ValueError, match="--image_size must be a multiple of --patch_size"):
        config_lib.resolve(overrides={"image_size": 100})


def test_authors_args_json_is_replayed_and_inert_keys_reported(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    args = {
        "arch": "vit_small",
        "n_tokens": 64,
        "pos_alpha": [2.0, 2.0],
        "use_fp16": True,
        "student_temp": 1.0,
        "dataset_type": "coco",
        "output_dir": "/somewhere/else",
        "brand_new_flag": 3,
    }
    path = tmp_path / "args.json"
    path.write_text(json.dumps(args))
    with caplog.at_level("WARNING"):
        cfg = config_lib.resolve(args_json=str(path))
    assert cfg.model.arch == "vit_small" and cfg.method.n_tokens == 64 and cfg.run.precision == "fp16"
    assert cfg.loss.student_temp == 0.1  # inert in the authors' code: not applied
    assert "student_temp" in caplog.text and "brand_new_flag" in caplog.text


def test_saved_config_round_trips(tmp_path: Path) -> None:
    cfg = config_lib.resolve(preset="vits16-coco", overrides={"seed": 3})
    config_lib.save(cfg, tmp_path / "config.yaml")
    again = config_lib.resolve(config_file=str(tmp_path / "config.yaml"))
    assert again == cfg
    assert config_lib.from_dict(config_lib.to_dict(cfg)) == cfg


def test_post_training_preset_and_fields() -> None:
    cfg = config_lib.resolve(preset="vits16-coco-post", overrides={"init": "dino.pth"})
    assert (cfg.model.init, cfg.model.arch, cfg.model.patch_size) == ("dino.pth", "vit_small", 16)
    assert (cfg.optim.lr, cfg.optim.backbone_lr_scale, cfg.optim.momentum_teacher) == (1e-4, 0.1, 0.9995)
    assert (cfg.optim.weight_decay, cfg.optim.weight_decay_end, cfg.optim.epochs) == (0.04, 0.5, 10)
    assert config_lib.TrainConfig().model.init == "" and config_lib.TrainConfig().model.frozen_blocks == 0
    with pytest.raises(ValueError, match="--frozen_blocks"):
        config_lib.resolve(overrides={"frozen_blocks": -1})
    with pytest.raises(ValueError, match="--backbone_lr_scale"):
        config_lib.resolve(overrides={"backbone_lr_scale": 0})


def test_authors_start_checkpoint_path_becomes_init() -> None:
    overrides, inert, _ = config_lib.from_authors_args(
        {"start_checkpoint_path": "/ckpt/start.pth", "arch": "vit_small"}
    )
    assert overrides == {"init": "/ckpt/start.pth", "arch": "vit_small"}
    assert any("start_checkpoint_path" in line and "--init" in line for line in inert)
    assert config_lib.from_authors_args({"start_checkpoint_path": ""})[0] == {}
