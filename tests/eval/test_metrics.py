"""mIoU from a confusion matrix, checked against torchmetrics; Hungarian matching against brute force."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from torchmetrics.classification import MulticlassConfusionMatrix, MulticlassJaccardIndex

from cribo.eval.metrics import (
    confusion_matrix,
    hungarian_relabel,
    intersection_over_union,
    linear_assignment,
    segmentation_scores,
)


def random_labels(num_classes: int, seed: int, ignore_fraction: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    target = torch.randint(0, num_classes, (3, 17, 19), generator=generator)
    prediction = torch.where(
        torch.rand(target.shape, generator=generator) < 0.6,
        target,
        torch.randint(0, num_classes, target.shape, generator=generator),
    )
    target[torch.rand(target.shape, generator=generator) < ignore_fraction] = 255
    return prediction, target


@pytest.mark.parametrize("seed", range(4))
def test_confusion_and_iou_match_torchmetrics(seed: int) -> None:
    num_classes = 6
    prediction, target = random_labels(num_classes, seed)
    confusion = confusion_matrix(prediction, target, num_classes, ignore_index=255)
    expected = MulticlassConfusionMatrix(num_classes, ignore_index=255)(prediction, target)
    assert torch.equal(confusion, expected.long())
    iou = intersection_over_union(confusion)
    jaccard = MulticlassJaccardIndex(num_classes, average="none", ignore_index=255)(prediction, target)
    assert torch.allclose(iou.float(), jaccard, atol=1e-6)
    macro = MulticlassJaccardIndex(num_classes, average="macro", ignore_index=255)(prediction, target)
    scores = segmentation_scores(confusion)
    assert math.isclose(scores.miou, float(macro), abs_tol=1e-6)  # every class present: the two agree
    assert math.isclose(scores.miou_all_classes, scores.miou, abs_tol=1e-12)


def test_accumulating_batches_equals_one_pass() -> None:
    prediction, target = random_labels(5, seed=7)
    total = torch.stack([confusion_matrix(p, t, 5) for p, t in zip(prediction, target)]).sum(0)
    assert torch.equal(total, confusion_matrix(prediction, target, 5))


def test_absent_classes_follow_the_documented_rules() -> None:
    # class 3 absent from both, class 2 predicted but absent from the ground truth
    target = torch.tensor([0, 0, 1, 1, 255])
    prediction = torch.tensor([0, 2, 1, 1, 3])
    scores = segmentation_scores(confusion_matrix(prediction, target, 4))
    assert scores.per_class_iou == [0.5, 1.0, 0.0, None]
    assert scores.present_in_ground_truth == [True, True, False, False]
    assert scores.miou == pytest.approx(0.75)  # over the ground-truth classes 0 and 1
    assert scores.miou_all_classes == pytest.approx(1.5 / 4)  # 0/0 and absent count 0
    assert scores.pixel_accuracy == pytest.approx(3 / 4)
    assert "2 of 4 classes present" in scores.averaging_note
    # torchmetrics (zero_division=0) agrees per class wherever IoU is defined
    jaccard = MulticlassJaccardIndex(4, average="none", ignore_index=255)(prediction, target)
    assert torch.allclose(jaccard[:3], torch.tensor([0.5, 1.0, 0.0]))


def test_linear_assignment_matches_brute_force() -> None:
    rng = np.random.default_rng(0)
    for size in (1, 2, 3, 5, 6):
        for _ in range(5):
            profit = rng.integers(0, 20, (size, size)).astype(float)
            column = linear_assignment(profit)
            assert sorted(column.tolist()) == list(range(size))
            best = max(sum(profit[r, p[r]] for r in range(size)) for p in itertools.permutations(range(size)))
            assert profit[np.arange(size), column].sum() == best


def test_hungarian_recovers_permuted_labels() -> None:
    generator = torch.Generator().manual_seed(0)
    target = torch.randint(0, 5, (1000,), generator=generator)
    permutation = torch.tensor([3, 0, 4, 1, 2])
    prediction = permutation[target]
    plain = segmentation_scores(confusion_matrix(prediction, target, 5))
    matched = segmentation_scores(confusion_matrix(prediction, target, 5), hungarian=True)
    assert plain.miou < 0.1
    assert matched.miou == pytest.approx(1.0)
    assert matched.matching == "hungarian"
    relabelled, true_of_predicted = hungarian_relabel(confusion_matrix(prediction, target, 5))
    assert torch.equal(true_of_predicted[permutation], torch.arange(5))
    assert int(relabelled.diagonal().sum()) == 1000


def test_bad_labels_are_errors() -> None:
    with pytest.raises(ValueError, match=r"target labels must lie in 0\.\.2"):
        confusion_matrix(torch.tensor([0, 1]), torch.tensor([0, 7]), 3)
    with pytest.raises(ValueError, match="prediction labels"):
        confusion_matrix(torch.tensor([0, 3]), torch.tensor([0, 1]), 3)
    with pytest.raises(ValueError, match="shapes differ"):
        confusion_matrix(torch.tensor([0, 1]), torch.tensor([0]), 3)
