"""Linear segmentation on frozen features: the probe, its schedule and loss, resize and sliding evaluation."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from eval_helpers import StripeScenes, onehot_feature_fn

from cribo.eval.features import FeatureCache
from cribo.eval.linear_seg import (
    LinearConfig,
    LinearHead,
    SegEvalSettings,
    evaluate_linear,
    evaluate_segmenter,
    poly_lr_factor,
    predict_image,
    segmentation_loss,
    slide_logits,
    window_starts,
)
from cribo.eval.metrics import segmentation_scores


def noisy_onehot(patch: int, num_classes: int, dim: int = 24) -> Callable[[torch.Tensor], torch.Tensor]:
    """Separable but not trivial features: one-hot labels mixed into a random 24-dim space plus noise."""
    base = onehot_feature_fn(patch, num_classes)
    mixing = torch.randn(num_classes, dim, generator=torch.Generator().manual_seed(0))

    def features(images: torch.Tensor) -> torch.Tensor:
        noise = 0.05 * torch.randn(*images.shape[:1], images.shape[2] // patch, images.shape[3] // patch, dim)
        return base(images) @ mixing + noise

    return features


def test_linear_probe_on_separable_features_reaches_one() -> None:
    train, val = StripeScenes(24, seed=0, borders=True), StripeScenes(8, seed=1, borders=True)
    config = LinearConfig(input_size=32, steps=60, batch_size=8, progress=False)
    torch.manual_seed(0)
    result = evaluate_linear(noisy_onehot(8, 4), train, val, config, SegEvalSettings(32, progress=False))
    scores = segmentation_scores(result.confusion)
    assert scores.miou > 0.97
    assert result.losses[-1] < result.losses[0] and result.num_train_samples == 24
    wide = StripeScenes(4, seed=2, width=72)  # short side 32 = window: windows at columns 0, 24, 40
    slide = SegEvalSettings(32, mode="slide", stride=24, progress=False)
    confusion = evaluate_segmenter(
        lambda images: result.head(noisy_onehot(8, 4)(images)), wide, slide, torch.device("cpu")
    )
    assert segmentation_scores(confusion).miou > 0.97


def test_augmented_training_features_and_cache(tmp_path: Path) -> None:
    train, val = StripeScenes(6, seed=0), StripeScenes(2, seed=1)
    config = LinearConfig(input_size=32, steps=3, mode="augmented", passes=2, progress=False)
    cache = FeatureCache(tmp_path)
    features = onehot_feature_fn(8, 4)
    first = evaluate_linear(
        features, train, val, config, SegEvalSettings(32, progress=False), cache=cache, backbone_id="oracle"
    )
    second = evaluate_linear(
        features, train, val, config, SegEvalSettings(32, progress=False), cache=cache, backbone_id="oracle"
    )
    assert first.num_train_samples == 12 and cache.hits == 1
    assert first.losses == second.losses


def test_loss_ignores_255_and_schedule() -> None:
    logits = torch.zeros(1, 3, 2, 2, requires_grad=True)
    masks = torch.full((1, 4, 4), 255)
    assert float(segmentation_loss(logits, masks).detach()) == 0.0
    masks[0, 0, 0] = 1
    assert float(segmentation_loss(logits, masks).detach()) == pytest.approx(float(torch.log(torch.tensor(3.0))))
    assert poly_lr_factor(0, 100, 0.9, 0.1) == 1.0
    assert poly_lr_factor(100, 100, 0.9, 0.1) == pytest.approx(0.1)
    assert 0.1 < poly_lr_factor(50, 100, 0.9, 0.1) < 1.0


def test_windows_cover_the_image() -> None:
    assert window_starts(512, 512, 480) == [0]
    assert window_starts(1000, 512, 480) == [0, 480, 488]
    assert window_starts(100, 32, 30) == [0, 30, 60, 68]


def test_sliding_logits_average_overlaps() -> None:
    def constant_per_window(crops: torch.Tensor) -> torch.Tensor:
        return crops.mean(dim=(1, 2, 3), keepdim=True).expand(-1, 2, 2, 2) * torch.tensor([1.0, 0.0]).view(1, 2, 1, 1)

    image = torch.zeros(3, 8, 12)
    image[:, :, 6:] = 1.0
    logits = slide_logits(constant_per_window, image, window=8, stride=4, num_classes=2)
    assert logits.shape == (2, 8, 12)
    # windows at columns 0..7 (mean 2/8) and 4..11 (mean 6/8); columns 4..7 average both
    assert logits[0, 0, 0] == pytest.approx(0.25) and logits[0, 0, 11] == pytest.approx(0.75)
    assert logits[0, 0, 5] == pytest.approx(0.5) and logits[1].abs().max() == 0
    prediction = predict_image(lambda x: torch.zeros(x.shape[0], 3, 2, 2), torch.rand(3, 10, 30), 8, "slide", 4, 3)
    assert prediction.shape == (10, 30)
    with pytest.raises(ValueError, match="eval_mode"):
        predict_image(lambda x: x, torch.rand(3, 8, 8), 8, "tile", 4, 3)  # type: ignore[arg-type]


def test_head_shape_and_config_validation() -> None:
    head = LinearHead(16, 5, batch_norm=False)
    assert head(torch.randn(2, 3, 4, 16)).shape == (2, 5, 3, 4)
    with pytest.raises(ValueError, match="steps=0"):
        LinearConfig(input_size=32, steps=0)
    with pytest.raises(ValueError, match="mode="):
        LinearConfig(input_size=32, mode="both")  # type: ignore[arg-type]
