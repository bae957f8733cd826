"""Cross-image object matching: exact cosine nearest neighbours in the memory bank and cycle consistency.

CrIBo (ICLR 2024, §3.3): every teacher object of view ``v`` retrieves its cosine nearest
neighbour among the stored view-``v`` objects of past images; the match is kept only if it is
*cycle-consistent*: the stored view-``1-v`` entry of the retrieved slot, used as a query
against the current batch's view-``1-v`` objects, must return the object we started from
(authors' ``get_nn_centroids``, with ``normalized_matching``).

:func:`nearest_neighbours` is an exact search in float32 that never builds the full ``n x M``
similarity matrix nor a normalised copy of the keys: it walks over chunks of keys with a
running max/argmax (first index wins on ties, as ``argmax``/``topk``). On CPU it screens the
keys with a bfloat16 matrix product first and rescores the few keys that can still be the
float32 maximum (see :func:`screening_tolerance`): the result is the one of the float32 search,
about three times faster.

Axis letters: V views, n query objects (the current batch, all images), M keys (bank slots),
D dim, c keys in a chunk, P candidate (query, key) pairs.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from cribo.memory import ObjectMemoryBank

__all__ = ["CrossImageMatches", "match_objects", "nearest_neighbours", "screening_tolerance"]

Screening = Literal["auto", "bf16", "none"]
SCREENING_CHOICES: tuple[str, ...] = ("auto", "bf16", "none")

# F.normalize's default eps, as in the authors' normalised matching.
NORMALIZE_EPS = 1e-12
# Unit roundoffs of round-to-nearest bfloat16 (8 significant bits) and float32 (24 bits).
BF16_UNIT_ROUNDOFF = 2.0**-8
FP32_UNIT_ROUNDOFF = 2.0**-24
# Allowance for float32 normalisation differences between the screen and the reference
# (a few float32 ulps in practice; bounded generously).
NORMALIZATION_SLACK = 1e-4
# "auto" screens only when there are at least this many keys (below, the overhead dominates).
MIN_KEYS_TO_SCREEN = 16384
# Keys per block whose maximum is kept while screening (transposed amax over blocks is cheap).
SCREEN_BLOCK = 16
# Candidate keys allowed per query before the query falls back to the float32 search
# (bounds the memory of the candidate lists to about n * 4096 * 20 bytes).
MAX_CANDIDATES_PER_QUERY = 4096
# Candidate pairs rescored per batch (bounds the gathered keys to ~100 MB at D = 384).
RESCORE_BATCH = 65536


@torch.no_grad()
def nearest_neighbours(
    queries: Tensor,
    keys: Tensor,
    key_mask: Tensor | None = None,
    chunk_size: int = 65536,
    normalize_keys: bool = True,
    *,
    screening: Screening = "auto",
) -> tuple[Tensor, Tensor]:
    """Exact cosine nearest neighbour of each query among the valid keys, chunked over keys.

    ``index[i] = argmax_{m valid} <q_i / |q_i|, k_m / |k_m|>`` (keys raw when ``normalize_keys`` is
    False), computed in float32 whatever the input dtypes. Memory is ``O(n * chunk_size)``.

    Args:
        queries: ``(n, D)`` queries (L2-normalised inside, in float32).
        keys: ``(M, D)`` keys; normalised chunk by chunk (never as a whole copy).
        key_mask: optional ``(M,)`` bool, False keys are excluded.
        chunk_size: keys per chunk (peak extra memory about ``chunk_size * (n + D) * 4`` bytes).
        normalize_keys: cosine similarity if True, else dot product with the raw keys.
        screening: "bf16" screens with a bfloat16 product and rescores the candidates in float32
            (CPU only, normalised keys only; same result as the float32 search); "none" is the plain
            float32 search; "auto" screens on CPU with normalised keys and at least
            ``MIN_KEYS_TO_SCREEN`` keys.

    Returns:
        similarity ``(n,)`` float32 (``-inf`` when no key is valid) and index ``(n,)`` int64
        (``-1`` when no key is valid). Ties go to the smallest key index. No gradient flows.
    """
    _check_search_inputs(queries, keys, key_mask, chunk_size, screening)
    unit_queries = F.normalize(queries.float(), dim=1, eps=NORMALIZE_EPS)
    if _use_screening(screening, unit_queries, keys, normalize_keys):
        return _screened_search(unit_queries, keys, key_mask, chunk_size)
    return _float32_search(unit_queries, keys, key_mask, chunk_size, normalize_keys)


def _check_search_inputs(
    queries: Tensor, keys: Tensor, key_mask: Tensor | None, chunk_size: int, screening: str
) -> None:
    """Raise ``ValueError`` on inconsistent arguments of :func:`nearest_neighbours`."""
    if queries.ndim != 2 or keys.ndim != 2 or queries.shape[1] != keys.shape[1]:
        raise ValueError(
            f"queries (n, D) and keys (M, D) must share D, got {tuple(queries.shape)} and {tuple(keys.shape)}"
        )
    if not queries.dtype.is_floating_point or not keys.dtype.is_floating_point:
        raise ValueError(f"queries and keys must be floating point, got {queries.dtype} and {keys.dtype}")
    if key_mask is not None and (key_mask.dtype != torch.bool or key_mask.shape != keys.shape[:1]):
        raise ValueError(
            f"key_mask must be a bool tensor of shape ({keys.shape[0]},), got {key_mask.dtype} {tuple(key_mask.shape)}"
        )
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    if screening not in SCREENING_CHOICES:
        raise ValueError(f"screening must be one of {SCREENING_CHOICES}, got {screening!r}")
    if screening == "bf16" and queries.device.type != "cpu":
        raise ValueError(f"screening='bf16' is only exact on CPU, got device {queries.device}; use 'auto' or 'none'")


def _use_screening(screening: str, unit_queries: Tensor, keys: Tensor, normalize_keys: bool) -> bool:
    """Whether the bfloat16 screen applies (its error bound needs unit keys and a CPU GEMM)."""
    if screening == "none" or not normalize_keys or unit_queries.shape[0] == 0:
        return False
    if screening == "bf16":
        return True
    return unit_queries.device.type == "cpu" and keys.shape[0] >= MIN_KEYS_TO_SCREEN


def _key_chunks(keys: Tensor, key_mask: Tensor | None, chunk_size: int) -> Iterator[tuple[Tensor, Tensor]]:
    """Yield ``(chunk (c, D) float32 valid keys, index (c,) int64 of those keys)`` in key order."""
    for start in range(0, keys.shape[0], chunk_size):
        stop = min(start + chunk_size, keys.shape[0])
        chunk = keys[start:stop].float()
        index = torch.arange(start, stop, device=keys.device)
        if key_mask is not None:
            valid = key_mask[start:stop]
            if not bool(valid.all()):
                index = index[valid]
                chunk = chunk[valid]
        if index.numel():
            yield chunk, index


def _float32_search(
    unit_queries: Tensor, keys: Tensor, key_mask: Tensor | None, chunk_size: int, normalize_keys: bool
) -> tuple[Tensor, Tensor]:
    """Plain chunked float32 search with a running max/argmax (earlier chunks win ties)."""
    num_queries = unit_queries.shape[0]
    best = unit_queries.new_full((num_queries,), -math.inf)
    index = torch.full((num_queries,), -1, dtype=torch.int64, device=unit_queries.device)
    if num_queries == 0:
        return best, index
    for chunk, chunk_index in _key_chunks(keys, key_mask, chunk_size):
        if normalize_keys:
            chunk = F.normalize(chunk, dim=1, eps=NORMALIZE_EPS)
        similarity, argmax = (unit_queries @ chunk.T).max(dim=1)  # (n, c) -> (n,)
        better = similarity > best
        best = torch.where(better, similarity, best)
        index = torch.where(better, chunk_index[argmax], index)
    return best, index


def screening_tolerance(unit_queries: Tensor) -> Tensor:
    """Width of the band below the screened maximum that can still hold the float32 maximum.

    With ``q`` a float32 unit query, ``k`` a float32 unit key, ``q_b``/``k_b`` their bfloat16
    roundings (``|k_b - k| <= u_b |k|``, ``u_b = 2^-8``), the GEMM accumulating exact bf16 products
    in float32 (error ``<= gamma_D |q_b| |k_b|``, ``gamma_D = D u / (1 - D u)``, ``u = 2^-24``) and
    rounding its output to bfloat16 once (``<= u_b |acc|``), the screened score ``s`` satisfies
    ``|s - <q, k>| <= beta`` with (Cauchy-Schwarz on each rounding term, ``N = (1 + u_b)(1 + slack)``)::

        beta = u_b N^2 (1 + gamma_D) + gamma_D N^2 + N (u_b N + slack) + N |q - q_b|

    A float32 dot product is within ``gamma_D N^2`` of ``<q, k>``, so the float32 argmax has a
    screened score ``>= max s - 2 beta - 2 gamma_D N^2``.

    Args:
        unit_queries: ``(n, D)`` float32 L2-normalised queries.

    Returns:
        ``(n,)`` float32 tolerance (about 0.02).
    """
    dim = unit_queries.shape[1]
    gamma = dim * FP32_UNIT_ROUNDOFF / (1.0 - dim * FP32_UNIT_ROUNDOFF)
    norm_bound = (1.0 + BF16_UNIT_ROUNDOFF) * (1.0 + NORMALIZATION_SLACK)
    query_rounding = torch.linalg.vector_norm(unit_queries - unit_queries.bfloat16().float(), dim=1)
    beta = (
        BF16_UNIT_ROUNDOFF * norm_bound**2 * (1.0 + gamma)
        + gamma * norm_bound**2
        + norm_bound * (BF16_UNIT_ROUNDOFF * norm_bound + NORMALIZATION_SLACK)
        + norm_bound * query_rounding * (1.0 + 4.0 * FP32_UNIT_ROUNDOFF * dim)
    )
    # 1 % headroom covers the float32 evaluation of this bound itself.
    return (2.0 * beta + 2.0 * gamma * norm_bound**2) * 1.01


@dataclass
class _Candidates:
    """Running state of the bfloat16 screen: per-query running max and candidate (query, key) pairs."""

    running_max: Tensor  # (n,) float32 largest screened score so far
    tolerance: Tensor  # (n,) float32 band width (screening_tolerance)
    count: Tensor  # (n,) int64 candidate keys stored per query
    fallback: Tensor  # (n,) bool queries over budget, searched in float32 instead
    query: list[Tensor] = field(default_factory=list)  # (P,) int64 per chunk
    key: list[Tensor] = field(default_factory=list)  # (P,) int64
    score: list[Tensor] = field(default_factory=list)  # (P,) float32 screened scores

    def threshold(self) -> Tensor:
        """``(n,)`` screened score a key needs to stay a candidate (``+inf`` for fallback queries)."""
        threshold = self.running_max - self.tolerance
        return threshold.masked_fill(self.fallback, math.inf)

    def prune(self) -> None:
        """Drop stored pairs that fell out of the band as the running max rose."""
        if not self.query:
            return
        query, key, score = torch.cat(self.query), torch.cat(self.key), torch.cat(self.score)
        keep = score >= self.threshold()[query]
        self.query, self.key, self.score = [query[keep]], [key[keep]], [score[keep]]
        self.count = torch.bincount(query[keep], minlength=self.count.numel())


def _screen_chunk(state: _Candidates, query_bf16: Tensor, chunk_bf16: Tensor, chunk_index: Tensor) -> None:
    """Screen one chunk of bfloat16 unit keys and store its candidate pairs in ``state``."""
    num_keys, num_queries = chunk_bf16.shape[0], query_bf16.shape[0]
    scores = chunk_bf16 @ query_bf16.T  # (c, n) bfloat16, float32 accumulation
    full = num_keys - num_keys % SCREEN_BLOCK
    block_max = scores[:full].view(-1, SCREEN_BLOCK, num_queries).amax(1)  # (c / block, n)
    if full < num_keys:
        block_max = torch.cat([block_max, scores[full:].amax(0, keepdim=True)])
    torch.maximum(state.running_max, block_max.amax(0).float(), out=state.running_max)
    hot = block_max >= state.threshold()  # (blocks, n)
    new_count = hot.sum(0) * SCREEN_BLOCK
    if bool((state.count + new_count > MAX_CANDIDATES_PER_QUERY).any()):
        state.prune()
        over = state.count + new_count > MAX_CANDIDATES_PER_QUERY
        state.fallback |= over
        hot[:, over] = False
    block, query = hot.nonzero(as_tuple=True)
    rows = block[:, None] * SCREEN_BLOCK + torch.arange(SCREEN_BLOCK, device=block.device)  # (P, block)
    in_chunk = rows < num_keys
    rows = rows.clamp_max(num_keys - 1)
    values = scores[rows, query[:, None]].float()
    pair, offset = ((values >= state.threshold()[query][:, None]) & in_chunk).nonzero(as_tuple=True)
    state.query.append(query[pair])
    state.key.append(chunk_index[rows[pair, offset]])
    state.score.append(values[pair, offset])
    state.count += torch.bincount(query[pair], minlength=num_queries)


def _rescore(unit_queries: Tensor, keys: Tensor, query: Tensor, key: Tensor) -> Tensor:
    """``(P,)`` float32 cosine similarity of candidate pairs, keys normalised as in the float32 search."""
    similarity = unit_queries.new_empty(query.shape)
    for start in range(0, query.numel(), RESCORE_BATCH):
        stop = start + RESCORE_BATCH
        unit_keys = F.normalize(keys[key[start:stop]].float(), dim=1, eps=NORMALIZE_EPS)
        similarity[start:stop] = (unit_keys * unit_queries[query[start:stop]]).sum(1)
    return similarity


def _best_per_query(num_queries: int, query: Tensor, key: Tensor, similarity: Tensor) -> tuple[Tensor, Tensor]:
    """Per-query max of ``similarity`` over pairs, ties to the smallest key; ``(-inf, -1)`` if none."""
    best = similarity.new_full((num_queries,), -math.inf).scatter_reduce(0, query, similarity, "amax")
    is_best = similarity == best[query]
    no_key = torch.iinfo(torch.int64).max
    index = torch.full((num_queries,), no_key, dtype=torch.int64, device=query.device)
    index = index.scatter_reduce(0, query[is_best], key[is_best], "amin")
    return best, index.masked_fill(index == no_key, -1)


def _screened_search(
    unit_queries: Tensor, keys: Tensor, key_mask: Tensor | None, chunk_size: int
) -> tuple[Tensor, Tensor]:
    """bfloat16 screen over all keys, float32 rescoring of the candidates, float32 fallback."""
    num_queries = unit_queries.shape[0]
    state = _Candidates(
        running_max=unit_queries.new_full((num_queries,), -math.inf),
        tolerance=screening_tolerance(unit_queries),
        count=torch.zeros(num_queries, dtype=torch.int64, device=unit_queries.device),
        fallback=torch.zeros(num_queries, dtype=torch.bool, device=unit_queries.device),
    )
    query_bf16 = unit_queries.bfloat16()
    buffer = unit_queries.new_empty((min(chunk_size, keys.shape[0]), keys.shape[1]), dtype=torch.bfloat16)
    for chunk, chunk_index in _key_chunks(keys, key_mask, chunk_size):
        inverse_norm = torch.linalg.vector_norm(chunk, dim=1).clamp_min_(NORMALIZE_EPS).reciprocal_()
        chunk_bf16 = torch.mul(chunk, inverse_norm[:, None], out=buffer[: chunk.shape[0]])
        _screen_chunk(state, query_bf16, chunk_bf16, chunk_index)
    state.prune()
    empty = torch.zeros(0, dtype=torch.int64, device=unit_queries.device)
    query, key = (state.query[0], state.key[0]) if state.query else (empty, empty)
    similarity = _rescore(unit_queries, keys, query, key)
    best, index = _best_per_query(num_queries, query, key, similarity)
    if bool(state.fallback.any()):
        fallback = state.fallback.nonzero().squeeze(1)
        best[fallback], index[fallback] = _float32_search(unit_queries[fallback], keys, key_mask, chunk_size, True)
    return best, index


@dataclass
class CrossImageMatches:
    """Nearest neighbours of the batch's objects in the bank, per view.

    Attributes:
        neighbours: ``(V, n, D)`` float32, ``neighbours[v][i]`` = raw stored view-``v`` entry retrieved
            by view-``v`` object ``i`` (zeros where the bank holds no object).
        cycle_mask: ``(V, n)`` bool, True where the match is cycle-consistent.
        index: ``(V, n)`` int64 flat bank slot index (``-1`` where the bank holds no object).
    """

    neighbours: Tensor
    cycle_mask: Tensor
    index: Tensor


@torch.no_grad()
def match_objects(
    objects: Tensor, bank: ObjectMemoryBank, chunk_size: int = 65536, *, screening: Screening = "auto"
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
        screening: see :func:`nearest_neighbours`.

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
        keys, valid = bank.flat_view(view)
        _, index = nearest_neighbours(objects[:, view], keys, valid, chunk_size, screening=screening)
        found = index >= 0
        safe_index = index.clamp_min(0)
        neighbours.append(torch.where(found[:, None], bank.lookup(view, safe_index), 0.0))
        partner = bank.lookup(other, safe_index)
        _, back = nearest_neighbours(partner, objects[:, other], None, chunk_size, screening="none")
        masks.append(found & (back == arange))
        indices.append(index)
    return CrossImageMatches(torch.stack(neighbours), torch.stack(masks), torch.stack(indices))
