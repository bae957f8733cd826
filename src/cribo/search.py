"""Exact cosine nearest-neighbour search over a large set of keys, and the bank's cached screening keys.

:func:`nearest_neighbours` is an exact search in float32 that never builds the full ``n x M`` similarity matrix
nor a normalised copy of the keys: it walks over chunks of keys with a running max/argmax (first index wins on
ties, as ``argmax``/``topk``). On CPU it screens the keys with a bfloat16 matrix product first and rescores the
few keys that can still be the float32 maximum (see :func:`screening_margin`): the result is the one of the
float32 search (same indices; similarities within float32 rounding), 2 to 2.5 times faster where the CPU has
native bfloat16 dot products (elsewhere bfloat16 is emulated and slower than float32: the screen is then left out,
:func:`bfloat16_matmul_pays`). The screen runs in
two passes: pass 1 multiplies every chunk of keys with all queries and keeps only the maximum of each block of
``SCREEN_BLOCK`` keys (and of each group of blocks); pass 2 rescores the screen's best block of each query, which
sets the threshold, then the blocks that reach it. The bound assumes what oneDNN documents for bfloat16 matmuls on
CPU (float32 accumulation, one final rounding); ``tests/test_search.py`` checks it on the machine that runs the
tests. Other devices use the plain float32 search.

:class:`BankKeys` keeps the screen's bfloat16 unit keys of a memory bank between searches (half the bank's
memory), so no step normalises or converts the whole bank: the trainer owns one, refreshes it after each
:meth:`cribo.memory.ObjectMemoryBank.push` with the written rows, and clears it when the bank is changed
otherwise (a checkpoint loaded).

Axis letters: V views, n queries, M keys (bank slots), D dim, c keys in a chunk, G groups of blocks,
P candidate (block or group, query) pairs.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor

from cribo.memory import ObjectMemoryBank, PushedSlots

__all__ = [
    "NORMALIZE_EPS",
    "BankKeys",
    "Screening",
    "bfloat16_matmul_pays",
    "nearest_neighbours",
    "normalize_to_bfloat16",
    "screening_margin",
    "use_screening",
]

# F.normalize's default eps, as in the authors' normalised matching.
NORMALIZE_EPS = 1e-12
# Rows normalised at once when the bfloat16 unit keys are built (bounds the float32 temporaries).
UNIT_KEYS_CHUNK = 8192


def normalize_to_bfloat16(rows: Tensor, out: Tensor | None = None) -> Tensor:
    """``F.normalize(rows, dim=1)`` in float32, rounded once to bfloat16 (into ``out`` if given).

    The keys of the bfloat16 screen of :func:`nearest_neighbours`, whether :class:`BankKeys` keeps them or the
    search normalises a chunk.

    Args:
        rows: ``(r, D)`` rows of any float dtype (normalised in float32).
        out: optional ``(r, D)`` bfloat16 destination.

    Returns:
        ``(r, D)`` bfloat16 unit rows.
    """
    rows = rows.float()
    norm = rows.norm(2, 1, keepdim=True).clamp_min_(NORMALIZE_EPS)  # exactly as F.normalize
    if out is None:
        out = torch.empty(rows.shape, dtype=torch.bfloat16, device=rows.device)
    return torch.div(rows, norm, out=out)


Screening = Literal["auto", "bf16", "none"]
SCREENING_CHOICES: tuple[str, ...] = get_args(Screening)

# Unit roundoffs of round-to-nearest bfloat16 (8 significant bits) and float32 (24 bits).
BF16_UNIT_ROUNDOFF = 2.0**-8
FP32_UNIT_ROUNDOFF = 2.0**-24
# Allowance for float32 normalisation differences between the screen and the reference
# (a few float32 ulps in practice; bounded generously).
NORMALIZATION_SLACK = 1e-4
# "auto" screens only when there are at least this many keys (below, the overhead dominates).
MIN_KEYS_TO_SCREEN = 16384
# Keys per block whose screened maximum is kept for the whole search (pass 1); a candidate block's keys
# are all rescored (pass 2). The block maxima take 2 * n / SCREEN_BLOCK bytes per key.
SCREEN_BLOCK = 16
# Blocks per group: pass 2 looks for candidate blocks only in the groups whose screened maximum reaches the
# threshold (chunks are rounded up to whole groups).
SCREEN_GROUP = 32
# Rescoring one key of a candidate block (a gathered row) costs about as much as this many float32
# GEMM entries; a group with more candidate keys than (keys * queries) / ratio is rescored by a GEMM.
RESCORE_COST_RATIO = 32
# Candidate blocks rescored at once (the gathered keys take SCREEN_BLOCK * 4 * D bytes per block).
RESCORE_BATCH = 256
# (block, query) screened maxima compared with the threshold at once in pass 2 (bounds its temporaries).
CANDIDATE_BATCH = 1 << 20


@torch.no_grad()
def nearest_neighbours(
    queries: Tensor,
    keys: Tensor,
    key_mask: Tensor | None = None,
    chunk_size: int = 8192,
    normalize_keys: bool = True,
    *,
    screening: Screening = "auto",
    screen_keys: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Exact cosine nearest neighbour of each query among the valid keys, chunked over keys.

    ``index[i] = argmax_{m valid} <q_i / |q_i|, k_m / |k_m|>`` (keys raw when ``normalize_keys`` is
    False), computed in float32 whatever the input dtypes. Memory is ``O(n * chunk_size)``, plus the
    screen's block maxima (``2 n M / SCREEN_BLOCK`` bytes: 51 MB for 512 queries and 800 000 keys).

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
        screen_keys: optional ``(M, D)`` bfloat16 rounding of the float32 unit keys (``F.normalize(keys)``),
            read by the screen instead of normalising the keys at every call (the bank keeps them:
            :meth:`ObjectMemoryBank.screen_keys`); ignored by the float32 search.

    Returns:
        similarity ``(n,)`` float32 (``-inf`` when no key is valid) and index ``(n,)`` int64
        (``-1`` when no key is valid). Ties go to the smallest key index. No gradient flows.
    """
    _check_search_inputs(queries, keys, key_mask, chunk_size, screening, screen_keys)
    unit_queries = F.normalize(queries.float(), dim=1, eps=NORMALIZE_EPS)
    if use_screening(screening, unit_queries, keys, normalize_keys):
        return _screened_search(unit_queries, keys, key_mask, chunk_size, screen_keys)
    return _float32_search(unit_queries, keys, key_mask, chunk_size, normalize_keys)


def _check_search_inputs(
    queries: Tensor, keys: Tensor, key_mask: Tensor | None, chunk_size: int, screening: str, screen_keys: Tensor | None
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
    if screen_keys is not None and (screen_keys.dtype != torch.bfloat16 or screen_keys.shape != keys.shape):
        raise ValueError(
            f"screen_keys must be bfloat16 with the keys' shape {tuple(keys.shape)}, "
            f"got {screen_keys.dtype} {tuple(screen_keys.shape)}"
        )


def use_screening(screening: str, queries: Tensor, keys: Tensor, normalize_keys: bool = True) -> bool:
    """Whether :func:`nearest_neighbours` screens in bfloat16 (its bound needs unit keys and a CPU GEMM).

    ``auto`` screens on CPU, with at least ``MIN_KEYS_TO_SCREEN`` keys, when this CPU's bfloat16 matrix product
    is faster than float32 (:func:`bfloat16_matmul_pays`).
    """
    if screening == "none" or not normalize_keys or queries.shape[0] == 0:
        return False
    if screening == "bf16":
        return True
    return queries.device.type == "cpu" and keys.shape[0] >= MIN_KEYS_TO_SCREEN and bfloat16_matmul_pays()


# Shape (keys, D, queries) of the bank-search product timed by bfloat16_matmul_pays (part of a bank chunk).
PROBE_SHAPE = (2048, 384, 256)
PROBE_REPEATS = 5
EMULATED_SLOWDOWN = 4.0  # a first bfloat16 product this much slower than float32 settles it without repeats
# The screen reads every key in bfloat16 and rescores a few in float32; it pays when bfloat16 products are at
# least this much faster than float32 ones (about 2x with native bfloat16 dot products).
SCREEN_SPEEDUP_NEEDED = 1.25


@functools.cache
def bfloat16_matmul_pays() -> bool:
    """Whether a bfloat16 matrix product is clearly faster than a float32 one on this CPU (timed once per process).

    CPUs with native bfloat16 dot products (AVX512-BF16, AMX) run the screen's products about twice as fast as
    float32; without them oneDNN emulates bfloat16, 2 to 30 times slower than float32 (measured on this project's
    machines with ``ONEDNN_MAX_CPU_ISA`` capped), which would make the screen the slowest part of a step. The
    answer is a fact of the hardware for the life of the process (cached), and changes speed only: the screened
    and the float32 searches return the same neighbours.
    """
    generator = torch.Generator().manual_seed(0)
    num_keys, dim, num_queries = PROBE_SHAPE
    keys, queries = torch.randn(num_keys, dim, generator=generator), torch.randn(dim, num_queries, generator=generator)

    def seconds(left: Tensor, right: Tensor) -> float:
        start = time.perf_counter()
        torch.mm(left, right)
        return time.perf_counter() - start

    low = (keys.bfloat16(), queries.bfloat16())
    float32 = min(seconds(keys, queries) for _ in range(2))  # warm-up included (kernel selection, first touch)
    if seconds(*low) > EMULATED_SLOWDOWN * float32:  # emulated: no need to time it again
        return False
    bfloat16 = math.inf
    for _ in range(PROBE_REPEATS):  # interleaved, so that a busy spell of the machine hits both
        float32 = min(float32, seconds(keys, queries))
        bfloat16 = min(bfloat16, seconds(*low))
    return bfloat16 * SCREEN_SPEEDUP_NEEDED <= float32


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
    needs: see :func:`_screening_threshold` (about 0.0097 at D = 384).

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

    def merge(self, query: Tensor, key: Tensor, similarity: Tensor) -> None:
        """Merge ``(P,)`` (query, key, similarity) triples given in any order; the smallest key index wins ties."""
        if query.numel() == 0:
            return
        best = torch.maximum(
            self.similarity, torch.full_like(self.similarity, -math.inf).scatter_reduce(0, query, similarity, "amax")
        )
        is_best = similarity == best[query]
        no_key = torch.iinfo(torch.int64).max
        index = torch.full_like(self.index, no_key).scatter_reduce(0, query[is_best], key[is_best], "amin")
        kept = torch.where(self.similarity == best, self.index, no_key)  # -1 only while the best is still -inf
        self.similarity = best
        self.index = torch.minimum(kept, index)


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
class _ScreenInputs:
    """What the bfloat16 screen reads: the queries and the keys with their validity."""

    unit_queries: Tensor  # (n, D) float32
    keys: Tensor  # (M, D) raw keys (rescoring reads them in float32)
    key_mask: Tensor | None  # (M,) bool
    screen_keys: Tensor | None  # (M, D) bfloat16 unit keys, or None to normalise chunk by chunk


@dataclass
class _ScreenScores:
    """Maxima of the screened scores per block of ``SCREEN_BLOCK`` keys and per group of ``SCREEN_GROUP`` blocks.

    Keys past ``M`` (padding up to a whole group) and invalid keys count as ``-inf``.
    """

    block_max: Tensor  # (G * group, n) bfloat16
    group_max: Tensor  # (G, n) bfloat16


def _screen_scores(inputs: _ScreenInputs, chunk_size: int) -> _ScreenScores:
    """bfloat16 products of all keys with all queries, reduced to block and group maxima (pass 1).

    Only ``(c, n)`` scores exist at a time (``c = chunk_size``, a multiple of the group's keys); chunks
    with no valid key are skipped.
    """
    keys, num_queries = inputs.keys, inputs.unit_queries.shape[0]
    num_keys, group_keys = keys.shape[0], SCREEN_BLOCK * SCREEN_GROUP
    query_bf16 = inputs.unit_queries.bfloat16().T  # (D, n)
    num_groups = -(-num_keys // group_keys)
    block_max = query_bf16.new_empty((num_groups * SCREEN_GROUP, num_queries))
    group_max = query_bf16.new_empty((num_groups, num_queries))
    scores = query_bf16.new_empty((min(chunk_size, num_groups * group_keys), num_queries))
    buffer_rows = scores.shape[0] if inputs.screen_keys is None else 0  # normalised chunks go there
    unit_buffer = query_bf16.new_empty((buffer_rows, keys.shape[1]))
    starts = list(range(0, num_keys, chunk_size))
    invalid, bounds = _invalid_keys_per_chunk(keys, inputs.key_mask, starts)
    for chunk, start in enumerate(starts):
        stop = min(start + chunk_size, num_keys)
        padded = -(-(stop - start) // group_keys) * group_keys
        blocks = block_max[start // SCREEN_BLOCK : (start + padded) // SCREEN_BLOCK]
        groups = group_max[start // group_keys : (start + padded) // group_keys]
        chunk_invalid = invalid[bounds[chunk] : bounds[chunk + 1]]
        if chunk_invalid.numel() == stop - start:
            blocks.fill_(-math.inf)
            groups.fill_(-math.inf)
            continue
        if inputs.screen_keys is not None:
            unit_keys = inputs.screen_keys[start:stop]
        else:
            unit_keys = normalize_to_bfloat16(keys[start:stop], out=unit_buffer[: stop - start])
        chunk_scores = torch.mm(unit_keys, query_bf16, out=scores[: stop - start])  # (c, n), float32 accumulation
        if chunk_invalid.numel():
            chunk_scores.index_fill_(0, chunk_invalid - start, -math.inf)
        scores[stop - start : padded].fill_(-math.inf)
        torch.amax(scores[:padded].view(-1, SCREEN_BLOCK, num_queries), 1, out=blocks)
        torch.amax(blocks.view(-1, SCREEN_GROUP, num_queries), 1, out=groups)
    return _ScreenScores(block_max, group_max)


def _screened_search(
    unit_queries: Tensor, keys: Tensor, key_mask: Tensor | None, chunk_size: int, screen_keys: Tensor | None
) -> tuple[Tensor, Tensor]:
    """bfloat16 screen of all keys, then float32 rescoring of the keys that can be the maximum (exact result).

    Pass 1 keeps the screened maximum of every block of ``SCREEN_BLOCK`` keys. Pass 2 rescores the
    screen's best block of each query, which gives the threshold of :func:`_screening_threshold`, then
    every block whose screened maximum reaches it (found through the group maxima).
    """
    best = _RunningBest.empty(unit_queries)
    if keys.shape[0] == 0 or (key_mask is not None and not bool(key_mask.any())):
        return best.similarity, best.index
    group_keys = SCREEN_BLOCK * SCREEN_GROUP
    inputs = _ScreenInputs(unit_queries, keys, key_mask, screen_keys)
    screened = _screen_scores(inputs, -(-chunk_size // group_keys) * group_keys)
    screen_max, top_group = screened.group_max.max(dim=0)  # (n,)
    all_queries = torch.arange(unit_queries.shape[0], device=unit_queries.device)
    _rescore_blocks(inputs, best, _top_blocks(screened, top_group), all_queries)
    threshold = _screening_threshold(best.similarity, screen_max.float(), screening_margin(unit_queries))
    group, query = (screened.group_max.float() >= threshold).nonzero(as_tuple=True)  # (Pg,) group-major
    step = max(1, CANDIDATE_BATCH // SCREEN_GROUP)
    for start in range(0, group.numel(), step):
        batch = slice(start, start + step)
        _rescore_candidate_groups(inputs, screened, best, threshold, group[batch], query[batch])
    return best.similarity, best.index


def _screening_threshold(best: Tensor, screen_max: Tensor, margin: Tensor) -> Tensor:
    """``(n,)`` screened score a key needs to possibly be the float32 argmax.

    With ``m`` the margin, ``beta`` the screen error and ``g = gamma_D N^2`` (see :func:`screening_margin`):
    the float32 argmax ``k*`` has ``s(k*) >= r(k*) - g - beta``, and ``r(k*) >= r(j)`` for every key ``j``.
    Taking for ``j`` the best rescored key (``r(j) >= best - 2 g``) gives ``s(k*) >= best - m``; taking the
    screen's argmax (``r(j) >= s_max - beta - g``) gives ``s(k*) >= s_max - 2 m``.
    """
    return torch.maximum(best, screen_max - margin) - margin


def _group_blocks(group: Tensor) -> Tensor:
    """``(P, SCREEN_GROUP)`` blocks of the given groups."""
    return group[:, None] * SCREEN_GROUP + torch.arange(SCREEN_GROUP, device=group.device)


def _top_blocks(screened: _ScreenScores, top_group: Tensor) -> Tensor:
    """``(n,)`` block holding each query's largest screened score, within its top group."""
    rows = _group_blocks(top_group)  # (n, group)
    values = screened.block_max[rows, torch.arange(rows.shape[0], device=rows.device)[:, None]]
    return rows.gather(1, values.argmax(1, keepdim=True)).squeeze(1)


def _rescore_candidate_groups(
    inputs: _ScreenInputs, screened: _ScreenScores, best: _RunningBest, threshold: Tensor, group: Tensor, query: Tensor
) -> None:
    """Rescore the blocks of some (group, query) pairs whose screened maximum reaches the threshold.

    A group with so many candidate blocks that rescoring them one by one would cost more than a float32
    product of the whole group with its queries is rescored by that product.
    """
    rows = _group_blocks(group)  # (Pg, group)
    pair, offset = (screened.block_max[rows, query[:, None]].float() >= threshold[query][:, None]).nonzero(
        as_tuple=True
    )  # (P,)
    block, block_query, block_group = rows[pair, offset], query[pair], group[pair]
    groups, queries_per_group = torch.unique_consecutive(group, return_counts=True)
    blocks_per_group = torch.bincount(block_group - groups[0], minlength=int(groups[-1] - groups[0]) + 1)
    group_keys = SCREEN_BLOCK * SCREEN_GROUP
    dense = blocks_per_group[groups - groups[0]] * SCREEN_BLOCK * RESCORE_COST_RATIO > queries_per_group * group_keys
    if bool(dense.any()):
        for dense_group in groups[dense].tolist():
            _rescore_keys_dense(inputs, best, dense_group * group_keys, query[group == dense_group])
        light = ~torch.isin(block_group, groups[dense])
        block, block_query = block[light], block_query[light]
    _rescore_blocks(inputs, best, block, block_query)


def _rescore_blocks(inputs: _ScreenInputs, best: _RunningBest, block: Tensor, query: Tensor) -> None:
    """Float32 similarities of each query with the keys of its block, merged into the running best.

    Blocks go by batches of ``RESCORE_BATCH`` so that the gathered keys stay small (and in cache).
    """
    keys, key_mask, num_keys = inputs.keys, inputs.key_mask, inputs.keys.shape[0]
    offsets = torch.arange(SCREEN_BLOCK, device=block.device)
    for start in range(0, block.numel(), RESCORE_BATCH):
        batch = slice(start, start + RESCORE_BATCH)
        rows = (block[batch, None] * SCREEN_BLOCK + offsets).clamp_max(num_keys - 1)  # (p, block)
        raw = keys.index_select(0, rows.flatten()).view(*rows.shape, -1).float()  # (p, block, D)
        unit_keys = raw.div_(raw.norm(2, -1, keepdim=True).clamp_min_(NORMALIZE_EPS))  # as F.normalize, bit for bit
        similarity = torch.bmm(unit_keys, inputs.unit_queries[query[batch], :, None]).squeeze(2)  # (p, block)
        if key_mask is not None:
            similarity.masked_fill_(~key_mask[rows], -math.inf)
        block_best, offset = similarity.max(dim=1)  # first (smallest) row on ties
        best.merge(query[batch], rows.gather(1, offset[:, None]).squeeze(1), block_best)


def _rescore_keys_dense(inputs: _ScreenInputs, best: _RunningBest, start: int, query: Tensor) -> None:
    """Float32 similarities of one group's keys for some queries (when most of its blocks are candidates)."""
    stop = min(start + SCREEN_BLOCK * SCREEN_GROUP, inputs.keys.shape[0])
    unit_keys = F.normalize(inputs.keys[start:stop].float(), dim=1, eps=NORMALIZE_EPS)
    similarity = inputs.unit_queries[query] @ unit_keys.T  # (q, group keys)
    if inputs.key_mask is not None:
        similarity.masked_fill_(~inputs.key_mask[start:stop], -math.inf)
    group_best, argmax = similarity.max(dim=1)  # first (smallest) key on ties
    best.merge(query, start + argmax, group_best)


def _invalid_keys_per_chunk(keys: Tensor, key_mask: Tensor | None, starts: list[int]) -> tuple[Tensor, list[int]]:
    """Sorted ``(I,)`` indices of the invalid keys and, per chunk, the bounds of its slice of them."""
    if key_mask is None:
        return torch.empty(0, dtype=torch.int64, device=keys.device), [0] * (len(starts) + 1)
    invalid = (~key_mask).nonzero().squeeze(1)
    edges = torch.tensor([*starts, keys.shape[0]], dtype=torch.int64, device=invalid.device)
    return invalid, torch.searchsorted(invalid, edges).tolist()


class BankKeys:
    """The bfloat16 unit keys of a memory bank, kept between searches (derived state, never saved).

    ``F.normalize`` of each stored object in float32, rounded to bfloat16, laid out as the bank's
    :meth:`~cribo.memory.ObjectMemoryBank.flat_view` (stale slots included): ``V * M * D * 2`` bytes, half the bank.
    The owner keeps them true to the bank: :meth:`update` after each push (the written rows only), :meth:`clear`
    after any other change of the bank (a loaded checkpoint, an edit by hand); the next :meth:`view` rebuilds them.
    """

    def __init__(self) -> None:
        self.values: Tensor | None = None  # (V, Q, K, D) bfloat16, or None until the first view()

    def view(self, bank: ObjectMemoryBank, view: int) -> Tensor:
        """``(M, D)`` bfloat16 unit keys of one view of ``bank`` (built at the first call or after :meth:`clear`)."""
        values = self.values
        if values is None or values.shape != bank.objects.shape or values.device != bank.objects.device:
            values = self.values = self._build(bank)
        return values[view].view(bank.capacity * bank.max_objects_per_image, bank.dim)

    @torch.no_grad()
    def update(self, bank: ObjectMemoryBank, pushed: PushedSlots) -> None:
        """Bring the keys in step with ``bank`` after a push that wrote ``pushed`` (nothing to do before a build)."""
        if self.values is None or pushed.slots.numel() == 0:
            return
        written = bank.objects[:, pushed.slots, pushed.ranks]  # (V, n, D)
        unit = normalize_to_bfloat16(written.reshape(-1, bank.dim)).view(written.shape)
        self.values[:, pushed.slots, pushed.ranks] = unit

    def clear(self) -> None:
        """Forget the keys (the bank changed other than by a push); the next :meth:`view` rebuilds them."""
        self.values = None

    @staticmethod
    @torch.no_grad()
    def _build(bank: ObjectMemoryBank) -> Tensor:
        """Normalise all stored objects into a new bfloat16 copy, chunk by chunk."""
        values = torch.empty_like(bank.objects, dtype=torch.bfloat16)
        rows, out = bank.objects.view(-1, bank.dim), values.view(-1, bank.dim)
        for start in range(0, rows.shape[0], UNIT_KEYS_CHUNK):
            normalize_to_bfloat16(rows[start : start + UNIT_KEYS_CHUNK], out[start : start + UNIT_KEYS_CHUNK])
        return values
