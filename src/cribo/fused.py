"""Weight-normalised last layer fused with soft-target cross-entropy, computed in column blocks.

CrIBo's heads end in a weight-normalised linear layer to ``C = 65 536`` outputs, and every loss term is a
cross-entropy between a sharpened teacher distribution and the student's tempered softmax over those outputs. Done
the plain way, each step materialises several ``(R, C)`` float tensors per term (logits, log-softmax, flipped
copies, products, their gradients, the normalised weight and its gradient), each over 100 MB at the paper's sizes;
on a CPU every one of them is a fresh ``mmap`` that is page-faulted in and unmapped again, which costs more than
the arithmetic. This module computes the same values with no ``(R, C)`` tensor but the teacher's targets and,
when they fit a budget, the student's logits:

* :func:`teacher_targets` writes the teacher's sharpened distribution straight into its target buffer and returns
  the column sums of the raw logits (for the centre update);
* :func:`soft_cross_entropy_terms` (a custom autograd function) computes ``sum_j w_j CE(p_j, s_{r_j})`` for any
  number of targets. The forward sweeps the outputs in column blocks, keeping a running log-sum-exp per row (as
  in online softmax) and the dot products with the targets, and keeps the logits when they take at most
  :data:`STORE_LOGITS_BYTES`; the backward takes each block of logits (kept, or recomputed when they were too
  large to keep) and turns it into that block of the gradient, ``w_j (sum(p_j) softmax(s_{r_j}) - p_j)``, then
  into the gradients of the features and of the layer, with the weight-norm backward applied analytically: the
  normalised weight is never formed.

Column blocks keep every product a wide GEMM over all rows (about 170 GFLOP/s on 2 cores, against 65 for the
32-row chunks a row-wise softmax would need) and every temporary small enough for malloc to reuse.

On top of these, one training step's pieces: :class:`TargetBuilder` computes the step's three teacher targets
(:class:`StepTargets`) in a workspace it owns and reuses, and returns the centre statistics for the caller to
apply; :func:`student_terms` computes the three student terms from them.

The logits are ``s = scale * (h @ v.T) * g / ||v||_row``: ``h`` the L2-normalised bottleneck features, ``v`` and
``g`` the layer's ``weight_v`` and ``weight_g`` (:class:`cribo.models.WeightNormLinear`), ``scale`` the inverse
temperature. :mod:`cribo.losses` keeps the plain formulation on logits (checked against the authors' fixtures);
the tests check that this module gives the same values and gradients.

Axis letters: R student rows, J entries of one target, C outputs, d bottleneck width, V = 2 views, B images,
n objects per view.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from cribo.losses import NUM_VIEWS, CenterStatistics
from cribo.matching import CrossImageEntries

# One block of float32 logits (all rows x some columns). On a CPU small enough to stay in cache and be reused by
# malloc (no fresh mmap and page faults); on an accelerator larger, to launch fewer kernels.
BLOCK_BYTES = {"cpu": 2 * 2**20}
ACCELERATOR_BLOCK_BYTES = 256 * 2**20
MIN_BLOCK_COLUMNS = 16
# The student's (R, C) float32 logits are kept from the forward for the backward when they fit in this many bytes
# (one matrix product fewer: a quarter of the fused student work), and recomputed block by block when larger.
STORE_LOGITS_BYTES = 512 * 2**20
WORKSPACE_HEADROOM = 1.25  # the targets' workspace grows by this factor, so that a slightly larger step fits


def default_block_bytes(device: torch.device) -> int:
    """Block size used when none is given: 2 MiB on CPU, 256 MiB on an accelerator."""
    return BLOCK_BYTES.get(device.type, ACCELERATOR_BLOCK_BYTES)


def column_blocks(num_rows: int, num_columns: int, block_bytes: int, dim: int = 1) -> Iterator[slice]:
    """Consecutive column slices such that a ``(max(num_rows, dim), width)`` float32 block (a block of logits, or
    of the ``(width, dim)`` weight gradient) stays within ``block_bytes``; at least :data:`MIN_BLOCK_COLUMNS`
    columns wide."""
    width = max(MIN_BLOCK_COLUMNS, block_bytes // (4 * max(num_rows, dim, 1)))
    for first in range(0, num_columns, width):
        yield slice(first, min(first + width, num_columns))


def _no_autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """Disable autocast inside the fused code (it casts explicitly, and keeps softmax work in float32)."""
    if torch.is_autocast_enabled(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def column_scale(weight_v: Tensor, weight_g: Tensor, scale: float = 1.0) -> tuple[Tensor, Tensor]:
    """Per-output factor of the weight-normalised layer.

    Args:
        weight_v: ``(C, d)`` direction parameter.
        weight_g: ``(C, 1)`` gain parameter.
        scale: extra factor (an inverse temperature).

    Returns:
        ``(C,)`` ``scale * g / ||v||_row`` (float32) and ``(C,)`` the row norms ``||v||`` (float32).
    """
    norms = torch.linalg.vector_norm(weight_v.detach().float(), dim=1)
    return weight_g.detach().float().view(-1) / norms * scale, norms


def _factor_on_weight(left: Tensor) -> bool:
    """Whether a product ``left @ (factor * weight block)`` should scale the ``(width, d)`` weight block rather than
    the ``(R, width)`` side: the smaller one, so when ``R > d``."""
    return left.shape[0] > left.shape[1]


def _scaled_rows(weight: Tensor, factor: Tensor, cols: slice, dtype: torch.dtype) -> Tensor:
    """``(width, d)`` rows ``cols`` of ``weight``, each times its ``factor``, in ``dtype``."""
    return (weight[cols].float() * factor[cols, None]).to(dtype)


def _block_logits(features: Tensor, weight: Tensor, factor: Tensor, cols: slice, out: Tensor | None = None) -> Tensor:
    """``(R, d)`` features (in the compute dtype) -> ``(R, width)`` float32 logits ``h @ v[cols].T * factor[cols]``
    of the columns ``cols``, written into ``out`` (a float32 ``(R, width)`` view) when given."""
    on_weight = _factor_on_weight(features)
    block = _scaled_rows(weight, factor, cols, features.dtype) if on_weight else weight[cols]
    if features.dtype == torch.float32:
        logits = torch.mm(features, block.t(), out=out)
    else:
        product = torch.mm(features, block.t())
        logits = out.copy_(product) if out is not None else product.float()
    return logits if on_weight else logits.mul_(factor[cols])


@torch.no_grad()
def teacher_targets(
    features: Tensor,
    weight_v: Tensor,
    weight_g: Tensor,
    center: Tensor,
    temperature: float,
    *,
    compute_dtype: torch.dtype = torch.float32,
    column_sums: bool = False,
    block_bytes: int | None = None,
    out: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Sharpened, centred teacher distribution ``softmax((h W^T - center) / temperature)`` without logits.

    Args:
        features: ``(J, d)`` teacher bottleneck features (L2-normalised rows).
        weight_v: ``(C, d)`` the teacher layer's ``weight_v``.
        weight_g: ``(C, 1)`` its ``weight_g``.
        center: ``(1, C)`` running centre.
        temperature: teacher temperature (> 0).
        compute_dtype: dtype of the matrix product (``bfloat16`` under mixed precision); softmax is float32.
        column_sums: also return the column sums of the raw logits ``h W^T`` (the centre's batch statistic).
        block_bytes: size of one block of logits (default :func:`default_block_bytes`).
        out: optional contiguous ``(J, C)`` float32 buffer to write the probabilities into.

    Returns:
        ``(J, C)`` float32 probabilities (``out`` when given) and ``(C,)`` column sums or ``None``.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    num_rows, num_columns = features.shape[0], weight_v.shape[0]
    device = features.device
    if out is not None and (
        out.shape != (num_rows, num_columns) or out.dtype != torch.float32 or not out.is_contiguous()
    ):
        raise ValueError(f"out must be a contiguous float32 ({num_rows}, {num_columns}) tensor, got {tuple(out.shape)}")
    probs = out if out is not None else torch.empty(num_rows, num_columns, device=device, dtype=torch.float32)
    sums = torch.zeros(num_columns, device=device, dtype=torch.float32) if column_sums else None
    block_bytes = block_bytes or default_block_bytes(device)
    with _no_autocast(device):
        factor, _ = column_scale(weight_v, weight_g, 1.0 / temperature)
        weight, h = weight_v.detach().to(compute_dtype), features.detach().to(compute_dtype)
        center = center.reshape(-1).float()
        shift = center / temperature
        row_max = torch.full((num_rows,), -torch.inf, device=device)
        for cols in column_blocks(num_rows, num_columns, block_bytes):
            # The sharpened logits (s - center) / T go straight into their place in probs.
            block = _block_logits(h, weight, factor, cols, out=probs[:, cols]).sub_(shift[cols])
            if sums is not None:  # sum over rows of s = T * sum of the block + J * center
                sums[cols] = block.sum(dim=0).mul_(temperature).add_(center[cols], alpha=num_rows)
            torch.maximum(row_max, block.amax(dim=1), out=row_max)
        step = max(1, block_bytes // (4 * max(num_columns, 1)))
        for first in range(0, num_rows, step):  # softmax rows, a cache-sized chunk at a time
            rows = probs[first : first + step]
            rows.sub_(row_max[first : first + step, None]).exp_()
            rows.div_(rows.sum(dim=1, keepdim=True))
    return probs, sums


@dataclass
class SoftTarget:
    """One term's targets: entry ``j`` asks student row ``rows[j]`` to match ``probs[j]`` with weight ``weights[j]``.

    Attributes:
        probs: ``(J, C)`` float32 target distributions.
        rows: ``(J,)`` int64 student rows, in ascending order.
        weights: ``(J,)`` float32 weight of each entry's cross-entropy in the term.
    """

    probs: Tensor
    rows: Tensor
    weights: Tensor

    def __post_init__(self) -> None:
        count = self.probs.shape[0]
        if self.probs.ndim != 2 or self.rows.shape != (count,) or self.weights.shape != (count,):
            raise ValueError(
                f"SoftTarget needs probs (J, C), rows (J,), weights (J,); got {tuple(self.probs.shape)}, "
                f"{tuple(self.rows.shape)}, {tuple(self.weights.shape)}"
            )
        if count > 1 and bool((self.rows[1:] < self.rows[:-1]).any()):
            raise ValueError("SoftTarget.rows must be in ascending order")


def _is_identity(rows: Tensor, num_rows: int) -> bool:
    """Whether the entries are exactly the rows ``0 .. num_rows - 1`` in order."""
    return rows.shape[0] == num_rows and (num_rows == 0 or rows.tolist() == list(range(num_rows)))


class _SoftCrossEntropyTerms(torch.autograd.Function):
    """Autograd function behind :func:`soft_cross_entropy_terms` (see the module docstring for the maths)."""

    @staticmethod
    def forward(
        ctx: Any,
        features: Tensor,
        weight_v: Tensor,
        weight_g: Tensor,
        scale: float,
        targets: Sequence[SoftTarget],
        compute_dtype: torch.dtype,
        block_bytes: int,
        store_bytes: int,
    ) -> Tensor:
        num_rows, num_columns = features.shape[0], weight_v.shape[0]
        device = features.device
        stored = (
            torch.empty(num_rows, num_columns, device=device) if 4 * num_rows * num_columns <= store_bytes else None
        )
        factor, norms = column_scale(weight_v, weight_g, scale)
        weight, h = weight_v.detach().to(compute_dtype), features.detach().to(compute_dtype)
        identity = [_is_identity(t.rows, num_rows) for t in targets]
        masses = [t.probs.sum(dim=1) for t in targets]
        dots = [torch.zeros(t.rows.shape[0], device=device) for t in targets]
        row_max = torch.full((num_rows,), -torch.inf, device=device)
        row_sum = torch.zeros(num_rows, device=device)
        for cols in column_blocks(num_rows, num_columns, block_bytes):
            logits = _block_logits(h, weight, factor, cols, out=None if stored is None else stored[:, cols])
            for target, dot, same in zip(targets, dots, identity, strict=True):
                if target.rows.numel():
                    picked = logits if same else logits[target.rows]
                    dot += (target.probs[:, cols] * picked).sum(dim=1)
            # Running log-sum-exp: rescale the sum kept so far to the new row maximum (kept logits stay intact).
            new_max = torch.maximum(row_max, logits.amax(dim=1))
            shifted = logits.sub_(new_max[:, None]) if stored is None else logits - new_max[:, None]
            row_sum.mul_((row_max - new_max).exp_()).add_(shifted.exp_().sum(dim=1))
            row_max = new_max
        lse = row_max + row_sum.log()
        losses = (
            torch.stack(
                [
                    (t.weights * (lse[t.rows] * mass - dot)).sum()
                    for t, mass, dot in zip(targets, masses, dots, strict=True)
                ]
            )
            if targets
            else torch.zeros(0, device=device)
        )
        ctx.targets, ctx.masses, ctx.identity = targets, masses, identity
        ctx.compute_dtype, ctx.scale, ctx.block_bytes = compute_dtype, scale, block_bytes
        ctx.stored = stored
        ctx.save_for_backward(features, weight_v, weight_g, factor, norms, lse)
        return losses

    @staticmethod
    def backward(ctx: Any, grad_losses: Tensor) -> tuple[Tensor | None, ...]:
        features, weight_v, weight_g, factor, norms, lse = ctx.saved_tensors
        num_rows, dim = features.shape
        num_columns = weight_v.shape[0]
        compute, device = ctx.compute_dtype, features.device
        # dL/ds_r = coefficient_r softmax(s_r) - sum over entries j of row r of gamma w_j p_j.
        coefficient = torch.zeros(num_rows, device=device)
        entries = []
        for target, mass, same, gamma in zip(ctx.targets, ctx.masses, ctx.identity, grad_losses.tolist(), strict=True):
            if gamma != 0.0 and target.rows.numel():
                coefficient.index_add_(0, target.rows, gamma * target.weights * mass)
                entries.append((target, (-gamma * target.weights).unsqueeze(1), same))
        weight, h = weight_v.detach().to(compute), features.detach().to(compute)
        gain = weight_g.detach().float().view(-1)
        grad_features = torch.zeros(num_rows, dim, device=device, dtype=torch.float32)
        # With entries every column block below writes its rows of grad_v and grad_g; without, they stay zero.
        fresh = torch.empty if entries else torch.zeros
        grad_v = fresh(num_columns, dim, device=device) if ctx.needs_input_grad[1] else None
        grad_g = fresh(num_columns, device=device) if ctx.needs_input_grad[2] else None
        with _no_autocast(device):
            for cols in column_blocks(num_rows, num_columns if entries else 0, ctx.block_bytes, dim):
                if ctx.stored is None:
                    grad = _block_logits(h, weight, factor, cols).sub_(lse[:, None])
                else:
                    grad = ctx.stored[:, cols] - lse[:, None]
                grad.exp_().mul_(coefficient[:, None])
                for target, negative, same in entries:
                    if same:
                        grad.addcmul_(target.probs[:, cols], negative)
                    else:
                        grad.index_add_(0, target.rows, target.probs[:, cols] * negative)
                # s = scale * h @ W.T with W = g v / ||v||: dL/dW = scale * G.T h; dL/dh = (G * factor) @ v.
                grad_w = torch.mm(grad.t().to(compute), h).float().mul_(ctx.scale)
                if _factor_on_weight(h):
                    grad_features += torch.mm(grad.to(compute), _scaled_rows(weight, factor, cols, compute)).float()
                else:
                    grad_features += torch.mm(grad.mul_(factor[cols]).to(compute), weight[cols]).float()
                # Weight norm: dL/dg = M . v_hat; dL/dv = g / ||v|| (M - (M . v_hat) v_hat).
                v, norm, g = weight_v.detach()[cols].float(), norms[cols], gain[cols]
                along = (grad_w * v).sum(dim=1) / norm
                if grad_g is not None:
                    grad_g[cols] = along
                if grad_v is not None:
                    grad_v[cols] = grad_w.mul_((g / norm).unsqueeze(1)).addcmul_(
                        v, (-g * along / norm.square()).unsqueeze(1)
                    )
        return (
            grad_features.to(features.dtype) if ctx.needs_input_grad[0] else None,
            grad_v.to(weight_v.dtype) if grad_v is not None else None,
            grad_g.view(-1, 1).to(weight_g.dtype) if grad_g is not None else None,
            None,
            None,
            None,
            None,
            None,
        )


def soft_cross_entropy_terms(
    features: Tensor,
    weight_v: Tensor,
    weight_g: Tensor,
    scale: float,
    targets: Sequence[SoftTarget],
    *,
    compute_dtype: torch.dtype = torch.float32,
    block_bytes: int | None = None,
    store_bytes: int = STORE_LOGITS_BYTES,
) -> Tensor:
    """Weighted soft cross-entropies through a weight-normalised linear layer, one value per target.

    ``out[t] = sum_j w_tj * ( -sum_c p_tjc log softmax(s_{r_tj})_c )`` with student logits
    ``s = scale * features @ (g v / ||v||).T`` computed block by block; kept for the backward when the ``(R, C)``
    float32 logits take at most ``store_bytes``, recomputed there block by block otherwise.

    Args:
        features: ``(R, d)`` student bottleneck features (differentiable).
        weight_v: ``(C, d)`` the student layer's ``weight_v`` (differentiable).
        weight_g: ``(C, 1)`` its ``weight_g`` (differentiable or frozen).
        scale: inverse student temperature.
        targets: the terms (read only).
        compute_dtype: dtype of the matrix products (``bfloat16`` under mixed precision); softmax is float32.
        block_bytes: size of one block of logits (default :func:`default_block_bytes`).
        store_bytes: largest ``(R, C)`` float32 logits kept between forward and backward (0: always recompute).

    Returns:
        ``(T,)`` float32, differentiable with respect to ``features``, ``weight_v`` and ``weight_g``. A target
        without entries gives an exact 0.
    """
    if features.ndim != 2 or weight_v.ndim != 2 or features.shape[1] != weight_v.shape[1]:
        raise ValueError(
            f"features (R, d) and weight_v (C, d) must share d, got {tuple(features.shape)} and {tuple(weight_v.shape)}"
        )
    if weight_g.shape != (weight_v.shape[0], 1):
        raise ValueError(f"weight_g must have shape {(weight_v.shape[0], 1)}, got {tuple(weight_g.shape)}")
    for target in targets:
        if target.probs.shape[1] != weight_v.shape[0]:
            raise ValueError(f"target probs must have {weight_v.shape[0]} columns, got {target.probs.shape[1]}")
        if target.rows.numel() and (int(target.rows[0]) < 0 or int(target.rows[-1]) >= features.shape[0]):
            raise ValueError(f"target rows must lie in [0, {features.shape[0]})")
    with _no_autocast(features.device):
        out: Tensor = _SoftCrossEntropyTerms.apply(
            features,
            weight_v,
            weight_g,
            scale,
            tuple(targets),
            compute_dtype,
            block_bytes or default_block_bytes(features.device),
            store_bytes,
        )
    return out


# ----------------------------------------------------------------------------------------------------------------
# One step's targets and terms


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
    last_layers: tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]],
    targets: StepTargets,
    temperatures: tuple[float, float],
    compute_dtype: torch.dtype = torch.float32,
) -> dict[str, Tensor]:
    """The three terms from the student's bottleneck features, through the fused last layers.

    Equal to :meth:`cribo.losses.CrIBoLoss.forward` on the logits ``last_layer(features)`` (tested), without
    forming them.

    Args:
        global_features: ``(V*B, d)`` student [CLS] bottleneck features, view-major.
        object_features: ``(V*n, d)`` student object bottleneck features, view-major.
        last_layers: ``(weight_v, weight_g)`` of the student's global and object last layers.
        targets: from :class:`TargetBuilder`.
        temperatures: student temperatures of the [CLS] term and of the object terms.
        compute_dtype: dtype of the last layers' matrix products.

    Returns:
        ``global``, ``object`` and ``cross_image`` ``()`` tensors.
    """
    (last_layer, last_layer_c), (student_temp, student_temp_c) = last_layers, temperatures
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


@dataclass(frozen=True)
class TeacherFeatures:
    """The teacher's head bottleneck features of one step (L2-normalised rows), view-major.

    Attributes:
        global_: ``(V*B, d)`` of the [CLS] tokens.
        objects: ``(V*n, d)`` of the objects.
        neighbours: ``(J, d)`` of the retrieved neighbours the cross-image entries use (``J = 0`` when the term is
            off).
    """

    global_: Tensor
    objects: Tensor
    neighbours: Tensor


class TargetBuilder:
    """Builds one step's teacher targets through the fused last layers, in a workspace it owns.

    The targets are over 100 MB a step at the paper's sizes; one allocation reused between steps spares the CPU a
    fresh ``mmap`` and its page faults at every step. The workspace grows (with 25 % headroom) when a step has
    more objects than any before, and is never saved. The targets returned by a call are views into it: use them
    (the student's forward and backward) before the next call.
    """

    def __init__(self) -> None:
        self._workspace: Tensor | None = None

    @torch.no_grad()
    def __call__(
        self,
        features: TeacherFeatures,
        last_layers: tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]],
        centers: tuple[Tensor, Tensor],
        temperatures: tuple[float, float],
        entries: CrossImageEntries,
        compute_dtype: torch.dtype = torch.float32,
    ) -> tuple[StepTargets, CenterStatistics]:
        """The three targets and the statistics the centres move with (the caller moves them, after this step).

        Same targets and centre statistics as :meth:`cribo.losses.CrIBoLoss.forward` (tested), without forming the
        teacher's logits.

        Args:
            features: the teacher's bottleneck features.
            last_layers: ``(weight_v, weight_g)`` of the teacher's global and object last layers.
            centers: the current ``(1, C)`` global and ``(1, Cc)`` object centres.
            temperatures: teacher temperatures of the [CLS] and of the object terms.
            entries: the cross-image entries ``features.neighbours`` belong to (none used when it has no row).
            compute_dtype: dtype of the matrix products.
        """
        (layer, layer_c), (center, center_c), (temp, temp_c) = last_layers, centers, temperatures
        inputs = (  # features in student-row order, last layer, centre, temperature, centre statistic wanted
            (flip_views(features.global_), layer, center, temp, True),
            (flip_views(features.objects), layer_c, center_c, temp_c, True),
            (features.neighbours, layer_c, center_c, temp_c, False),
        )
        shapes = [(x.shape[0], c.shape[1]) for x, _, c, _, _ in inputs]
        buffers = self._buffers(shapes, features.global_.device)
        (global_probs, global_sum), (object_probs, object_sum), (neighbour_probs, _) = (
            teacher_targets(x, *weights, c, t, compute_dtype=compute_dtype, column_sums=sums, out=out)
            for (x, weights, c, t, sums), out in zip(inputs, buffers, strict=True)
        )
        rows, weights = entries.rows, entries.weights
        if rows.shape[0] != features.neighbours.shape[0]:
            if features.neighbours.shape[0]:
                raise ValueError(
                    f"features.neighbours must have one row per cross-image entry ({rows.shape[0]}) or none, "
                    f"got {features.neighbours.shape[0]}"
                )
            rows, weights = rows[:0], weights[:0]
        assert global_sum is not None and object_sum is not None
        targets = StepTargets(
            global_=cross_view_target(global_probs),
            objects=cross_view_target(object_probs),
            neighbours=SoftTarget(neighbour_probs, rows, weights.to(neighbour_probs.device)),
        )
        # Neighbours never enter the object centre (authors' CrIBoLoss).
        statistics = CenterStatistics(global_sum, features.global_.shape[0], object_sum, features.objects.shape[0])
        return targets, statistics

    def _buffers(self, shapes: list[tuple[int, int]], device: torch.device) -> list[Tensor]:
        """Views of the workspace for targets of the given ``(rows, columns)`` shapes."""
        sizes = [rows * columns for rows, columns in shapes]
        workspace = self._workspace
        if workspace is None or workspace.numel() < sum(sizes) or workspace.device != device:
            self._workspace = workspace = torch.empty(int(sum(sizes) * WORKSPACE_HEADROOM) + 1, device=device)
        views, offset = [], 0
        for (rows, columns), size in zip(shapes, sizes, strict=True):
            views.append(workspace[offset : offset + size].view(rows, columns))
            offset += size
        return views
