"""Weight-normalised last layer fused with soft-target cross-entropy, computed in row chunks.

CrIBo's heads end in a weight-normalised linear layer to ``C = 65 536`` outputs, and every loss term is a
cross-entropy between a sharpened teacher distribution and the student's tempered softmax over those outputs. Done
the plain way, each step materialises several ``(R, C)`` float tensors per term (logits, log-softmax, flipped
copies, products, their gradients, the normalised weight and its gradient), each over 100 MB at the paper's sizes;
on a CPU every one of them is a fresh ``mmap`` that is page-faulted in and unmapped again, which costs more than
the arithmetic. This module computes the same values with at most one ``(R, C)`` buffer per target:

* :func:`teacher_targets` writes the teacher's sharpened distribution straight into its target buffer, chunk by
  chunk, and returns the column sums of the raw logits (for the centre update);
* :func:`soft_cross_entropy_terms` (a custom autograd function) computes ``sum_j w_j CE(p_j, s_{r_j})`` for any
  number of targets. Its forward overwrites each target buffer with that target's gradient with respect to the
  logits, ``w_j (sum(p_j) softmax(s_{r_j}) - p_j)``, so the backward needs neither the logits nor a recomputation;
  the weight-norm backward is applied analytically in place, and the normalised weight is never formed.

The logits are ``s = scale * (h @ v.T) * g / ||v||_row``: ``h`` the L2-normalised bottleneck features, ``v`` and
``g`` the layer's ``weight_v`` and ``weight_g`` (:class:`cribo.models.WeightNormLinear`), ``scale`` the inverse
temperature. :mod:`cribo.losses` keeps the plain formulation on logits (checked against the authors' fixtures);
the tests check that this module gives the same values and gradients.

Axis letters: R student rows, J entries of one target, C outputs, d bottleneck width.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

# One chunk of float32 logits. On a CPU small enough for malloc to reuse it (no fresh mmap and page faults) and
# large enough for an efficient GEMM; on an accelerator larger, to launch fewer kernels.
CHUNK_BYTES = {"cpu": 8 * 2**20}
ACCELERATOR_CHUNK_BYTES = 256 * 2**20


def default_chunk_bytes(device: torch.device) -> int:
    """Chunk size used when none is given: 8 MiB on CPU, 256 MiB on an accelerator."""
    return CHUNK_BYTES.get(device.type, ACCELERATOR_CHUNK_BYTES)


def chunk_rows(num_columns: int, chunk_bytes: int) -> int:
    """Rows per chunk so that one ``(rows, num_columns)`` float32 block stays within ``chunk_bytes``."""
    return max(1, chunk_bytes // (4 * max(num_columns, 1)))


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


def _logits_chunk(features: Tensor, weight_v: Tensor, factor: Tensor, out: Tensor | None = None) -> Tensor:
    """``(r, d) -> (r, C)`` float32 logits ``(features @ v.T) * factor`` for one chunk (``weight_v`` may be bf16)."""
    if features.dtype == torch.float32 and weight_v.dtype == torch.float32:
        logits = torch.mm(features, weight_v.t(), out=out) if out is not None else torch.mm(features, weight_v.t())
    else:
        logits = torch.mm(features.to(weight_v.dtype), weight_v.t()).float()
        if out is not None:
            logits = out.copy_(logits)
    return logits.mul_(factor)


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
    chunk_bytes: int | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Sharpened, centred teacher distribution ``softmax((h W^T - center) / temperature)``, row chunk by row chunk.

    Args:
        features: ``(J, d)`` teacher bottleneck features (L2-normalised rows).
        weight_v: ``(C, d)`` the teacher layer's ``weight_v``.
        weight_g: ``(C, 1)`` its ``weight_g``.
        center: ``(1, C)`` running centre.
        temperature: teacher temperature (> 0).
        compute_dtype: dtype of the matrix product (``bfloat16`` under mixed precision); softmax is float32.
        column_sums: also return the column sums of the raw logits ``h W^T`` (the centre's batch statistic).
        chunk_bytes: size of one chunk of logits (default :func:`default_chunk_bytes`).

    Returns:
        ``(J, C)`` float32 probabilities (a fresh buffer, meant to be handed to :func:`soft_cross_entropy_terms`)
        and ``(C,)`` column sums or ``None``.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    num_columns = weight_v.shape[0]
    probs = torch.empty(features.shape[0], num_columns, device=features.device, dtype=torch.float32)
    sums = torch.zeros(num_columns, device=features.device, dtype=torch.float32) if column_sums else None
    with _no_autocast(features.device):
        factor, _ = column_scale(weight_v, weight_g)
        weight = weight_v.detach().to(compute_dtype)
        shift = center.reshape(1, -1).float()
        step = chunk_rows(num_columns, chunk_bytes or default_chunk_bytes(features.device))
        for start in range(0, features.shape[0], step):
            block = _logits_chunk(
                features[start : start + step].detach(), weight, factor, out=probs[start : start + step]
            )
            if sums is not None:
                sums += block.sum(dim=0)
            block.sub_(shift).div_(temperature)
            block.sub_(block.amax(dim=1, keepdim=True)).exp_()
            block.div_(block.sum(dim=1, keepdim=True))
    return probs, sums


@dataclass
class SoftTarget:
    """One term's targets: entry ``j`` asks student row ``rows[j]`` to match ``probs[j]`` with weight ``weights[j]``.

    ``probs`` is consumed: :func:`soft_cross_entropy_terms` overwrites it with the term's gradient.

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


RowSelection = slice | Tensor


def _chunk_entries(rows: Tensor, num_rows: int, step: int) -> list[tuple[slice, RowSelection]]:
    """For each chunk of ``step`` student rows: the slice of a target's entries in it, and their rows in the chunk
    (a slice when those rows are contiguous, the common case, else an index tensor). Planned on the host once."""
    values = rows.tolist()
    plan = []
    lo = 0
    for start in range(0, num_rows, step):
        hi = lo
        while hi < len(values) and values[hi] < start + step:
            hi += 1
        local: RowSelection
        if hi > lo and values[hi - 1] - values[lo] == hi - lo - 1:
            local = slice(values[lo] - start, values[hi - 1] - start + 1)
        else:
            local = rows[lo:hi] - start
        plan.append((slice(lo, hi), local))
        lo = hi
    return plan


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
        chunk_bytes: int,
    ) -> Tensor:
        num_rows, num_columns = features.shape[0], weight_v.shape[0]
        factor, norms = column_scale(weight_v, weight_g, scale)
        weight = weight_v.detach().to(compute_dtype)
        step = chunk_rows(num_columns, chunk_bytes)
        plans = [_chunk_entries(t.rows, num_rows, step) for t in targets]
        losses = torch.zeros(len(targets), device=features.device, dtype=torch.float32)
        for chunk, start in enumerate(range(0, num_rows, step)):
            logits = _logits_chunk(features[start : start + step].detach(), weight, factor)
            lse = torch.logsumexp(logits, dim=1)
            parts = []
            for index, target in enumerate(targets):
                entries, local = plans[index][chunk]
                if entries.stop > entries.start:
                    probs, weights = target.probs[entries], target.weights[entries]
                    mass = probs.sum(dim=1)
                    dots = torch.bmm(probs.unsqueeze(1), logits[local].unsqueeze(2)).view(-1)
                    losses[index] += (weights * (lse[local] * mass - dots)).sum()
                    parts.append((probs, local, weights * mass, weights))
            softmax = logits.sub_(lse.unsqueeze(1)).exp_()
            for probs, local, coefficient, weights in parts:
                # probs <- w * (mass * softmax - p): the entry's gradient with respect to its logits.
                probs.mul_(-weights.unsqueeze(1)).addcmul_(softmax[local], coefficient.unsqueeze(1))
        ctx.targets, ctx.compute_dtype, ctx.scale, ctx.chunk_bytes = targets, compute_dtype, scale, chunk_bytes
        ctx.save_for_backward(features, weight_v, weight_g, factor, norms)
        return losses

    @staticmethod
    def backward(ctx: Any, grad_losses: Tensor) -> tuple[Tensor | None, ...]:
        features, weight_v, weight_g, factor, norms = ctx.saved_tensors
        num_rows, dim = features.shape
        num_columns = weight_v.shape[0]
        compute, device = ctx.compute_dtype, features.device
        active = [
            (target, gamma, _is_identity(target.rows, num_rows))
            for target, gamma in zip(ctx.targets, grad_losses.tolist(), strict=True)
            if gamma != 0.0 and target.rows.numel()
        ]
        h = features.detach().to(compute)
        gain = weight_g.detach().float().view(-1)
        grad_features = torch.zeros(num_rows, dim, device=device, dtype=torch.float32)
        grad_v = torch.empty(num_columns, dim, device=device, dtype=torch.float32) if ctx.needs_input_grad[1] else None
        grad_g = torch.empty(num_columns, device=device, dtype=torch.float32) if ctx.needs_input_grad[2] else None
        # Column blocks: the stored per-entry gradients are complete, so the columns are independent here, and each
        # block of the weight gradient is written once.
        width = chunk_rows(max(num_rows, 1), ctx.chunk_bytes)
        with _no_autocast(device):
            for first in range(0, num_columns if active else 0, width):
                cols = slice(first, min(first + width, num_columns))
                grad = torch.zeros(num_rows, cols.stop - cols.start, device=device, dtype=torch.float32)
                for target, gamma, identity in active:
                    if identity:
                        grad.add_(target.probs[:, cols], alpha=gamma)
                    else:
                        grad.index_add_(0, target.rows, target.probs[:, cols], alpha=gamma)
                # s = scale * h @ W.T with W = g v / ||v||: dL/dW = scale * G.T h; dL/dh = (G * factor) @ v.
                grad_w = torch.mm(grad.t().to(compute), h).float().mul_(ctx.scale)
                v = weight_v.detach()[cols]
                grad.mul_(factor[cols])
                grad_features += torch.mm(grad.to(compute), v.to(compute)).float()
                # Weight norm: dL/dg = M . v_hat; dL/dv = g / ||v|| (M - (M . v_hat) v_hat).
                v = v.float()
                norm, g = norms[cols], gain[cols]
                along = (grad_w * v).sum(dim=1) / norm
                if grad_g is not None:
                    grad_g[cols] = along
                if grad_v is not None:
                    grad_v[cols] = grad_w.mul_((g / norm).unsqueeze(1)).addcmul_(
                        v, (-g * along / norm.square()).unsqueeze(1)
                    )
        if not active:
            grad_v = grad_v.zero_() if grad_v is not None else None
            grad_g = grad_g.zero_() if grad_g is not None else None
        return (
            grad_features.to(features.dtype) if ctx.needs_input_grad[0] else None,
            grad_v.to(weight_v.dtype) if grad_v is not None else None,
            grad_g.view(-1, 1).to(weight_g.dtype) if grad_g is not None else None,
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
    chunk_bytes: int | None = None,
) -> Tensor:
    """Weighted soft cross-entropies through a weight-normalised linear layer, one value per target.

    ``out[t] = sum_j w_tj * ( -sum_c p_tjc log softmax(s_{r_tj})_c )`` with student logits
    ``s = scale * features @ (g v / ||v||).T`` computed chunk by chunk and never stored.

    Args:
        features: ``(R, d)`` student bottleneck features (differentiable).
        weight_v: ``(C, d)`` the student layer's ``weight_v`` (differentiable).
        weight_g: ``(C, 1)`` its ``weight_g`` (differentiable or frozen).
        scale: inverse student temperature.
        targets: the terms; each ``probs`` buffer is overwritten with its gradient (do not reuse it).
        compute_dtype: dtype of the matrix products (``bfloat16`` under mixed precision); softmax is float32.
        chunk_bytes: size of one chunk of logits (default :func:`default_chunk_bytes`).

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
            chunk_bytes or default_chunk_bytes(features.device),
        )
    return out
