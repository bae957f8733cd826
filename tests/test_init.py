"""Post-training from pretrained weights (``--init``), the full-checkpoint loader and seeded random baselines.

The pretrained weights are the authors' reference checkpoint (ViT-Tiny/16 with heads of 1024 outputs).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import CHECKPOINT, assert_state_equal, tiny_config
from cribo.config import TrainConfig
from cribo.eval import NNEvalOptions, run_nn
from cribo.hub import load_backbone, load_cribo_checkpoint
from cribo.models import backbone_tokens
from cribo.train import apply_init, build_trainer, train


def post_config(output_dir: Path, init: str, **extra: Any) -> TrainConfig:
    """A seconds-long post-training run shaped like the reference checkpoint (12-block ViT-Tiny/16, its heads),
    on 32-px views of the built-in scenes, 4 steps per epoch."""
    shape = {"patch_size": 16, "depth": 0, "out_dim": 1024, "out_dim_c": 1024, "queue_size": 8}
    return tiny_config(output_dir, init=init, **{**shape, **extra})


def test_post_training_starts_from_exactly_the_weights(reference: Path, tmp_path: Path) -> None:
    spec = str(reference / CHECKPOINT)
    trainer = build_trainer(post_config(tmp_path / "run", spec))
    report = apply_init(trainer)
    assert report.source == "authors_cribo" and report.position_grid is None
    assert report.head_fresh == () and report.centers_loaded  # the file's head fits the run's: all loaded
    pretrained, _ = load_backbone(spec)
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = backbone_tokens(pretrained, images)
        for network in (trainer.modules.teacher, trainer.modules.student):
            assert torch.equal(backbone_tokens(network.backbone.eval(), images), expected)
    full = load_cribo_checkpoint(spec)
    assert_state_equal(trainer.modules.teacher.head, full.teacher.head.state_dict())
    assert torch.equal(trainer.modules.criterion.center_c.center, full.centers["center_c"])


def test_post_training_runs_resumes_exactly_and_evaluates(reference: Path, tmp_path: Path) -> None:
    spec = str(reference / CHECKPOINT)
    # 2 steps per epoch: 3 steps cross into epoch 1 (the cross-image term on); the resumed run stops mid-epoch 0.
    short = {"scenes_num_images": 8}
    straight = train(post_config(tmp_path / "straight", spec, max_steps=3, **short), progress_bar=False)
    assert all(torch.isfinite(torch.tensor(row["loss"])) for row in straight.history)
    report = json.loads((tmp_path / "straight" / "init.json").read_text())
    tensors = len(load_backbone(spec)[0].state_dict())
    assert report["spec"] == spec and report["backbone_tensors"] == tensors and report["centers_loaded"]
    # Stopped at step 1 and resumed (the init file is not read again: the checkpoint holds everything).
    train(post_config(tmp_path / "resumed", spec, max_steps=1, **short), progress_bar=False)
    train(post_config(tmp_path / "resumed", str(tmp_path / "gone.pth"), max_steps=3, **short), progress_bar=False)
    first = torch.load(tmp_path / "straight" / "checkpoint.pth", weights_only=True)
    second = torch.load(tmp_path / "resumed" / "checkpoint.pth", weights_only=True)
    for part in ("student", "teacher", "criterion", "bank"):
        for key, value in first[part].items():
            assert torch.equal(value, second[part][key]), f"{part}.{key}"
    assert second["init"] == first["init"]
    options = NNEvalOptions(
        backbone=str(tmp_path / "straight" / "checkpoint.pth"),
        scenes_train_images=4,
        scenes_val_images=2,
        scenes_image_size=32,
        fractions=(1.0,),
        seeds=(0,),
        output=str(tmp_path / "nn.json"),
        progress=False,
    )
    result = run_nn(options)
    assert 0.0 <= result.payload["miou"] <= 1.0 and result.payload["backbone"]["info"]["source"] == "cribo"


def test_frozen_blocks_and_backbone_lr_scale(reference: Path, tmp_path: Path) -> None:
    spec = str(reference / CHECKPOINT)
    cfg = post_config(tmp_path / "run", spec, frozen_blocks=2, backbone_lr_scale=0.1, max_steps=2)
    result = train(cfg, progress_bar=False)
    assert result.step == 2
    saved = torch.load(tmp_path / "run" / "checkpoint.pth", weights_only=True)
    pretrained, _ = load_backbone(spec)
    frozen = ("patch_embed.", "blocks.0.", "blocks.1.", "cls_token", "pos_embed")
    moved = []
    for key, value in pretrained.state_dict().items():
        same = torch.equal(saved["student"][f"backbone.{key}"], value)
        assert same or not key.startswith(frozen), f"frozen {key} moved"
        moved.append(not same)
    assert any(moved)  # the later blocks did train
    groups = saved["optimizer"]["param_groups"]
    assert [(g["lr_scale"], g["weight_decay_on"]) for g in groups] == [
        (1.0, True),
        (1.0, False),
        (0.1, True),
        (0.1, False),
    ]
    assert groups[2]["lr"] == pytest.approx(groups[0]["lr"] * 0.1)


def test_init_that_does_not_fit_names_the_settings(reference: Path, tmp_path: Path) -> None:
    trainer = build_trainer(post_config(tmp_path / "run", str(reference / CHECKPOINT), arch="vit_small"))
    with pytest.raises(ValueError, match=r"wrong shape: cls_token.*vit_tiny/16 with 12 blocks; set --arch"):
        apply_init(trainer)


def test_init_from_a_backbone_alone_keeps_a_fresh_head(reference: Path, tmp_path: Path) -> None:
    pretrained, _ = load_backbone(reference / CHECKPOINT)
    export = tmp_path / "backbone.pth"
    torch.save({"model": pretrained.state_dict()}, export)
    trainer = build_trainer(post_config(tmp_path / "run", str(export), depth=0))
    head_before = {k: v.clone() for k, v in trainer.modules.student.head.state_dict().items()}
    report = apply_init(trainer)
    assert report.head_loaded == () and not report.centers_loaded
    assert_state_equal(trainer.modules.student.head, head_before)


def test_random_baselines_take_a_seed() -> None:
    first, info = load_backbone("random:vit_tiny@3")
    again, _ = load_backbone("random:vit_tiny@3")
    other, _ = load_backbone("random:vit_tiny@4")
    default, default_info = load_backbone("random:vit_tiny")
    zero, _ = load_backbone("random:vit_tiny@0")
    assert info.seed == 3 and default_info.seed == 0
    assert torch.equal(first.pos_embed, again.pos_embed) and not torch.equal(first.pos_embed, other.pos_embed)
    assert torch.equal(default.pos_embed, zero.pos_embed)
    with pytest.raises(ValueError, match="seed after '@'"):
        load_backbone("random:vit_tiny@x")


def test_load_cribo_checkpoint_of_ours_and_the_authors(reference: Path, tmp_path: Path) -> None:
    authors = load_cribo_checkpoint(reference / CHECKPOINT)
    assert (authors.source, authors.arch, authors.patch_size) == ("authors_cribo", "vit_tiny", 16)
    raw = torch.load(reference / CHECKPOINT, weights_only=False, map_location="cpu")
    assert_state_equal(authors.teacher, raw["teacher"])
    assert_state_equal(authors.student, {k.removeprefix("module."): v for k, v in raw["student"].items()})
    assert not authors.teacher.head.last_layer.weight_g.requires_grad
    assert authors.student.head.last_layer.weight_g.requires_grad  # the authors' norm_last_layer=False
    train(post_config(tmp_path / "run", "", arch="vit_tiny", depth=2, max_steps=1), progress_bar=False)
    ours = load_cribo_checkpoint(tmp_path / "run" / "checkpoint.pth")
    saved = torch.load(tmp_path / "run" / "checkpoint.pth", weights_only=True)
    assert ours.source == "cribo" and len(ours.teacher.backbone.blocks) == 2
    assert_state_equal(ours.student, saved["student"])
    assert torch.equal(ours.centers["center"], saved["criterion"]["center.center"])
    with pytest.raises(ValueError, match="not a CrIBo training checkpoint"):
        torch.save({"model": ours.teacher.backbone.state_dict()}, tmp_path / "backbone.pth")
        load_cribo_checkpoint(tmp_path / "backbone.pth")
