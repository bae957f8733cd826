"""Tests of cribo.hub: loading backbones and networks from ours, the authors' and other projects' files; export."""

from __future__ import annotations

import argparse
import hashlib
import json
import types
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file
from torch import Tensor

from conftest import CHECKPOINT, WHICH, assert_state_equal
from cribo.hub import export_backbone, load_backbone, load_network_state
from cribo.models import CrIBoNetwork, ProjectionHead, backbone_tokens, create_backbone, interpolate_position_embedding

ATOL = 1e-5
RTOL = 1e-5


def test_network_forward_and_state_dict_prefixes() -> None:
    backbone = create_backbone("test_vit").eval()
    network = CrIBoNetwork(backbone, ProjectionHead(backbone.embed_dim, 7, 9, hidden_dim=16, bottleneck_dim=6))
    keys = set(network.state_dict())
    assert all(key.startswith(("backbone.", "head.")) for key in keys)
    images = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(network(images), backbone_tokens(backbone, images))
    # A DDP-style copy loads back; a missing or misshaped tensor is an error.
    state = {"module." + key: value.clone() for key, value in network.state_dict().items()}
    load_network_state(network, state)
    del state["module.head.last_layer_c.weight_g"]
    with pytest.raises(ValueError, match=r"missing: head\.last_layer_c\.weight_g"):
        load_network_state(network, state)
    state["module.head.last_layer_c.weight_g"] = torch.ones(3, 1)
    with pytest.raises(ValueError, match="wrong shape"):
        load_network_state(network, state)


# ----------------------------------------------------------------------------------------------------------------
# load_backbone / export_backbone


@pytest.mark.parametrize("which", WHICH)
def test_load_backbone_authors_checkpoint(
    reference: Path, fixture: dict[str, Any], checkpoint: dict, backbone_state: dict, which: str
) -> None:
    path = reference / CHECKPOINT
    backbone, info = load_backbone(path, which="student" if which == "student" else "teacher")
    assert (info.source, info.arch, info.patch_size) == ("authors_cribo", fixture["arch"], fixture["patch_size"])
    assert info.embed_dim == fixture["embed_dim"] and info.which == which
    assert info.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert set(info.loaded_keys) == set(backbone.state_dict())
    assert set(info.skipped_keys) == {k for k in fixture["teacher_state_dict_shapes"] if k.startswith("head.")}
    assert_state_equal(backbone, backbone_state)
    assert not backbone.training
    with torch.no_grad():
        tokens = backbone_tokens(backbone, fixture["input"])
    torch.testing.assert_close(tokens, fixture["last_tokens"], atol=ATOL, rtol=RTOL)


def _dino_layouts(state: dict[str, Tensor]) -> dict[str, Any]:
    head = {"head.mlp.0.weight": torch.zeros(4, 3), "head.last_layer.weight_g": torch.ones(5, 1)}
    prefixed = {**{"backbone." + k: v for k, v in state.items()}, **head}
    ddp = {"module." + k: v for k, v in prefixed.items()}
    return {
        "plain": dict(state),
        "model": {"model": dict(state)},
        "state_dict_backbone": {"state_dict": prefixed},
        "teacher_ddp": {"teacher": ddp, "epoch": 3},
        "dino_training": {"student": ddp, "teacher": prefixed, "args": argparse.Namespace(arch="vit_tiny")},
    }


@pytest.mark.parametrize("layout", list(_dino_layouts({})))
def test_load_backbone_dino_layouts(tmp_path: Path, backbone_state: dict, layout: str) -> None:
    path = tmp_path / f"{layout}.pth"
    torch.save(_dino_layouts(backbone_state)[layout], path)
    backbone, info = load_backbone(path)
    assert (info.source, info.arch, info.patch_size, info.embed_dim) == ("dino_state_dict", "vit_tiny", 16, 192)
    assert_state_equal(backbone, backbone_state)
    assert all(key.startswith("head.") for key in info.skipped_keys)


def test_load_backbone_infers_patch_size(tmp_path: Path, backbone_state: dict) -> None:
    state = dict(backbone_state)
    dim = state["cls_token"].shape[-1]
    state["patch_embed.proj.weight"] = torch.randn(dim, 3, 8, 8)
    state["pos_embed"] = torch.randn(1, 1 + 28 * 28, dim)
    torch.save(state, tmp_path / "p8.pth")
    backbone, info = load_backbone(tmp_path / "p8.pth")
    assert (info.arch, info.patch_size) == ("vit_tiny", 8)
    assert_state_equal(backbone, state)


def test_load_backbone_cribo_checkpoint(tmp_path: Path, checkpoint: dict, backbone_state: dict) -> None:
    teacher = {k: v for k, v in checkpoint["teacher"].items()}
    saved = {
        "teacher": teacher,
        "student": {"module." + k: v for k, v in teacher.items()},
        "config": {"model": {"arch": "vit_tiny", "patch_size": 16}, "epochs": 3},
        "epoch": 1,
    }
    torch.save(saved, tmp_path / "checkpoint.pth")
    backbone, info = load_backbone(tmp_path / "checkpoint.pth", which="student")
    assert (info.source, info.which, info.arch, info.patch_size) == ("cribo", "student", "vit_tiny", 16)
    assert len(info.skipped_keys) == sum(key.startswith("head.") for key in teacher)
    assert_state_equal(backbone, backbone_state)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ("missing", r"missing: norm\.weight"),
        ("unexpected", r"unexpected: blocks\.12\.norm1\.weight"),
        ("shape", r"wrong shape: pos_embed \(1, 51, 192\) != \(1, 197, 192\)"),  # not [CLS] + a square grid
    ],
)
def test_load_backbone_rejects_mismatched_weights(
    tmp_path: Path, backbone_state: dict, edit: str, message: str
) -> None:
    state = dict(backbone_state)
    if edit == "missing":
        del state["norm.weight"]
    elif edit == "unexpected":
        state["blocks.12.norm1.weight"] = torch.ones(192)
    else:
        state["pos_embed"] = torch.zeros(1, 51, 192)
    torch.save({"model": state}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match=message):
        load_backbone(tmp_path / "bad.pth")


def test_load_backbone_needs_arch_for_unknown_width(tmp_path: Path) -> None:
    backbone = create_backbone("test_vit")
    torch.save(backbone.state_dict(), tmp_path / "narrow.pth")
    with pytest.raises(ValueError, match="pass arch="):
        load_backbone(tmp_path / "narrow.pth")
    loaded, info = load_backbone(tmp_path / "narrow.pth", arch="test_vit")
    assert info.arch == "test_vit"
    assert_state_equal(loaded, backbone.state_dict())


def test_load_backbone_pickle_needs_permission(tmp_path: Path, backbone_state: dict) -> None:
    path = tmp_path / "pickled.pth"
    torch.save({"model": backbone_state, "meta": types.SimpleNamespace(arch="vit_tiny")}, path)
    with pytest.raises(ValueError, match="allow_pickle") as error:
        load_backbone(path)
    assert str(path) in str(error.value) and "--allow-pickle" in str(error.value)
    backbone, info = load_backbone(path, allow_pickle=True)
    assert info.source == "dino_state_dict"
    assert_state_equal(backbone, backbone_state)


def test_load_backbone_bad_specs(tmp_path: Path, checkpoint: dict) -> None:
    with pytest.raises(ValueError, match="not a file"):
        load_backbone(tmp_path / "absent.pth")
    with pytest.raises(ValueError, match="which"):
        load_backbone(tmp_path / "absent.pth", which="ema")  # type: ignore[arg-type]
    torch.save({"teacher": checkpoint["teacher"]}, tmp_path / "teacher_only.pth")
    with pytest.raises(ValueError, match="'student'"):
        load_backbone(tmp_path / "teacher_only.pth", which="student")
    torch.save({"epoch": 3}, tmp_path / "no_weights.pth")
    with pytest.raises(ValueError, match="no state dict"):
        load_backbone(tmp_path / "no_weights.pth")
    with pytest.raises(ValueError, match="names no arch"):
        load_backbone("random:")


def test_export_round_trip(tmp_path: Path, network: CrIBoNetwork, backbone_state: dict) -> None:
    source = network.backbone
    path = export_backbone(source, tmp_path / "out" / "backbone.safetensors")
    sidecar = json.loads(path.with_suffix(".json").read_text())
    assert (sidecar["arch"], sidecar["patch_size"], sidecar["embed_dim"]) == ("vit_tiny", 16, 192)
    backbone, info = load_backbone(path)
    assert (info.source, info.arch, info.patch_size, info.which) == ("safetensors", "vit_tiny", 16, None)
    assert_state_equal(backbone, backbone_state)
    with pytest.raises(ValueError, match=r"\.safetensors"):
        export_backbone(source, tmp_path / "backbone.pth")


def test_export_timm_name_without_sidecar(tmp_path: Path) -> None:
    source = create_backbone("test_vit")
    path = export_backbone(source, tmp_path / "test_vit.safetensors")
    path.with_suffix(".json").unlink()  # the header metadata alone is enough
    backbone, info = load_backbone(path)
    assert info.arch == "test_vit"
    assert_state_equal(backbone, source.state_dict())


def test_foreign_safetensors_is_inferred(tmp_path: Path, backbone_state: dict) -> None:
    save_file({"backbone." + k: v.contiguous() for k, v in backbone_state.items()}, tmp_path / "x.safetensors")
    backbone, info = load_backbone(tmp_path / "x.safetensors")
    assert (info.source, info.arch, info.patch_size) == ("safetensors", "vit_tiny", 16)
    assert_state_equal(backbone, backbone_state)


def test_random_specs_are_seeded_and_leave_global_rng_alone() -> None:
    state_before = torch.random.get_rng_state()
    first, info = load_backbone("timm:test_vit")
    second, _ = load_backbone("timm:test_vit")
    assert torch.equal(torch.random.get_rng_state(), state_before)
    assert (info.source, info.arch, info.path, info.sha256, info.loaded_keys) == ("random", "test_vit", None, None, ())
    assert_state_equal(second, first.state_dict())
    tiny, tiny_info = load_backbone("random:vit_tiny", patch_size=16)
    assert (tiny_info.arch, tiny_info.patch_size, tiny_info.embed_dim) == ("vit_tiny", 16, 192)
    assert tiny.pos_embed is not None and tiny.pos_embed.std() > 0
    with pytest.raises(ValueError, match="vit_small"):
        load_backbone("random:vit_enormous")


def test_position_embedding_of_another_grid_is_resampled(tmp_path: Path, backbone_state: dict) -> None:
    """A position embedding learned for a 7x7 grid is resampled to the model's 14x14 as the authors' ViT does."""
    small = interpolate_position_embedding(backbone_state["pos_embed"], (7, 7), (14, 14))
    torch.save({"model": {**backbone_state, "pos_embed": small}}, tmp_path / "grid7.pth")
    backbone, info = load_backbone(tmp_path / "grid7.pth")
    assert info.position_grid == (7, 7)
    expected = interpolate_position_embedding(small, (14, 14), (7, 7))
    assert torch.equal(backbone.pos_embed.detach(), expected)
    assert backbone.pos_embed.shape == backbone_state["pos_embed"].shape
