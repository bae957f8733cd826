"""Tests of cribo.models: parity with the authors' ViT and head (backbone.pt + their checkpoint), loaders."""

from __future__ import annotations

import re
from typing import Any

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.models import checkpoint_seq
from torch import Tensor, nn

from conftest import WHICH
from cribo import models
from cribo.models import (
    SHORT_ARCHS,
    CrIBoNetwork,
    ProjectionHead,
    backbone_tokens,
    create_backbone,
    interpolate_position_embedding,
    resolve_arch,
    set_fused_attention,
)

ATOL = 1e-5
RTOL = 1e-5


def _grid(fixture: dict[str, Any]) -> tuple[int, int]:
    height, width = fixture["input"].shape[-2:]
    return height // fixture["patch_size"], width // fixture["patch_size"]


# ----------------------------------------------------------------------------------------------------------------
# Parity with the authors' network


@pytest.mark.parametrize("which", WHICH)
def test_state_dict_keys_and_shapes_match_authors(
    networks: dict[str, CrIBoNetwork], fixture: dict[str, Any], checkpoint: dict[str, Any], which: str
) -> None:
    prefix = "module." if which == "student" else ""
    ours = {prefix + key: list(value.shape) for key, value in networks[which].state_dict().items()}
    assert ours == fixture[f"{which}_state_dict_shapes"]
    assert {k: list(v.shape) for k, v in checkpoint[which].items()} == ours


def test_patch_embedding_matches_reference(network: CrIBoNetwork, fixture: dict[str, Any]) -> None:
    with torch.no_grad():
        patches = network.backbone.patch_embed(fixture["input"]).flatten(1, 2)
    torch.testing.assert_close(patches, fixture["patch_embed"], atol=ATOL, rtol=RTOL)


def test_interpolated_position_embedding_matches_reference(network: CrIBoNetwork, fixture: dict[str, Any]) -> None:
    backbone = network.backbone
    with torch.no_grad():
        assert backbone.pos_embed is not None
        pos_embed = interpolate_position_embedding(backbone.pos_embed, _grid(fixture), backbone.patch_embed.grid_size)
    torch.testing.assert_close(pos_embed, fixture["pos_embed_interpolated"], atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("which", WHICH)
def test_tokens_and_heads_match_reference(
    fused_restored: dict[str, CrIBoNetwork], fixture: dict[str, Any], which: str, fused: bool
) -> None:
    """Fused attention off: bit-exact on this machine; on: within ~2.2e-6 (README pitfall 3)."""
    network = fused_restored[which]
    set_fused_attention(network, fused)
    with torch.no_grad():
        tokens = network(fixture["input"])
        head_cls = network.head(tokens[:, 0])
        head_objects = network.head.forward_objects(tokens[:, 1:])
    torch.testing.assert_close(tokens, fixture["last_tokens"], atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(tokens[:, 0], fixture["cls"], atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(head_cls, fixture["head_cls"], atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(head_objects, fixture["head_c_patch_tokens"], atol=ATOL, rtol=RTOL)


def test_timm_resampling_differs_from_authors(network: CrIBoNetwork, fixture: dict) -> None:
    """Why backbone_tokens exists: timm's own dynamic-size forward resamples the positions differently."""
    with torch.no_grad():
        timm_tokens = network.backbone.forward_features(fixture["input"])
    assert (timm_tokens - fixture["last_tokens"]).abs().max() > 1e-3


def test_native_size_equals_timm_forward(network: CrIBoNetwork) -> None:
    backbone = network.backbone
    height, width = (g * p for g, p in zip(backbone.patch_embed.grid_size, backbone.patch_embed.patch_size))
    images = torch.randn(1, 3, height, width, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(backbone_tokens(backbone, images), backbone.forward_features(images))


def test_head_flags_follow_norm_last_layer(networks: dict[str, CrIBoNetwork], checkpoint: dict) -> None:
    for which, norm_last_layer in zip(WHICH, (True, checkpoint["args"].norm_last_layer)):
        head = networks[which].head
        assert head.last_layer.weight_g.requires_grad is not norm_last_layer
        assert head.last_layer_c.weight_g.requires_grad is not norm_last_layer
        assert all(parameter.requires_grad for parameter in head.mlp.parameters())


# ----------------------------------------------------------------------------------------------------------------
# Backbone factory and token forward


def test_create_backbone_matches_authors_vit(network: CrIBoNetwork, fixture: dict[str, Any]) -> None:
    backbone: Any = network.backbone
    grid = backbone.patch_embed.grid_size
    assert backbone.patch_embed.patch_size == (fixture["patch_size"],) * 2
    assert backbone.pos_embed.shape == (1, 1 + grid[0] * grid[1], fixture["embed_dim"])
    assert backbone.num_classes == 0
    assert all(block.attn.qkv.bias is not None for block in backbone.blocks)
    norms = [module for module in backbone.modules() if isinstance(module, nn.LayerNorm)]
    assert norms and all(norm.eps == 1e-6 for norm in norms)
    gelus = [module for module in backbone.modules() if isinstance(module, nn.GELU)]
    assert gelus and all(gelu.approximate == "none" for gelu in gelus)


@pytest.mark.parametrize("drop_rate", [0.5, 1.0])
def test_sample_drop_block_equals_timm_block(drop_rate: float) -> None:
    # Same weights, same seed: the kept samples' branches are timm's, the dropped ones are skipped, not zeroed.
    torch.manual_seed(0)
    ours = models.SampleDropBlock(dim=32, num_heads=4, drop_path=drop_rate)
    theirs = timm.models.vision_transformer.Block(dim=32, num_heads=4, drop_path=drop_rate)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(16, 5, 32)
    outputs, grads = [], []
    for block in (ours, theirs):
        block.train()
        torch.manual_seed(3)
        inputs = x.clone().requires_grad_()
        out = block(inputs)
        out.pow(2).sum().backward()
        outputs.append(out)
        grads.append([inputs.grad] + [p.grad for p in block.parameters()])
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-5, atol=1e-5)
    for mine, timms in zip(*grads, strict=True):
        assert mine is not None  # every parameter takes part, even when every sample is dropped
        torch.testing.assert_close(mine, timms, rtol=1e-5, atol=1e-5)
    if drop_rate == 0.5:  # some samples dropped and some kept in this draw
        unchanged = (outputs[0] == x).flatten(1).all(dim=1)
        assert 0 < int(unchanged.sum()) < x.shape[0]
    ours.eval()
    torch.testing.assert_close(ours(x), theirs.eval()(x))


def test_sample_drop_block_draws_like_timm() -> None:
    # The random stream after a block is the same as after timm's block (resume and parity depend on it).
    block = models.SampleDropBlock(dim=16, num_heads=2, drop_path=0.3).train()
    reference = timm.models.vision_transformer.Block(dim=16, num_heads=2, drop_path=0.3).train()
    after = []
    for module in (block, reference):
        torch.manual_seed(5)
        module(torch.randn(8, 3, 16))
        after.append(torch.rand(4))
    torch.testing.assert_close(after[0], after[1], rtol=0, atol=0)
    assert isinstance(create_backbone("vit_tiny", 16, drop_path_rate=0.1, depth=1).blocks[0], models.SampleDropBlock)


def test_resolve_arch() -> None:
    assert resolve_arch("vit_small", 16) == ("vit_small_patch16_224", {})
    assert resolve_arch("vit_base", 8) == ("vit_base_patch8_224", {})
    assert resolve_arch("vit_tiny", 8) == ("vit_tiny_patch16_224", {"patch_size": 8})
    assert resolve_arch("vit_small_patch14_dinov2") == ("vit_small_patch14_dinov2", {})
    with pytest.raises(ValueError, match="vit_tiny"):
        resolve_arch("vit_huge_nonexistent")
    with pytest.raises(ValueError, match="patch_size"):
        resolve_arch("vit_tiny", 0)


def test_create_backbone_patch_sizes_and_errors() -> None:
    with torch.device("meta"):
        tiny8: Any = create_backbone("vit_tiny", patch_size=8)
        assert tiny8.patch_embed.patch_size == (8, 8)
        assert tiny8.pos_embed.shape == (1, 1 + 28 * 28, 192)
        with pytest.raises(ValueError, match="patch size 16"):
            create_backbone("vit_small_patch16_224", patch_size=8)
        with pytest.raises(ValueError, match="VisionTransformer"):
            create_backbone("resnet18")
        with pytest.raises(ValueError, match=re.escape(str(sorted(SHORT_ARCHS)))):
            create_backbone("vit_gigantic")


def test_backbone_tokens_non_square_and_errors() -> None:
    backbone = create_backbone("test_vit").eval()
    patch = backbone.patch_embed.patch_size[0]
    images = torch.randn(2, 3, 3 * patch, 5 * patch, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        tokens = backbone_tokens(backbone, images)
    assert tokens.shape == (2, 1 + 3 * 5, backbone.embed_dim)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        backbone_tokens(backbone, images[..., 1:])
    with pytest.raises(ValueError, match="images"):
        backbone_tokens(backbone, images[0])
    with torch.device("meta"):
        registers: Any = timm.create_model("test_vit", num_classes=0, reg_tokens=4)
    with pytest.raises(ValueError, match="register"):
        backbone_tokens(registers, images.to("meta"))


def test_gradient_checkpointing_gives_same_tokens_and_gradients(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def counting_checkpoint_seq(blocks: nn.Module, tokens: Tensor) -> Tensor:
        calls.append(tokens.shape)
        return checkpoint_seq(blocks, tokens)

    monkeypatch.setattr(models, "checkpoint_seq", counting_checkpoint_seq)
    backbone = create_backbone("test_vit").eval()
    images = torch.randn(2, 3, 32, 48, generator=torch.Generator().manual_seed(2))
    grads = []
    outputs = []
    for enabled in (False, True):
        backbone.set_grad_checkpointing(enabled)
        backbone.zero_grad()
        tokens = backbone_tokens(backbone, images)
        tokens.square().mean().backward()
        outputs.append(tokens.detach())
        grads.append(next(backbone.blocks.parameters()).grad)
    assert len(calls) == 1 and grads[0] is not None
    torch.testing.assert_close(outputs[0], outputs[1])
    torch.testing.assert_close(grads[0], grads[1])


def test_interpolate_position_embedding_properties() -> None:
    dim, native = 4, (5, 5)
    constant = torch.arange(dim, dtype=torch.float32).expand(1, 1 + 25, dim).clone()
    constant[:, 0] = -7.0
    resized = interpolate_position_embedding(constant, (3, 8), native)
    assert resized.shape == (1, 1 + 24, dim)
    assert torch.equal(resized[:, 0], constant[:, 0])  # [CLS] entry untouched
    torch.testing.assert_close(resized[:, 1:], constant[:, 1:2].expand(1, 24, dim))  # bicubic keeps constants
    assert interpolate_position_embedding(constant, native, native) is constant
    # The scale factor, not the output size, sets the sampling positions.
    ramp = torch.randn(1, 1 + 25, dim, generator=torch.Generator().manual_seed(3))
    by_size = F.interpolate(
        ramp[:, 1:].reshape(1, 5, 5, dim).permute(0, 3, 1, 2), size=(3, 8), mode="bicubic", align_corners=False
    )
    by_scale = interpolate_position_embedding(ramp, (3, 8), native)[:, 1:]
    assert not torch.allclose(by_scale, by_size.permute(0, 2, 3, 1).reshape(1, 24, dim))
    with pytest.raises(ValueError, match="pos_embed"):
        interpolate_position_embedding(ramp, (3, 3), (4, 4))


def test_set_fused_attention_toggles_every_layer() -> None:
    backbone: Any = create_backbone("test_vit")
    set_fused_attention(backbone, False)
    assert all(block.attn.fused_attn is False for block in backbone.blocks)
    set_fused_attention(backbone, True)
    assert all(block.attn.fused_attn is True for block in backbone.blocks)


# ----------------------------------------------------------------------------------------------------------------
# Projection head and network


def test_projection_head_structure_and_init() -> None:
    torch.manual_seed(0)
    head = ProjectionHead(12, 7, 9, hidden_dim=32, bottleneck_dim=6)
    assert set(head.state_dict()) == {
        "mlp.0.weight",
        "mlp.0.bias",
        "mlp.2.weight",
        "mlp.2.bias",
        "mlp.4.weight",
        "mlp.4.bias",
        "last_layer.weight_g",
        "last_layer.weight_v",
        "last_layer_c.weight_g",
        "last_layer_c.weight_v",
    }
    assert head.last_layer.weight_g.shape == (7, 1) and head.last_layer.weight_v.shape == (7, 6)
    assert head.last_layer_c.weight_g.shape == (9, 1) and head.last_layer_c.weight_v.shape == (9, 6)
    assert torch.equal(head.last_layer.weight_g, torch.ones(7, 1))
    linears = [module for module in head.mlp.modules() if isinstance(module, nn.Linear)]
    assert all(torch.equal(linear.bias, torch.zeros_like(linear.bias)) for linear in linears)
    assert all(linear.weight.abs().max() <= 2.0 and linear.weight.std() < 0.03 for linear in linears)
    torch.testing.assert_close(head.last_layer.weight.norm(dim=1), torch.ones(7))
    features = torch.randn(5, 12)
    assert head(features).shape == (5, 7)
    assert head.forward_objects(features).shape == (5, 9)


def test_projection_head_weight_norm_and_separate_last_layers() -> None:
    torch.manual_seed(0)
    head = ProjectionHead(12, 7, 9, hidden_dim=32, bottleneck_dim=6)
    features = torch.randn(5, 12)
    before_global, before_objects = head(features), head.forward_objects(features)
    with torch.no_grad():
        head.last_layer_c.weight_g.fill_(2.0)
        head.last_layer_c.weight_v.mul_(3.0)  # the scale of v does not matter
    torch.testing.assert_close(head(features), before_global)
    torch.testing.assert_close(head.forward_objects(features), 2.0 * before_objects)
    bottleneck = head.bottleneck(features)
    torch.testing.assert_close(bottleneck.norm(dim=-1), torch.ones(5))
    v = head.last_layer.weight_v
    torch.testing.assert_close(head(features), bottleneck @ (v / v.norm(dim=1, keepdim=True)).T)


@pytest.mark.parametrize("use_bn", [False, True])
def test_projection_head_bottlenecks_equal_separate_calls(use_bn: bool) -> None:
    torch.manual_seed(0)
    head = ProjectionHead(16, 32, 24, hidden_dim=64, bottleneck_dim=8, use_bn=use_bn).train()
    inputs = (torch.randn(3, 16), torch.randn(7, 16), torch.randn(0, 16))
    together = head.bottlenecks(*inputs)
    assert [t.shape for t in together] == [(3, 8), (7, 8), (0, 8)]
    for joint, x in zip(together, inputs, strict=True):
        # With batch norm each input keeps its own batch statistics; without, rows are independent.
        if x.shape[0] > 1 or not use_bn:
            torch.testing.assert_close(joint, head.bottleneck(x), rtol=1e-5, atol=1e-6)
    if not use_bn:  # one batch: its rows equal the separate calls, and gradients reach the MLP through each part
        together[1].sum().backward()
        assert all(p.grad is not None for p in head.mlp.parameters())


def test_projection_head_variants() -> None:
    assert isinstance(ProjectionHead(12, 7, 9, num_layers=1, bottleneck_dim=6).mlp, nn.Linear)
    with_bn: Any = ProjectionHead(12, 7, 9, hidden_dim=16, bottleneck_dim=6, use_bn=True)
    assert isinstance(with_bn.mlp[1], nn.BatchNorm1d) and isinstance(with_bn.mlp[6], nn.Linear)
    with pytest.raises(ValueError, match="num_layers"):
        ProjectionHead(12, 7, 9, num_layers=0)
