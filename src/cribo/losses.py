"""CrIBo's three loss terms: image-level DINO, object-level cross-view and object-level cross-image bootstrapping.

Every term is a cross-entropy between a sharpened, centred teacher distribution and the student's tempered
distribution (paper §3.3, eq. 5-8; DINO, Caron et al. 2021).

Axis letters: B images per process, V = 2 views, n valid objects per view (rows aligned across the two views),
C head output dimension (global head ``out_dim`` or object head ``out_dim_c``), R rows of any kind.
Row layouts follow the reference fixtures: ``(V*B, C)`` / ``(V*n, C)`` tensors hold all of view 1 first.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cribo.distributed import all_reduce_sum

CrossImageNormalization = Literal["per_view", "view1"]
CROSS_IMAGE_NORMALIZATIONS: tuple[str, ...] = get_args(CrossImageNormalization)

NUM_VIEWS = 2  # two global crops per image (authors: ncrops = 2, no local crops in any published run)
STUDENT_TEMP = 0.1  # authors' CrIBoLoss default; train_cribo never passes --student_temp (README quirk 4)
CENTER_MOMENTUM = 0.9  # authors' CrIBoLoss default for both centres (DINO's value)


def soft_cross_entropy(teacher_probs: Tensor, student_logits: Tensor) -> Tensor:
    """Cross-entropy of a soft target, row by row: ``-sum_c p_c * log_softmax(s)_c``.

    Args:
        teacher_probs: ``(..., C)`` target distribution (rows sum to 1).
        student_logits: ``(..., C)`` student logits, already divided by the student temperature.

    Returns:
        ``(...)`` one value per row.
    """
    return -(teacher_probs * F.log_softmax(student_logits, dim=-1)).sum(dim=-1)


def sharpen(teacher_logits: Tensor, center: Tensor, temperature: float) -> Tensor:
    """Centred, sharpened teacher distribution ``softmax((t - center) / temperature)`` (DINO eq. 2-3).

    Args:
        teacher_logits: ``(..., C)`` teacher head outputs.
        center: ``(1, C)`` running centre, broadcast over rows.
        temperature: teacher temperature (0.04 -> 0.07 in CrIBo).

    Returns:
        ``(..., C)`` probabilities.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return F.softmax((teacher_logits - center) / temperature, dim=-1)


def _mean_or_zero(values: Tensor) -> Tensor:
    """Mean of ``values``; an empty tensor gives an exact 0 that is still attached to the autograd graph."""
    return values.mean() if values.numel() > 0 else values.sum()


def cross_view_loss(teacher_probs: Tensor, student_logits: Tensor) -> Tensor:
    """Cross-view bootstrapping: each view's teacher target supervises the student's other view.

    ``L = 1/2 [ mean_r CE(t_1r, s_2r) + mean_r CE(t_2r, s_1r) ]`` (paper eq. 5 for [CLS], eq. 6 for objects).

    Args:
        teacher_probs: ``(V, R, C)`` teacher distributions, ``V = 2``.
        student_logits: ``(V, R, C)`` tempered student logits, rows aligned with ``teacher_probs``.

    Returns:
        ``()`` the loss; exactly 0 (with a gradient path, not NaN) when ``R = 0``.
    """
    if teacher_probs.shape[0] != NUM_VIEWS or teacher_probs.shape != student_logits.shape:
        raise ValueError(
            f"teacher_probs and student_logits must both be (2, R, C), got {tuple(teacher_probs.shape)} "
            f"and {tuple(student_logits.shape)}"
        )
    # flip(0) pairs view v of the teacher with the other view of the student.
    per_row = soft_cross_entropy(teacher_probs, student_logits.flip(0))  # (V, R)
    return torch.stack([_mean_or_zero(per_row[v]) for v in range(NUM_VIEWS)]).mean()


def cross_image_loss(
    neighbour_probs: Tensor,
    student_logits: Tensor,
    cycle_mask: Tensor,
    normalization: CrossImageNormalization = "per_view",
) -> Tensor:
    """Cross-image object bootstrapping on cycle-consistent pairs (paper eq. 7-8).

    The neighbour retrieved by view-v object i (the teacher's projection of a stored view-v entry) supervises the
    student's object i of the *other* view, only where ``cycle_mask[v, i]``.

    Args:
        neighbour_probs: ``(V, n, C)`` teacher distributions of the retrieved neighbours, ``V = 2``.
        student_logits: ``(V, n, C)`` tempered student object logits.
        cycle_mask: ``(V, n)`` bool, True where the retrieval cycle closed.
        normalization: ``"per_view"`` (paper): each view's sum divided by its own count ``Z_v`` (a view without
            pairs contributes 0), then the two terms averaged. ``"view1"`` (authors, README quirk 1): both sums
            divided by the view-1 count and averaged; the whole loss is 0 when view 1 has no pair.

    Returns:
        ``()`` the loss, graph-connected to ``student_logits`` even when it is 0. Computed without host syncs.
    """
    if normalization not in CROSS_IMAGE_NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {CROSS_IMAGE_NORMALIZATIONS}, got {normalization!r}")
    if neighbour_probs.shape[0] != NUM_VIEWS or neighbour_probs.shape != student_logits.shape:
        raise ValueError(
            f"neighbour_probs and student_logits must both be (2, n, C), got {tuple(neighbour_probs.shape)} "
            f"and {tuple(student_logits.shape)}"
        )
    if cycle_mask.dtype != torch.bool or cycle_mask.shape != neighbour_probs.shape[:2]:
        raise ValueError(f"cycle_mask must be a bool (2, n) tensor, got {cycle_mask.dtype} {tuple(cycle_mask.shape)}")
    per_row = soft_cross_entropy(neighbour_probs, student_logits.flip(0))  # (V, n)
    sums = torch.where(cycle_mask, per_row, per_row.new_zeros(())).sum(dim=-1)  # (V,)
    counts = cycle_mask.sum(dim=-1)  # (V,)
    if normalization == "per_view":
        return (sums / counts.clamp(min=1)).mean()
    view1_count = counts[0]
    loss = (sums / view1_count.clamp(min=1)).mean()
    return torch.where(view1_count > 0, loss, loss * 0)


@dataclass(frozen=True)
class CenterStatistics:
    """What a step contributes to the two centres: column sums of the teacher's raw outputs and their row counts.

    Attributes:
        global_sum: ``(C,)`` column sum of the teacher's [CLS] outputs of this process.
        global_rows: number of those rows (``V*B``).
        object_sum: ``(Cc,)`` column sum of the teacher's object outputs (neighbours excluded).
        object_rows: number of those rows (``V*n``).
    """

    global_sum: Tensor
    global_rows: int
    object_sum: Tensor
    object_rows: int


class Center(nn.Module):
    """Running centre of teacher outputs (DINO's centring), a persistent buffer ``center`` of shape ``(1, C)``.

    Args:
        dim: ``C``.
        momentum: EMA momentum ``m``: ``center <- m * center + (1 - m) * batch mean``.
    """

    center: Tensor

    def __init__(self, dim: int, momentum: float = CENTER_MOMENTUM) -> None:
        super().__init__()
        if dim < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must lie in [0, 1], got {momentum}")
        self.momentum = momentum
        self.register_buffer("center", torch.zeros(1, dim))

    @torch.no_grad()
    def update(self, values: Tensor) -> None:
        """EMA of the mean over all rows of all processes; ragged row counts per process are weighted by rows.

        Args:
            values: ``(R, C)`` teacher outputs of this process; ``R`` may differ per process and may be 0. When no
                process has a row, the centre is left unchanged (the authors' code would turn it into NaN).
        """
        if values.ndim != 2 or values.shape[1] != self.center.shape[1]:
            raise ValueError(f"values must be (R, {self.center.shape[1]}), got {tuple(values.shape)}")
        values = values.detach().to(self.center.dtype)
        self.update_from_sum(values.sum(dim=0), values.shape[0])

    @torch.no_grad()
    def update_from_sum(self, column_sum: Tensor, num_rows: int) -> None:
        """:meth:`update` from this process's column sum ``(C,)`` of its ``num_rows`` rows."""
        if column_sum.shape != (self.center.shape[1],):
            raise ValueError(f"column_sum must be ({self.center.shape[1]},), got {tuple(column_sum.shape)}")
        # One collective for the row sum and the row count: [sum_1 .. sum_C, R].
        local = torch.cat([column_sum.to(self.center.dtype), column_sum.new_full((1,), float(num_rows))])
        total = all_reduce_sum(local)
        count = total[-1]
        batch_center = total[None, :-1] / count.clamp(min=1)
        updated = self.center * self.momentum + batch_center * (1 - self.momentum)
        self.center.copy_(torch.where(count > 0, updated, self.center))


class CrIBoLoss(nn.Module):
    """The three CrIBo terms with their two centres (submodules ``center`` and ``center_c``).

    State-dict keys: ``center.center`` ``(1, out_dim)`` and ``center_c.center`` ``(1, out_dim_c)``.

    Args:
        out_dim: global head output dimension.
        out_dim_c: object head output dimension.
        student_temp: student temperature of the [CLS] term (fixed 0.1 in the authors' training, quirk 4).
        student_temp_c: student temperature of both object terms.
        center_momentum: EMA momentum of the global centre.
        center_momentum_c: EMA momentum of the object centre.
        cross_image_normalization: ``"per_view"`` (paper) or ``"view1"`` (authors), see :func:`cross_image_loss`.
    """

    def __init__(
        self,
        out_dim: int,
        out_dim_c: int,
        student_temp: float = STUDENT_TEMP,
        student_temp_c: float = STUDENT_TEMP,
        center_momentum: float = CENTER_MOMENTUM,
        center_momentum_c: float = CENTER_MOMENTUM,
        cross_image_normalization: CrossImageNormalization = "per_view",
    ) -> None:
        super().__init__()
        if cross_image_normalization not in CROSS_IMAGE_NORMALIZATIONS:
            raise ValueError(
                f"cross_image_normalization must be one of {CROSS_IMAGE_NORMALIZATIONS}, "
                f"got {cross_image_normalization!r}"
            )
        if student_temp <= 0 or student_temp_c <= 0:
            raise ValueError(f"student_temp and student_temp_c must be > 0, got {student_temp}, {student_temp_c}")
        self.student_temp = student_temp
        self.student_temp_c = student_temp_c
        self.cross_image_normalization: CrossImageNormalization = cross_image_normalization
        self.center = Center(out_dim, center_momentum)
        self.center_c = Center(out_dim_c, center_momentum_c)

    def forward(
        self,
        student_global: Tensor,
        teacher_global: Tensor,
        student_objects: Tensor,
        teacher_objects: Tensor,
        teacher_neighbours: Tensor,
        cycle_mask: Tensor,
        teacher_temp: float,
        teacher_temp_c: float,
        cross_image: bool,
    ) -> dict[str, Tensor]:
        """Compute the three terms with the current centres, then update the centres.

        Args:
            student_global: ``(V*B, C)`` student head outputs on [CLS], view 1 rows then view 2.
            teacher_global: ``(V*B, C)`` teacher counterpart.
            student_objects: ``(V*n, C_c)`` student object-head outputs, view-1 rows then view-2 (aligned).
            teacher_objects: ``(V*n, C_c)`` teacher counterpart.
            teacher_neighbours: ``(V, n, C_c)`` teacher object-head outputs of the retrieved neighbours;
                ``[v, i]`` is the stored view-v entry retrieved by view-v object i.
            cycle_mask: ``(V, n)`` bool, cycle-consistent retrievals.
            teacher_temp: teacher temperature of the [CLS] term at this epoch.
            teacher_temp_c: teacher temperature of the object terms at this epoch.
            cross_image: whether the cross-image term is on (the loop turns it on from epoch 1).

        Returns:
            ``global``, ``object``, ``cross_image`` and ``loss`` (their sum) as ``()`` tensors, plus detached
            diagnostics ``num_cycle_consistent`` ``(V,)`` int64 and ``num_objects`` ``()`` int64. With ``n = 0``
            the object terms are an exact 0 with a gradient path (the authors' code gives NaN, quirk 7).
        """
        num_images, num_objects = self._check_inputs(
            student_global, teacher_global, student_objects, teacher_objects, teacher_neighbours, cycle_mask
        )
        student_views = (student_global / self.student_temp).unflatten(0, (NUM_VIEWS, num_images))
        student_object_views = (student_objects / self.student_temp_c).unflatten(0, (NUM_VIEWS, num_objects))
        with torch.no_grad():
            teacher_probs = sharpen(teacher_global.detach(), self.center.center, teacher_temp)
            teacher_object_probs = sharpen(teacher_objects.detach(), self.center_c.center, teacher_temp_c)
        global_loss = cross_view_loss(teacher_probs.unflatten(0, (NUM_VIEWS, num_images)), student_views)
        object_loss = cross_view_loss(teacher_object_probs.unflatten(0, (NUM_VIEWS, num_objects)), student_object_views)
        if cross_image:
            with torch.no_grad():
                neighbour_probs = sharpen(teacher_neighbours.detach(), self.center_c.center, teacher_temp_c)
            image_loss = cross_image_loss(
                neighbour_probs, student_object_views, cycle_mask, self.cross_image_normalization
            )
        else:
            image_loss = object_loss.new_zeros(())
        # The centres move only after all three terms used the old ones; neighbours never enter center_c.
        self.center.update(teacher_global)
        self.center_c.update(teacher_objects)
        return {
            "global": global_loss,
            "object": object_loss,
            "cross_image": image_loss,
            "loss": global_loss + object_loss + image_loss,
            "num_cycle_consistent": cycle_mask.detach().sum(dim=-1),
            "num_objects": torch.tensor(num_objects, dtype=torch.int64, device=cycle_mask.device),
        }

    @torch.no_grad()
    def update_centers(self, statistics: CenterStatistics) -> None:
        """Move both centres with a step's teacher statistics (after the step's targets used the old centres)."""
        self.center.update_from_sum(statistics.global_sum, statistics.global_rows)
        self.center_c.update_from_sum(statistics.object_sum, statistics.object_rows)

    def _check_inputs(
        self,
        student_global: Tensor,
        teacher_global: Tensor,
        student_objects: Tensor,
        teacher_objects: Tensor,
        teacher_neighbours: Tensor,
        cycle_mask: Tensor,
    ) -> tuple[int, int]:
        """Validate the shapes given to :meth:`forward`; return ``(B, n)``."""
        if student_global.ndim != 2 or student_global.shape != teacher_global.shape or student_global.shape[0] % 2:
            raise ValueError(
                "student_global and teacher_global must both be (2B, C), got "
                f"{tuple(student_global.shape)} and {tuple(teacher_global.shape)}"
            )
        if student_objects.ndim != 2 or student_objects.shape != teacher_objects.shape or student_objects.shape[0] % 2:
            raise ValueError(
                "student_objects and teacher_objects must both be (2n, C_c), got "
                f"{tuple(student_objects.shape)} and {tuple(teacher_objects.shape)}"
            )
        num_objects = student_objects.shape[0] // NUM_VIEWS
        expected = (NUM_VIEWS, num_objects, student_objects.shape[1])
        if tuple(teacher_neighbours.shape) != expected:
            raise ValueError(f"teacher_neighbours must have shape {expected}, got {tuple(teacher_neighbours.shape)}")
        if cycle_mask.dtype != torch.bool or tuple(cycle_mask.shape) != expected[:2]:
            raise ValueError(
                f"cycle_mask must be bool of shape {expected[:2]}, got {cycle_mask.dtype} {tuple(cycle_mask.shape)}"
            )
        for name, rows, center in (
            ("student_global", student_global, self.center),
            ("student_objects", student_objects, self.center_c),
        ):
            if rows.shape[1] != center.center.shape[1]:
                raise ValueError(f"{name} must have {center.center.shape[1]} columns, got {rows.shape[1]}")
        return student_global.shape[0] // NUM_VIEWS, num_objects

    @torch.no_grad()
    def load_authors_centers(self, dino_loss: Mapping[str, Tensor]) -> None:
        """Load the authors' checkpoint entry ``dino_loss = {"center": (1, C), "center_c": (1, C_c)}``."""
        for key, target in (("center", self.center), ("center_c", self.center_c)):
            if key not in dino_loss:
                raise ValueError(f"dino_loss must hold keys 'center' and 'center_c', got {sorted(dino_loss)}")
            value = dino_loss[key]
            if value.shape != target.center.shape:
                raise ValueError(
                    f"dino_loss[{key!r}] must have shape {tuple(target.center.shape)}, got {tuple(value.shape)}"
                )
            target.center.copy_(value)

    def authors_centers(self) -> dict[str, Tensor]:
        """The centres in the authors' checkpoint layout ``{"center", "center_c"}`` (cloned)."""
        return {"center": self.center.center.detach().clone(), "center_c": self.center_c.center.detach().clone()}
