"""Segmentation metrics from one confusion matrix accumulated over a whole validation set.

Axis letters: C classes of the label space, P pixels. The confusion matrix is (C, C) int64 with rows = ground
truth and columns = prediction; pixels whose ground truth is ``ignore_index`` are not counted.

IoU of class c = TP / (TP + FP + FN). Conventions (documented in the result files too):

- ``miou`` (the headline) averages over the classes present in the validation ground truth (TP + FN > 0).
  A class absent from the ground truth but predicted somewhere is left out of this mean (its false positives
  already lower the IoU of the true classes of those pixels).
- ``miou_all_classes`` averages over every class of the label space; a class absent from both prediction and
  ground truth (IoU 0/0) counts as 0 there, a class absent from the ground truth but predicted counts as 0.
- ``per_class_iou`` holds ``None`` (JSON null) for 0/0 classes.

Optional Hungarian matching (as in open-hummingbird-eval, off by default) relabels the predicted classes with
the one-to-one mapping that maximises the matched pixels before the IoUs are computed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor


def confusion_matrix(prediction: Tensor, target: Tensor, num_classes: int, ignore_index: int | None = 255) -> Tensor:
    """Count (ground truth, prediction) pairs.

    Args:
        prediction: (...) integer labels in 0..C-1, same shape as ``target``.
        target: (...) integer labels in 0..C-1 or ``ignore_index``.
        num_classes: C.
        ignore_index: ground-truth label that is not counted (``None``: every label must be a class).

    Returns:
        (C, C) int64 on ``target``'s device, rows = ground truth, columns = prediction.
    """
    if prediction.shape != target.shape:
        raise ValueError(f"prediction {tuple(prediction.shape)} and target {tuple(target.shape)} shapes differ")
    target = target.reshape(-1).long()
    prediction = prediction.reshape(-1).long().to(target.device)
    if ignore_index is not None:
        keep = target != ignore_index
        target, prediction = target[keep], prediction[keep]
    for name, labels in (("target", target), ("prediction", prediction)):
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
            raise ValueError(
                f"{name} labels must lie in 0..{num_classes - 1} (or ignore_index={ignore_index} for the target), "
                f"found {int(labels.min())}..{int(labels.max())}"
            )
    counts = torch.bincount(target * num_classes + prediction, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes)


def intersection_over_union(confusion: Tensor) -> Tensor:
    """Per-class IoU from a confusion matrix.

    Args:
        confusion: (C, C) counts, rows = ground truth, columns = prediction.

    Returns:
        (C,) float64: TP / (TP + FP + FN), NaN where TP + FP + FN = 0.
    """
    confusion = confusion.double()
    true_positive = confusion.diagonal()
    union = confusion.sum(0) + confusion.sum(1) - true_positive
    return torch.where(union > 0, true_positive / union.clamp_min(1), torch.full_like(union, math.nan))


def linear_assignment(profit: np.ndarray) -> np.ndarray:
    """Maximum-profit one-to-one assignment of rows to columns (Hungarian method with potentials, O(C^3)).

    Args:
        profit: (C, C) array.

    Returns:
        (C,) int64: ``column[r]`` assigned to row r.
    """
    cost = -np.asarray(profit, dtype=np.float64)
    size = cost.shape[0]
    if cost.shape != (size, size):
        raise ValueError(f"profit must be square, got shape {cost.shape}")
    row_potential, col_potential = np.zeros(size + 1), np.zeros(size + 1)
    row_of_col = np.zeros(size + 1, dtype=np.int64)  # 1-based row matched to each column; column 0 is virtual
    previous_col = np.zeros(size + 1, dtype=np.int64)
    for row in range(1, size + 1):
        row_of_col[0], current = row, 0
        slack, used = np.full(size + 1, np.inf), np.zeros(size + 1, dtype=bool)
        while row_of_col[current] != 0:
            used[current] = True
            matched_row = row_of_col[current]
            reduced = cost[matched_row - 1] - row_potential[matched_row] - col_potential[1:]
            free = ~used[1:]
            better = free & (reduced < slack[1:])
            slack[1:][better], previous_col[1:][better] = reduced[better], current
            candidates = np.where(free, slack[1:], np.inf)
            nearest = int(np.argmin(candidates)) + 1
            delta = candidates[nearest - 1]
            row_potential[row_of_col[used]] += delta
            col_potential[used] -= delta
            slack[1:][free] -= delta
            current = nearest
        while current != 0:
            previous = previous_col[current]
            row_of_col[current] = row_of_col[previous]
            current = previous
    column_of_row = np.zeros(size, dtype=np.int64)
    column_of_row[row_of_col[1:] - 1] = np.arange(size)
    return column_of_row


def hungarian_relabel(confusion: Tensor) -> tuple[Tensor, Tensor]:
    """Relabel predicted classes to the one-to-one mapping that maximises matched pixels.

    Args:
        confusion: (C, C) counts, rows = ground truth, columns = prediction.

    Returns:
        The relabelled (C, C) confusion and (C,) int64 ``true_of_predicted`` mapping.
    """
    column_of_row = torch.from_numpy(linear_assignment(confusion.double().cpu().numpy()))
    true_of_predicted = torch.empty_like(column_of_row)
    true_of_predicted[column_of_row] = torch.arange(len(column_of_row))
    relabelled = torch.zeros_like(confusion)
    relabelled[:, true_of_predicted.to(confusion.device)] = confusion
    return relabelled, true_of_predicted


@dataclass
class SegmentationScores:
    """Scores of one evaluation (fractions in [0, 1]); see the module docstring for the averaging rules."""

    miou: float
    miou_all_classes: float
    pixel_accuracy: float
    per_class_iou: list[float | None]
    present_in_ground_truth: list[bool]
    matching: str = "none"
    true_of_predicted: list[int] | None = field(default=None)

    @property
    def num_present(self) -> int:
        return sum(self.present_in_ground_truth)

    @property
    def averaging_note(self) -> str:
        total = len(self.per_class_iou)
        return (
            f"mIoU averaged over the {self.num_present} of {total} classes present in the validation ground truth; "
            f"mIoU over all {total} classes (absent classes count 0): {100 * self.miou_all_classes:.2f}"
        )


def segmentation_scores(confusion: Tensor, hungarian: bool = False) -> SegmentationScores:
    """mIoU, per-class IoU and pixel accuracy of a (C, C) confusion matrix (rows ground truth).

    Args:
        confusion: (C, C) counts.
        hungarian: relabel predictions with ``hungarian_relabel`` first.
    """
    mapping = None
    if hungarian:
        confusion, mapping = hungarian_relabel(confusion)
    iou = intersection_over_union(confusion).cpu()
    present = confusion.sum(1).cpu() > 0
    total = int(confusion.sum())
    return SegmentationScores(
        miou=float(iou[present].mean()) if bool(present.any()) else math.nan,
        miou_all_classes=float(torch.nan_to_num(iou, nan=0.0).mean()),
        pixel_accuracy=float(confusion.diagonal().sum()) / total if total else math.nan,
        per_class_iou=[None if math.isnan(value) else value for value in iou.tolist()],
        present_in_ground_truth=present.tolist(),
        matching="hungarian" if hungarian else "none",
        true_of_predicted=None if mapping is None else mapping.tolist(),
    )
