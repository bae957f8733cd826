"""Patch features of a ViT (last n layers, pixel normalisation), checksums, batching and the feature cache."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from eval_helpers import StripeScenes, forward_features, tiny_vit

from cribo.eval.features import (
    FeatureCache,
    PatchFeatures,
    ResizeTransform,
    normalize_pixels,
    pack_masks,
    state_dict_checksum,
    transformed_batches,
    unpack_masks,
)


def test_last_layer_features_are_the_patch_tokens_on_their_grid() -> None:
    model = tiny_vit()
    images = torch.rand(2, 3, 40, 24)
    features = PatchFeatures(model, tokens_fn=forward_features)
    with torch.no_grad():
        out = features(images)
        tokens = model.forward_features(normalize_pixels(images, "imagenet"))
    assert out.shape == (2, 5, 3, 32)
    assert torch.allclose(out.reshape(2, 15, 32), tokens[:, 1:])
    assert features.patch_size == 8 and features.out_dim == 32


def test_last_n_layers_are_concatenated_last_block_first_and_hooks_removed() -> None:
    model = tiny_vit()
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        one = PatchFeatures(model, 1, tokens_fn=forward_features)(images)
        two_layers = PatchFeatures(model, 2, tokens_fn=forward_features)
        two = two_layers(images)
        first_block = model.norm(
            model.blocks[0](model.norm_pre(model._pos_embed(model.patch_embed(normalize_pixels(images, "imagenet")))))
        )
    assert two.shape == (2, 4, 4, 64) and two_layers.out_dim == 64
    assert torch.allclose(two[..., :32], one, atol=1e-6)
    assert torch.allclose(two[..., 32:].reshape(2, 16, 32), first_block[:, 1:], atol=1e-5)
    assert all(not block._forward_hooks for block in model.blocks)


def test_default_tokens_fn_is_cribo_models_backbone_tokens() -> None:
    from cribo.models import backbone_tokens

    model = tiny_vit()
    images = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        expected = backbone_tokens(model, normalize_pixels(images, "half"))[:, 1:]
        got = PatchFeatures(model, pixel_norm="half")(images)
    assert torch.allclose(got.reshape(1, 16, 32), expected)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match=r"num_layers=3 must lie in 1\.\.2"):
        PatchFeatures(tiny_vit(), 3, tokens_fn=forward_features)
    with pytest.raises(ValueError, match="pixel_norm"):
        PatchFeatures(tiny_vit(), 1, pixel_norm="bad", tokens_fn=forward_features)  # type: ignore[arg-type]


def test_checksum_identifies_weights() -> None:
    first, second = tiny_vit(seed=0), tiny_vit(seed=0)
    assert state_dict_checksum(first) == state_dict_checksum(second)
    with torch.no_grad():
        second.cls_token.add_(1e-3)  # type: ignore[union-attr]
    assert state_dict_checksum(first) != state_dict_checksum(second)


def test_transformed_batches_and_mask_packing() -> None:
    dataset = StripeScenes(5, size=32)
    batches = list(transformed_batches(dataset, [4, 0, 2], ResizeTransform(16), batch_size=2))
    assert [images.shape[0] for images, _ in batches] == [2, 1]
    assert batches[0][0].shape == (2, 3, 16, 16) and batches[0][1].shape == (2, 16, 16)
    masks = [torch.randint(0, 256, (3, 5)), torch.randint(0, 256, (4, 2))]
    restored = unpack_masks(pack_masks(masks))
    assert all(torch.equal(a, b) for a, b in zip(masks, restored))


def test_feature_cache_round_trip(tmp_path: Path) -> None:
    cache = FeatureCache(tmp_path / "cache")
    calls = []

    def compute() -> dict[str, torch.Tensor]:
        calls.append(1)
        return {"features": torch.arange(6.0).reshape(2, 3)}

    parts = {"backbone": "abc", "size": 32}
    first = cache.get_or_compute(parts, compute)
    second = cache.get_or_compute(parts, compute)
    assert len(calls) == 1 and cache.hits == 1 and torch.equal(first["features"], second["features"])
    cache.get_or_compute({"backbone": "abc", "size": 64}, compute)
    assert len(calls) == 2
    FeatureCache(None).get_or_compute(parts, compute)
    assert len(calls) == 3
