"""Dense nearest-neighbour retrieval: the protocol's pieces, search backends, oracle and random backbones."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from eval_helpers import StripeScenes, forward_features, onehot_feature_fn, tiny_vit

from cribo.data.segmentation import ScenesSegmentation
from cribo.eval.features import FeatureCache, PatchFeatures
from cribo.eval.nn_retrieval import (
    CacheIdentity,
    NeighbourSearch,
    NNConfig,
    build_memory_bank,
    evaluate_nn,
    knn_torch,
    patch_label_histograms,
    propagate_labels,
    rare_class_selection,
    subsample_indices,
    upsample_argmax,
)


def test_patch_histograms_by_hand() -> None:
    mask = torch.tensor([[0, 1, 2, 2], [1, 1, 255, 2]])  # 2 x 4 pixels -> 1 x 2 patches of 2 x 2
    folded = patch_label_histograms(mask[None], (1, 2), num_classes=3, background_index=0)
    assert torch.equal(folded[0, 0, 0], torch.tensor([0.25, 0.75, 0.0, 0.0]))
    assert torch.equal(folded[0, 0, 1], torch.tensor([0.25, 0.0, 0.75, 0.0]))  # 255 counted as background
    separate = patch_label_histograms(mask[None], (1, 2), num_classes=3, background_index=None)
    assert torch.equal(separate[0, 0, 1], torch.tensor([0.0, 0.0, 0.75, 0.25]))  # 255 in the extra bin
    with pytest.raises(ValueError, match="mask labels"):
        patch_label_histograms(torch.tensor([[[5]]]), (1, 1), 3, 0)


def test_rare_class_selection_keeps_rare_patches_and_clamps() -> None:
    histograms = torch.zeros(10, 3)
    histograms[:8, 0] = 1.0  # eight background patches
    histograms[8:, 1] = 1.0  # two patches of a rare class
    generator = torch.Generator().manual_seed(0)
    kept = torch.cat([rare_class_selection(histograms, 2, generator) for _ in range(200)])
    rare_share = float((kept >= 8).float().mean())
    assert rare_share > 0.4  # uniform sampling would give 0.2: score x noise favours, not forces, rare classes
    assert len(rare_class_selection(histograms, 50, torch.Generator().manual_seed(0))) == 10


def test_knn_torch_chunks_and_faiss_agree() -> None:
    generator = torch.Generator().manual_seed(0)
    keys = torch.nn.functional.normalize(torch.randn(500, 16, generator=generator), dim=-1)
    queries = torch.nn.functional.normalize(torch.randn(40, 16, generator=generator), dim=-1)
    full_sims, full_index = knn_torch(queries, keys, 7, key_chunk=10_000)
    chunk_sims, chunk_index = knn_torch(queries, keys, 7, key_chunk=64)
    assert torch.equal(full_index, chunk_index) and torch.allclose(full_sims, chunk_sims)
    brute = (queries @ keys.T).topk(7, dim=1)
    assert torch.equal(full_index, brute.indices)
    faiss_sims, faiss_index = NeighbourSearch(keys, "faiss", 64, 8, 8).search(queries, 7)
    assert torch.equal(faiss_index, full_index) and torch.allclose(faiss_sims, full_sims, atol=1e-5)
    ivf_sims, _ = NeighbourSearch(keys, "faiss-ivf", 64, 4, 4).search(queries, 7)  # approximate: runs, sorted
    assert ivf_sims.shape == (40, 7) and bool((ivf_sims[:, :-1] >= ivf_sims[:, 1:]).all())
    _, few_index = NeighbourSearch(keys[:3], "torch", 64, 8, 8).search(queries, 30)
    assert few_index.shape == (40, 3)


def test_propagation_and_upsampling_by_hand() -> None:
    similarities = torch.tensor([[0.9, 0.9, 0.5]])
    labels = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]]])
    out = propagate_labels(similarities, labels, temperature=0.1)
    weight = torch.softmax(torch.tensor([9.0, 9.0, 5.0]), 0)
    assert torch.allclose(out, torch.tensor([[weight[0] + weight[2], weight[1]]]))
    scores = torch.zeros(1, 1, 2, 3)
    scores[0, 0, 0, 1] = scores[0, 0, 1, 0] = 1.0
    scores[0, 0, :, 2] += 5.0  # the extra "ignored" bin never wins
    prediction = upsample_argmax(scores, (2, 8), num_classes=2)
    assert prediction[0].tolist() == [[1, 1, 1, 1, 0, 0, 0, 0]] * 2


def test_subsample_indices() -> None:
    assert subsample_indices(10, 1.0, 3) == list(range(10))
    subset = subsample_indices(1000, 1 / 64, 0)
    assert len(subset) == 16 and subset == sorted(subset) and subset == subsample_indices(1000, 1 / 64, 0)
    assert subset != subsample_indices(1000, 1 / 64, 1)
    assert len(subsample_indices(10, 1 / 128, 0)) == 1
    with pytest.raises(ValueError, match="fraction"):
        subsample_indices(10, 0.0, 0)


def test_onehot_backbone_scores_miou_one() -> None:
    train, val = StripeScenes(24, seed=0, borders=True), StripeScenes(8, seed=1, borders=True)
    config = NNConfig(input_size=32, progress=False)
    for search in ("torch", "faiss"):
        runs = evaluate_nn(onehot_feature_fn(8, 4), train, val, NNConfig(32, search=search, progress=False))
        assert runs[0].scores.miou == pytest.approx(1.0)
        assert runs[0].bank_size == 24 * 16
    capped = evaluate_nn(onehot_feature_fn(8, 4), train, val, NNConfig(32, bank_cap=100, progress=False))
    assert capped[0].bank_size == 24 * 4 and capped[0].scores.miou == pytest.approx(1.0)
    augmented = NNConfig(32, mode="augmented", passes=2, crop_scale=(0.9, 1.0), progress=False)
    runs = evaluate_nn(onehot_feature_fn(8, 4), train, val, augmented, fractions=(1 / 8, 1.0), seeds=(0, 1))
    assert [(run.fraction, run.seed, run.num_train_images) for run in runs] == [
        (1 / 8, 0, 3),
        (1 / 8, 1, 3),
        (1.0, 0, 24),
        (1.0, 1, 24),
    ]
    assert runs[-1].scores.miou > 0.9
    assert config.k == 30 and config.temperature == 0.02


def test_torch_and_faiss_give_the_same_numbers_with_a_vit() -> None:
    train, val = StripeScenes(12, seed=0), StripeScenes(4, seed=1)
    features = PatchFeatures(tiny_vit(), tokens_fn=forward_features)
    scores = [
        evaluate_nn(features, train, val, NNConfig(32, k=5, search=method, progress=False))[0].scores
        for method in ("torch", "faiss")
    ]
    assert scores[0].per_class_iou == pytest.approx(scores[1].per_class_iou, abs=1e-12)


def test_bank_is_deterministic_and_cached(tmp_path: Path) -> None:
    train = StripeScenes(6, seed=0)
    config = NNConfig(32, mode="augmented", passes=2, progress=False)
    features = PatchFeatures(tiny_vit(), tokens_fn=forward_features)
    device = torch.device("cpu")
    first = build_memory_bank(features, train, range(6), config, seed=0, device=device)
    again = build_memory_bank(features, train, range(6), config, seed=0, device=device)
    other = build_memory_bank(features, train, range(6), config, seed=1, device=device)
    assert first.features.shape == (6 * 2 * 16, 32) and first.labels.shape == (6 * 2 * 16, 5)
    assert torch.equal(first.features, again.features) and not torch.equal(first.features, other.features)
    assert torch.allclose(first.features.norm(dim=-1), torch.ones(192))
    cached = CacheIdentity(FeatureCache(tmp_path), "tiny")
    val = StripeScenes(3, seed=1)
    runs = evaluate_nn(features, train, val, config, cached=cached)
    rerun = evaluate_nn(features, train, val, config, cached=cached)
    assert cached.cache.hits == 2 and runs[0].scores == rerun[0].scores


def test_random_backbone_is_well_below_the_oracle_on_scenes() -> None:
    train = ScenesSegmentation("train", num_images=16, image_size=64, seed=0)
    val = ScenesSegmentation("val", num_images=6, image_size=64, seed=0)
    features = PatchFeatures(tiny_vit(img_size=64), tokens_fn=forward_features)
    runs = evaluate_nn(features, train, val, NNConfig(64, progress=False))
    assert runs[0].scores.miou < 0.5


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="mode="):
        NNConfig(32, mode="random")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="temperature"):
        NNConfig(32, temperature=0.0)
    with pytest.raises(ValueError, match="search="):
        NeighbourSearch(torch.zeros(2, 2), "annoy", 1, 1, 1)  # type: ignore[arg-type]
