"""Cross-image object matching: nearest neighbours in the memory bank, cycle consistency, the resulting entries.

CrIBo (ICLR 2024, §3.3): every teacher object of view ``v`` retrieves its cosine nearest neighbour among the
stored view-``v`` objects of past images; the match is kept only if it is *cycle-consistent*: the stored
view-``1-v`` entry of the retrieved slot, used as a query against the current batch's view-``1-v`` objects, must
return the object we started from (authors' ``get_nn_centroids``, with ``normalized_matching``). Each kept match
becomes one entry of the cross-image loss: the neighbour retrieved by view-``v`` object ``i`` supervises the
student's object ``i`` of the other view, with the weight of the loss's normalisation (:func:`cross_image_entries`).

The search itself is :func:`cribo.search.nearest_neighbours` (exact; bfloat16-screened on CPU).

Ties go to the smallest flat slot index of the bank, not to the authors' newest-first queue order; they need two
stored objects with exactly the same direction, which real features do not give.

Axis letters: V views, n objects of the current batch (all images), D dim, J entries (cycle-consistent matches).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from cribo.losses import CROSS_IMAGE_NORMALIZATIONS, NUM_VIEWS, CrossImageNormalization
from cribo.memory import ObjectMemoryBank
from cribo.search import BankKeys, Screening, nearest_neighbours, use_screening

__all__ = ["CrossImageEntries", "CrossImageMatches", "cross_image_entries", "match_objects"]


@dataclass(frozen=True)
class CrossImageEntries:
    """The cross-image loss term as a list of ``J`` entries, in the order of the student rows they supervise.

    Attributes:
        order: ``(J,)`` int64 flat neighbour index ``v * n + i`` (into ``neighbours.flatten(0, 1)``).
        rows: ``(J,)`` int64 student object row (view-major ``(V*n)`` layout), ascending.
        weights: ``(J,)`` float32 weight of each entry's cross-entropy in the term.
    """

    order: Tensor
    rows: Tensor
    weights: Tensor


def cross_image_entries(cycle_mask: Tensor, normalization: CrossImageNormalization) -> CrossImageEntries:
    """The cross-image term as a list of entries, in the order of the student rows they supervise.

    The neighbour retrieved by view-v object i supervises student row ``(1 - v) * n + i`` where ``cycle_mask[v, i]``
    (the row layout of :func:`cross_image_loss`); the weights reproduce its normalisation exactly.

    Args:
        cycle_mask: ``(V, n)`` bool.
        normalization: ``"per_view"`` (entry of view v weighs ``1 / (2 Z_v)``) or ``"view1"`` (every entry weighs
            ``1 / (2 Z_1)``, and 0 when ``Z_1 = 0``).

    Returns:
        The :class:`CrossImageEntries`; ``J`` is the number of cycle-consistent retrievals.
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
    return CrossImageEntries(torch.cat(order), torch.cat(rows), torch.cat(weights).float())


@dataclass(frozen=True)
class CrossImageMatches:
    """Nearest neighbours of the batch's objects in the bank, per view.

    Attributes:
        neighbours: ``(V, n, D)`` float32, ``neighbours[v][i]`` = raw stored view-``v`` entry retrieved
            by view-``v`` object ``i`` (zeros where the bank holds no object).
        cycle_mask: ``(V, n)`` bool, True where the match is cycle-consistent.
        index: ``(V, n)`` int64 flat bank slot index (``-1`` where the bank holds no object).
        entries: the cycle-consistent matches as entries of the cross-image term (:func:`cross_image_entries`).
    """

    neighbours: Tensor
    cycle_mask: Tensor
    index: Tensor
    entries: CrossImageEntries

    def used_neighbours(self) -> Tensor:
        """``(J, D)`` the retrieved neighbours of the entries, in entry order (the teacher head runs on these only)."""
        return self.neighbours.flatten(0, 1)[self.entries.order]


@torch.no_grad()
def match_objects(
    objects: Tensor,
    bank: ObjectMemoryBank,
    chunk_size: int = 8192,
    *,
    screening: Screening = "auto",
    keys: BankKeys | None = None,
    normalization: CrossImageNormalization = "per_view",
) -> CrossImageMatches:
    """Retrieve each object's nearest stored neighbour per view and check cycle consistency.

    For view ``v`` (other view ``w = 1 - v``): ``index[v][i] = argmax_m cos(x_{i,v}, bank_v[m])``
    over valid slots; ``neighbours[v][i] = bank_v[index[v][i]]`` (raw); the cycle goes back through
    ``bank_w[index[v][i]]``, whose cosine nearest neighbour among the batch's view-``w`` objects must
    be object ``i`` (``cycle_mask[v][i]``). Call it before pushing the batch into the bank. A bank
    with no valid object gives no match (``cycle_mask`` all False, ``index`` -1, zero neighbours).

    Args:
        objects: ``(n, 2, D)`` raw teacher objects of the current batch (any float dtype).
        bank: memory bank with 2 views and dim ``D``.
        chunk_size: keys per chunk of the bank search.
        screening: see :func:`cribo.search.nearest_neighbours`.
        keys: the bank's kept bfloat16 unit keys for the screen (else each screened search normalises the bank
            chunk by chunk).
        normalization: weights of the cross-image entries, see :func:`cross_image_entries`.

    Returns:
        :class:`CrossImageMatches` with ``V = 2``.
    """
    if objects.ndim != 3 or objects.shape[1] != 2 or objects.shape[2] != bank.dim:
        raise ValueError(f"objects must have shape (n, 2, D={bank.dim}), got {tuple(objects.shape)}")
    if bank.num_views != 2:
        raise ValueError(f"bank must have 2 views for the cycle check, got {bank.num_views}")
    num_objects = objects.shape[0]
    arange = torch.arange(num_objects, device=objects.device)
    neighbours, masks, indices = [], [], []
    for view in range(2):
        other = 1 - view
        stored, valid = bank.flat_view(view)
        screen_keys = keys.view(bank, view) if keys is not None and use_screening(screening, objects, stored) else None
        _, index = nearest_neighbours(
            objects[:, view], stored, valid, chunk_size, screening=screening, screen_keys=screen_keys
        )
        found = index >= 0
        safe_index = index.clamp_min(0)
        neighbours.append(torch.where(found[:, None], bank.lookup(view, safe_index), 0.0))
        partner = bank.lookup(other, safe_index)
        _, back = nearest_neighbours(partner, objects[:, other], None, chunk_size, screening="none")
        masks.append(found & (back == arange))
        indices.append(index)
    cycle_mask = torch.stack(masks)
    entries = cross_image_entries(cycle_mask, normalization)
    return CrossImageMatches(torch.stack(neighbours), cycle_mask, torch.stack(indices), entries)
