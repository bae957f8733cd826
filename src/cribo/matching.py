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
float32 maximum (see :func:`screening_margin`): the result is the one of the float32 search
(same indices; similarities within float32 rounding), 2 to 2.5 times faster. The bound assumes what
oneDNN documents for bfloat16 matmuls on CPU (float32 accumulation, one final rounding);
``tests/test_matching.py`` checks it on the machine that runs the tests. Other devices use the
plain float32 search.

Ties go to the smallest flat slot index of the bank, not to the authors' newest-first queue order;
they need two stored objects with exactly the same direction, which real features do not give.

Axis letters: V views, n query objects (the current batch, all images), M keys (bank slots),
D dim, c keys in a chunk, P candidate (query, key) pairs.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor

from cribo.memory import ObjectMemoryBank

__all__ = ["CrossImageMatches", "match_objects", "nearest_neighbours", "screening_margin"]

Screening = Literal["auto", "bf16", "none"]
SCREENING_CHOICES: tuple[str, ...] = get_args(Screening)

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
# Rescoring one candidate pair (two gathered rows) costs about as much as this many float32
# GEMM entries; a chunk with more pairs than (keys * queries) / ratio is rescored by a GEMM.
RESCORE_COST_RATIO = 32
# Candidate pairs rescored at once (the gathered keys and queries take 2 * 4 * D bytes per pair).
RESCORE_BATCH = 8192


@torch.no_grad()
def nearest_neighbours(
    queries: Tensor,
    keys: Tensor,
    key_mask: Tensor | None = None,
    chunk_size: int = 8192,
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


def screening_margin(unit_queries: Tensor) -> Tensor:
    """Bound on the error of the bfloat16 screened score of a unit key, per query.

    With ``q`` a float32 unit query, ``k`` a float32 unit key, ``q_b``/``k_b`` their bfloat16
    roundings (``|k_b - k| <= u_b |k|``, ``u_b = 2^-8``), the GEMM accumulating the exact bf16
    products in float32 (error ``<= gamma_D |q_b| |k_b|``, ``gamma_D = D u / (1 - D u)``,
    ``u = 2^-24``) and rounding its output to bfloat16 once (``<= u_b |acc|``), Cauchy-Schwarz on each
    rounding term gives ``|s - <q, k>| <= beta`` for the screened score ``s``, with
    ``N = (1 + u_b)(1 + slack)`` bounding the norms::

        beta = u_b N^2 (1 + gamma_D) + gamma_D N^2 + N (u_b N + slack) + N |q - q_b|

    Any float32 evaluation ``r`` of ``<q, k>`` is within ``gamma_D N^2`` of it, so two of them differ
    by at most ``2 gamma_D N^2``. The returned ``margin = beta + 3 gamma_D N^2`` is what the screen
    needs: see ``_Screen.threshold`` (about 0.0097 at D = 384).

    Args:
        unit_queries: ``(n, D)`` float32 L2-normalised queries.

    Returns:
        ``(n,)`` float32 margins.
    """
    dim = unit_queries.shape[1]
    gamma = dim * FP32_UNIT_ROUNDOFF / (1.0 - dim * FP32_UNIT_ROUNDOFF)
    norm_bound = (1.0 + BF16_UNIT_ROUNDOFF) * (1.0 + NORMALIZATION_SLACK)
    query_rounding = torch.linalg.vector_norm(unit_queries - unit_queries.bfloat16().float(), dim=1)
    beta = (
        BF16_UNIT_ROUNDOFF * norm_bound**2 * (1.0 + gamma)
        + gamma * norm_bound**2
        + norm_bound * (BF16_UNIT_ROUNDOFF * norm_bound + NORMALIZATION_SLACK)
        + norm_bound * query_rounding
    )
    # 1 % headroom covers the float32 evaluation of the bound itself.
    return (beta + 3.0 * gamma * norm_bound**2) * 1.01


@dataclass
class _RunningBest:
    """Best float32 similarity and key index per query over the chunks seen so far."""

    similarity: Tensor  # (n,) float32, -inf before any key
    index: Tensor  # (n,) int64, -1 before any key

    @classmethod
    def empty(cls, unit_queries: Tensor) -> _RunningBest:
        num_queries = unit_queries.shape[0]
        similarity = unit_queries.new_full((num_queries,), -math.inf)
        return cls(similarity, torch.full((num_queries,), -1, dtype=torch.int64, device=unit_queries.device))

    def update(self, query: Tensor, key: Tensor, similarity: Tensor) -> None:
        """Merge (query, key, similarity) pairs of keys after all keys seen so far.

        The smallest key index wins a tie, within the pairs and against earlier chunks.
        """
        if query.numel() == 0:
            return
        best = similarity.new_full(self.similarity.shape, -math.inf).scatter_reduce(0, query, similarity, "amax")
        is_best = similarity == best[query]
        no_key = torch.iinfo(torch.int64).max
        index = torch.full_like(self.index, no_key).scatter_reduce(0, query[is_best], key[is_best], "amin")
        better = best > self.similarity
        self.similarity = torch.where(better, best, self.similarity)
        self.index = torch.where(better, index, self.index)


def _float32_search(
    unit_queries: Tensor, keys: Tensor, key_mask: Tensor | None, chunk_size: int, normalize_keys: bool
) -> tuple[Tensor, Tensor]:
    """Plain chunked float32 search with a running max/argmax (earlier chunks win ties)."""
    running = _RunningBest.empty(unit_queries)
    if unit_queries.shape[0] == 0:
        return running.similarity, running.index
    for chunk, chunk_index in _key_chunks(keys, key_mask, chunk_size):
        unit_keys = F.normalize(chunk, dim=1, eps=NORMALIZE_EPS) if normalize_keys else chunk
        similarity, argmax = (unit_queries @ unit_keys.T).max(dim=1)  # (n, c) -> (n,)
        better = similarity > running.similarity
        running.similarity = torch.where(better, similarity, running.similarity)
        running.index = torch.where(better, chunk_index[argmax], running.index)
    return running.similarity, running.index


@dataclass
class _Screen:
    """Per-search constants and running state of the bfloat16 screen."""

    unit_queries: Tensor  # (n, D) float32
    query_bf16: Tensor  # (n, D) bfloat16
    margin: Tensor  # (n,) float32, screening_margin
    screen_max: Tensor  # (n,) float32 largest screened score so far
    best: _RunningBest
    buffer: Tensor  # (chunk_size, D) bfloat16 scratch for the unit keys

    def threshold(self) -> Tensor:
        """``(n,)`` screened score a key needs to possibly be the float32 argmax.

        With ``m`` the margin, ``beta`` the screen error and ``g = gamma_D N^2``: the float32 argmax
        ``k*`` has ``s(k*) >= r(k*) - g - beta``, and ``r(k*) >= r(j)`` for every key ``j``. Taking
        for ``j`` the best rescored key (``r(j) >= best - 2 g``) gives ``s(k*) >= best - m``; taking
        the screen's argmax (``r(j) >= s_max - beta - g``) gives ``s(k*) >= s_max - 2 m``.
        """
        lower_bound = torch.maximum(self.best.similarity, self.screen_max - self.margin)
        return lower_bound - self.margin


def _screen_chunk(screen: _Screen, chunk: Tensor, chunk_index: Tensor) -> None:
    """Screen one chunk in bfloat16, then rescore its candidates in float32 while it is in cache."""
    num_keys, num_queries = chunk.shape[0], screen.unit_queries.shape[0]
    norm = chunk.norm(2, 1, keepdim=True).clamp_min_(NORMALIZE_EPS)  # (c, 1), exactly as F.normalize
    chunk_bf16 = torch.div(chunk, norm, out=screen.buffer[:num_keys])  # rounded once to bfloat16
    scores = chunk_bf16 @ screen.query_bf16.T  # (c, n) bfloat16, float32 accumulation
    full = num_keys - num_keys % SCREEN_BLOCK
    block_max = scores[:full].view(-1, SCREEN_BLOCK, num_queries).amax(1)  # (c / block, n)
    if full < num_keys:
        block_max = torch.cat([block_max, scores[full:].amax(0, keepdim=True)])
    chunk_max = block_max.amax(0).float()  # (n,)
    torch.maximum(screen.screen_max, chunk_max, out=screen.screen_max)
    _rescore_chunk_tops(screen, chunk, norm, chunk_index, scores, block_max, chunk_max)
    threshold = screen.threshold()
    block, query = (block_max >= threshold).nonzero(as_tuple=True)  # (P,) block-major
    rows = _block_rows(block, num_keys)  # (P, block)
    pair, offset = (scores[rows, query[:, None]].float() >= threshold[query][:, None]).nonzero(as_tuple=True)
    query, row = query[pair], rows[pair, offset]
    if query.numel() * RESCORE_COST_RATIO > num_keys * num_queries:
        _rescore_chunk_dense(screen, chunk, norm, chunk_index, torch.unique(query))
    else:
        _rescore_pairs(screen, chunk, norm, chunk_index, query, row)


def _rescore_chunk_tops(
    screen: _Screen,
    chunk: Tensor,
    norm: Tensor,
    chunk_index: Tensor,
    scores: Tensor,
    block_max: Tensor,
    chunk_max: Tensor,
) -> None:
    """Rescore the chunk's screened best key of the queries whose lower bound it may raise.

    Where ``chunk_max - margin`` exceeds the best rescored similarity, the threshold would rest on
    the screen's bound; the top key's float32 similarity is usually close to ``chunk_max`` (the screen's
    errors are far below the margin), so rescoring it first about halves the band of candidates.
    """
    query = (chunk_max - screen.margin > screen.best.similarity).nonzero().squeeze(1)  # (q,)
    if query.numel() == 0:
        return
    top_rows = _block_rows(block_max[:, query].argmax(0), chunk.shape[0])  # (q, block)
    top_row = top_rows.gather(1, scores[top_rows, query[:, None]].argmax(1, keepdim=True)).squeeze(1)
    _rescore_pairs(screen, chunk, norm, chunk_index, query, top_row)


def _block_rows(block: Tensor, num_keys: int) -> Tensor:
    """``(P, SCREEN_BLOCK)`` rows of the given blocks; rows past the chunk repeat its last row."""
    rows = block[:, None] * SCREEN_BLOCK + torch.arange(SCREEN_BLOCK, device=block.device)
    return rows.clamp_max(num_keys - 1)


def _rescore_pairs(
    screen: _Screen, chunk: Tensor, norm: Tensor, chunk_index: Tensor, query: Tensor, row: Tensor
) -> None:
    """Float32 similarities of (query, chunk row) pairs, merged into the running best.

    Pairs go by batches of ``RESCORE_BATCH`` so that the gathered keys stay small.
    """
    similarity = torch.empty_like(query, dtype=torch.float32)
    for start in range(0, query.numel(), RESCORE_BATCH):
        batch = slice(start, start + RESCORE_BATCH)
        unit_keys = chunk[row[batch]] / norm[row[batch]]  # the float32 unit keys of F.normalize, bit for bit
        similarity[batch] = (unit_keys * screen.unit_queries[query[batch]]).sum(1)
    screen.best.update(query, chunk_index[row], similarity)


def _rescore_chunk_dense(screen: _Screen, chunk: Tensor, norm: Tensor, chunk_index: Tensor, queries: Tensor) -> None:
    """Float32 similarities of a whole chunk for some queries (when most pairs are candidates)."""
    similarity, argmax = (screen.unit_queries[queries] @ (chunk / norm).T).max(dim=1)
    screen.best.update(queries, chunk_index[argmax], similarity)


def _screened_search(
    unit_queries: Tensor, keys: Tensor, key_mask: Tensor | None, chunk_size: int
) -> tuple[Tensor, Tensor]:
    """bfloat16 screen of every chunk with float32 rescoring of the candidates (exact result)."""
    screen = _Screen(
        unit_queries=unit_queries,
        query_bf16=unit_queries.bfloat16(),
        margin=screening_margin(unit_queries),
        screen_max=unit_queries.new_full((unit_queries.shape[0],), -math.inf),
        best=_RunningBest.empty(unit_queries),
        buffer=unit_queries.new_empty((min(chunk_size, keys.shape[0]), keys.shape[1]), dtype=torch.bfloat16),
    )
    for chunk, chunk_index in _key_chunks(keys, key_mask, chunk_size):
        _screen_chunk(screen, chunk, chunk_index)
    return screen.best.similarity, screen.best.index


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
    objects: Tensor, bank: ObjectMemoryBank, chunk_size: int = 8192, *, screening: Screening = "auto"
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
