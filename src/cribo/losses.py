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
from cribo.fused import SoftTarget, soft_cross_entropy_terms, teacher_targets

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


def cross_image_entries(cycle_mask: Tensor, normalization: CrossImageNormalization) -> tuple[Tensor, Tensor, Tensor]:
    """The cross-image term as a list of entries, in the order of the student rows they supervise.

    The neighbour retrieved by view-v object i supervises student row ``(1 - v) * n + i`` where ``cycle_mask[v, i]``
    (the row layout of :func:`cross_image_loss`); the weights reproduce its normalisation exactly.

    Args:
        cycle_mask: ``(V, n)`` bool.
        normalization: ``"per_view"`` (entry of view v weighs ``1 / (2 Z_v)``) or ``"view1"`` (every entry weighs
            ``1 / (2 Z_1)``, and 0 when ``Z_1 = 0``).

    Returns:
        ``(J,)`` int64 flat neighbour index ``v * n + i``, ``(J,)`` int64 student row (ascending), ``(J,)`` float32
        weights; ``J`` is the number of cycle-consistent retrievals.
    """
    if normalization not in CROSS_IMAGE_NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {CROSS_IMAGE_NORMALIZATIONS}, got {normalization!r}")
    if cycle_mask.dtype != torch.bool or cycle_mask.ndim != 2 or cycle_mask.shape[0] != NUM_VIEWS:
        raise ValueError(f"cycle_mask must be a bool (2, n) tensor, got {cycle_mask.dtype} {tuple(cycle_mask.shape)}")
    n = cycle_mask.shape[1]
    counts = cycle_mask.sum(dim=1).float()  # (V,)
    if normalization == "per_view":
        view_weight = 1.0 / (NUM_VIEWS * counts.clamp(min=1))
    else:
        view_weight = torch.where(counts[0] > 0, 1.0 / (NUM_VIEWS * counts[0].clamp(min=1)), 0.0).expand(NUM_VIEWS)
    order, rows, weights = [], [], []
    for student_view in range(NUM_VIEWS):  # student view 0 is supervised by view-1 neighbours and vice versa
        source = NUM_VIEWS - 1 - student_view
        index = cycle_mask[source].nonzero().view(-1)
        order.append(source * n + index)
        rows.append(student_view * n + index)
        weights.append(view_weight[source].expand(index.shape[0]))
    return torch.cat(order), torch.cat(rows), torch.cat(weights).float()


def flip_views(rows: Tensor) -> Tensor:
    """``(V*R, ...)`` view-major rows -> the same rows with the two views swapped (row j becomes the other view's j)."""
    return rows.unflatten(0, (NUM_VIEWS, -1)).flip(0).flatten(0, 1)


@dataclass
class StepTargets:
    """The teacher's targets of one step for :func:`student_terms`.

    ``global_`` and ``objects`` hold one entry per student row (the other view's teacher distribution, weight
    ``1 / (2R)``); ``neighbours`` one entry per cycle-consistent retrieval (none when the term is off).
    """

    global_: SoftTarget
    objects: SoftTarget
    neighbours: SoftTarget


def cross_view_target(probs: Tensor) -> SoftTarget:
    """:class:`SoftTarget` of the cross-view term from ``(V*R, C)`` targets already in student-row order."""
    count = probs.shape[0]
    rows = torch.arange(count, device=probs.device)
    return SoftTarget(probs, rows, torch.full((count,), 1.0 / max(count, 1), device=probs.device))


def student_terms(
    global_features: Tensor,
    object_features: Tensor,
    last_layer: tuple[Tensor, Tensor],
    last_layer_c: tuple[Tensor, Tensor],
    targets: StepTargets,
    student_temp: float,
    student_temp_c: float,
    compute_dtype: torch.dtype = torch.float32,
) -> dict[str, Tensor]:
    """The three terms from the student's bottleneck features, through the fused last layers (:mod:`cribo.fused`).

    Equal to :meth:`CrIBoLoss.forward` on the logits ``last_layer(features)`` (tested), without forming them.

    Args:
        global_features: ``(V*B, d)`` student [CLS] bottleneck features, view-major.
        object_features: ``(V*n, d)`` student object bottleneck features, view-major.
        last_layer: ``(weight_v, weight_g)`` of the student's global last layer.
        last_layer_c: ``(weight_v, weight_g)`` of its object last layer.
        targets: from :meth:`CrIBoLoss.targets`.
        student_temp: student temperature of the [CLS] term.
        student_temp_c: student temperature of the object terms.
        compute_dtype: dtype of the last layers' matrix products.

    Returns:
        ``global``, ``object`` and ``cross_image`` ``()`` tensors.
    """
    (global_loss,) = soft_cross_entropy_terms(
        global_features, *last_layer, 1.0 / student_temp, [targets.global_], compute_dtype=compute_dtype
    )
    object_loss, image_loss = soft_cross_entropy_terms(
        object_features,
        *last_layer_c,
        1.0 / student_temp_c,
        [targets.objects, targets.neighbours],
        compute_dtype=compute_dtype,
    )
    return {"global": global_loss, "object": object_loss, "cross_image": image_loss}


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
        self._workspace: Tensor | None = None  # target buffers reused between steps (see _target_buffers)

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
    def targets(
        self,
        global_features: Tensor,
        object_features: Tensor,
        neighbour_features: Tensor,
        cycle_mask: Tensor,
        last_layer: tuple[Tensor, Tensor],
        last_layer_c: tuple[Tensor, Tensor],
        teacher_temp: float,
        teacher_temp_c: float,
        compute_dtype: torch.dtype = torch.float32,
    ) -> StepTargets:
        """The teacher's side of the three terms from its bottleneck features, then the centre updates.

        Same targets and centre updates as :meth:`forward` (tested), computed by :func:`cribo.fused.teacher_targets`
        without forming the teacher's logits. The targets live in a workspace that the next call overwrites: use
        them (the student's forward and backward) before calling again.

        Args:
            global_features: ``(V*B, d)`` teacher [CLS] bottleneck features, view-major.
            object_features: ``(V*n, d)`` teacher object bottleneck features, view-major.
            neighbour_features: ``(J, d)`` bottleneck features of the retrieved neighbours listed by
                :func:`cross_image_entries` (``J = 0`` when the cross-image term is off).
            cycle_mask: ``(V, n)`` bool, the retrievals the entries came from.
            last_layer: ``(weight_v, weight_g)`` of the teacher's global last layer.
            last_layer_c: ``(weight_v, weight_g)`` of its object last layer.
            teacher_temp: teacher temperature of the [CLS] term.
            teacher_temp_c: teacher temperature of the object terms.
            compute_dtype: dtype of the matrix products.
        """
        inputs = (  # features in student-row order, last layer, centre, temperature, centre statistic wanted
            (flip_views(global_features), last_layer, self.center.center, teacher_temp, True),
            (flip_views(object_features), last_layer_c, self.center_c.center, teacher_temp_c, True),
            (neighbour_features, last_layer_c, self.center_c.center, teacher_temp_c, False),
        )
        shapes = [(x.shape[0], center.shape[1]) for x, _, center, _, _ in inputs]
        buffers = self._target_buffers(shapes, global_features.device)
        (global_probs, global_sum), (object_probs, object_sum), (neighbour_probs, _) = (
            teacher_targets(x, *layer, center, t, compute_dtype=compute_dtype, column_sums=sums, out=out)
            for (x, layer, center, t, sums), out in zip(inputs, buffers, strict=True)
        )
        _, rows, weights = cross_image_entries(cycle_mask, self.cross_image_normalization)
        if rows.shape[0] != neighbour_features.shape[0]:
            if neighbour_features.shape[0]:
                raise ValueError(
                    f"neighbour_features must have one row per cycle-consistent retrieval ({rows.shape[0]}) or none, "
                    f"got {neighbour_features.shape[0]}"
                )
            rows, weights = rows[:0], weights[:0]
        assert global_sum is not None and object_sum is not None
        # The centres move only after all three targets used the old ones; neighbours never enter center_c.
        self.center.update_from_sum(global_sum, global_features.shape[0])
        self.center_c.update_from_sum(object_sum, object_features.shape[0])
        return StepTargets(
            global_=cross_view_target(global_probs),
            objects=cross_view_target(object_probs),
            neighbours=SoftTarget(neighbour_probs, rows, weights.to(neighbour_probs.device)),
        )

    def _target_buffers(self, shapes: list[tuple[int, int]], device: torch.device) -> list[Tensor]:
        """Views of one workspace kept between steps for the targets of :meth:`targets`.

        The targets are over 100 MB a step at the paper's sizes; reusing one allocation spares the CPU a fresh
        ``mmap`` and its page faults at every step. The workspace grows (with 25 % headroom) when a step has more
        objects than any before, and is not part of the state dict.
        """
        sizes = [rows * columns for rows, columns in shapes]
        workspace = self._workspace
        if workspace is None or workspace.numel() < sum(sizes) or workspace.device != device:
            self._workspace = workspace = torch.empty(int(sum(sizes) * 1.25) + 1, device=device)
        views, offset = [], 0
        for (rows, columns), size in zip(shapes, sizes, strict=True):
            views.append(workspace[offset : offset + size].view(rows, columns))
            offset += size
        return views

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
