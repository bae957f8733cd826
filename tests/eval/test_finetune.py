"""Fine-tuning: frozen blocks stay put, the rest trains, both decoders run and evaluate."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from eval_helpers import StripeScenes, forward_features, tiny_vit

from cribo.eval.features import PatchFeatures
from cribo.eval.finetune import (
    FinetuneConfig,
    MaskTransformerDecoder,
    build_decoder,
    evaluate_finetune,
    freeze_blocks,
)
from cribo.eval.linear_seg import SegEvalSettings


def test_mask_transformer_shapes_and_gradients() -> None:
    decoder = MaskTransformerDecoder(in_dim=32, num_classes=5, dim=64, num_layers=2)
    features = torch.randn(2, 3, 4, 32, requires_grad=True)
    logits = decoder(features)
    assert logits.shape == (2, 5, 3, 4)
    logits.sum().backward()
    assert features.grad is not None and decoder.class_embeddings.grad is not None
    assert build_decoder("linear", 32, 5, 64, 2)(features).shape == (2, 5, 3, 4)
    with pytest.raises(ValueError, match="decoder='fpn'"):
        build_decoder("fpn", 32, 5, 64, 2)  # type: ignore[arg-type]


def test_freeze_blocks() -> None:
    encoder = PatchFeatures(tiny_vit(), tokens_fn=forward_features)
    total = sum(p.numel() for p in encoder.parameters())
    assert freeze_blocks(encoder, 0) == total
    trainable = freeze_blocks(encoder, 1)
    backbone: Any = encoder.backbone
    assert not any(p.requires_grad for p in backbone.blocks[0].parameters())
    assert not backbone.patch_embed.proj.weight.requires_grad and not backbone.pos_embed.requires_grad
    assert all(p.requires_grad for p in backbone.blocks[1].parameters()) and 0 < trainable < total
    assert freeze_blocks(encoder, 2) == 0  # everything frozen, final norm included
    with pytest.raises(ValueError, match=r"frozen_blocks=3 must lie in 0\.\.2"):
        freeze_blocks(encoder, 3)
    with pytest.raises(ValueError, match="needs an encoder with a ViT"):
        freeze_blocks(torch.nn.Linear(2, 2), 1)


@pytest.mark.parametrize("decoder", ["linear", "mask_transformer"])
def test_finetune_trains_unfrozen_blocks_and_evaluates(decoder: Any) -> None:
    train, val = StripeScenes(8, seed=0), StripeScenes(2, seed=1)
    encoder = PatchFeatures(tiny_vit(), tokens_fn=forward_features)
    before = {name: p.detach().clone() for name, p in encoder.backbone.named_parameters()}
    config = FinetuneConfig(
        input_size=32, steps=4, batch_size=4, frozen_blocks=1, decoder=decoder, decoder_dim=32, progress=False
    )
    result = evaluate_finetune(encoder, 32, train, val, config, SegEvalSettings(32, progress=False))
    after = dict(encoder.backbone.named_parameters())
    assert torch.equal(before["blocks.0.attn.qkv.weight"], after["blocks.0.attn.qkv.weight"])
    assert torch.equal(before["pos_embed"], after["pos_embed"])
    assert not torch.equal(before["blocks.1.attn.qkv.weight"], after["blocks.1.attn.qkv.weight"])
    assert len(result.losses) == 4 and all(torch.isfinite(torch.tensor(result.losses)))
    assert int(result.confusion.sum()) == 2 * 32 * 32
    assert not result.model.training


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="decoder="):
        FinetuneConfig(input_size=32, decoder="unet")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="steps=0"):
        FinetuneConfig(input_size=32, steps=0)
