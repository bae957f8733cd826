"""Tests of cribo.matching: exact chunked/screened search against a dense float32 search, cycle consistency, parity."""

from __future__ import annotations

import math
from pathlib import Path
from typing import cast

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from conftest import load_fixture
from cribo.matching import (
    FP32_UNIT_ROUNDOFF,
    MIN_KEYS_TO_SCREEN,
    Screening,
    match_objects,
    nearest_neighbours,
    screening_margin,
)
from cribo.memory import ObjectMemoryBank, normalize_to_bfloat16

SCREENINGS: list[Screening] = ["none", "bf16"]


def dense_nearest_neighbours(
    queries: Tensor, keys: Tensor, key_mask: Tensor | None = None, normalize_keys: bool = True
) -> tuple[Tensor, Tensor]:
    """Reference: the full (n, M) float32 similarity matrix, masked, then argmax (first index on ties)."""
    unit_queries = F.normalize(queries.float(), dim=1)
    unit_keys = F.normalize(keys.float(), dim=1) if normalize_keys else keys.float()
    if key_mask is None:
        key_mask = torch.ones(keys.shape[0], dtype=torch.bool)
    if not bool(key_mask.any()):
        return torch.full((queries.shape[0],), -math.inf), torch.full((queries.shape[0],), -1)
    similarity = (unit_queries @ unit_keys.T).masked_fill(~key_mask, -math.inf)
    return similarity.max(dim=1)


def make_data(kind: str, num_queries: int, num_keys: int, dim: int, seed: int) -> tuple[Tensor, Tensor]:
    """Queries and keys of several difficulties for an exact search."""
    generator = torch.Generator().manual_seed(seed)
    if kind == "gaussian":
        return torch.randn(num_queries, dim, generator=generator), torch.randn(num_keys, dim, generator=generator)
    if kind == "uniform":  # the authors' initial bank: all similarities within a few hundredths
        return torch.rand(num_queries, dim, generator=generator), torch.rand(num_keys, dim, generator=generator)
    keys = torch.randn(num_keys, dim, generator=generator)
    if kind == "near_duplicates":  # queries close to stored keys, second best far below
        picks = torch.randint(0, num_keys, (num_queries,), generator=generator)
        return keys[picks] + 0.05 * torch.randn(num_queries, dim, generator=generator), keys
    if kind == "clustered":  # many keys within the screening margin of the best one
        centres = torch.randn(4, dim, generator=generator)
        keys = centres[torch.randint(0, 4, (num_keys,), generator=generator)] + 0.01 * keys
        return centres[torch.randint(0, 4, (num_queries,), generator=generator)], keys
    if kind == "ties":  # exact duplicates: the first index must win
        keys = keys[torch.randint(0, max(num_keys // 8, 1), (num_keys,), generator=generator)]
        return keys[torch.randint(0, num_keys, (num_queries,), generator=generator)] * 2.0, keys
    raise ValueError(kind)


@pytest.mark.parametrize("screening", SCREENINGS)
@pytest.mark.parametrize("chunk_size", [1, 7, 60, 61, 1000])
def test_chunked_search_equals_dense(screening: Screening, chunk_size: int) -> None:
    queries, keys = make_data("gaussian", 9, 61, 12, seed=chunk_size)
    key_mask = torch.rand(61, generator=torch.Generator().manual_seed(0)) > 0.3
    for mask in (None, key_mask):
        best, index = nearest_neighbours(queries, keys, mask, chunk_size, screening=screening)
        expected_best, expected_index = dense_nearest_neighbours(queries, keys, mask)
        assert index.dtype == torch.int64 and best.dtype == torch.float32
        assert torch.equal(index, expected_index)
        torch.testing.assert_close(best, expected_best, atol=1e-6, rtol=0)


@pytest.mark.parametrize("chunk_size", [512, 2000])
@pytest.mark.parametrize("num_queries", [1, 40])
@pytest.mark.parametrize("kind", ["gaussian", "uniform", "near_duplicates", "clustered", "ties"])
def test_screened_search_equals_dense(kind: str, num_queries: int, chunk_size: int) -> None:
    queries, keys = make_data(kind, num_queries, 6000, 64, seed=1)
    key_mask = torch.ones(keys.shape[0], dtype=torch.bool)
    key_mask[1000:2500] = False  # whole chunks invalid
    key_mask[7::3] = False
    expected_best, expected_index = dense_nearest_neighbours(queries, keys, key_mask)
    for screen_keys in (None, normalize_to_bfloat16(keys)):
        best, index = nearest_neighbours(
            queries, keys, key_mask, chunk_size=chunk_size, screening="bf16", screen_keys=screen_keys
        )
        assert torch.equal(index, expected_index)
        torch.testing.assert_close(best, expected_best, atol=1e-6, rtol=0)


def test_auto_screening_on_a_large_bank_equals_dense() -> None:
    queries, keys = make_data("near_duplicates", 16, MIN_KEYS_TO_SCREEN, 32, seed=2)
    best, index = nearest_neighbours(queries, keys)
    expected_best, expected_index = dense_nearest_neighbours(queries, keys)
    assert torch.equal(index, expected_index)
    torch.testing.assert_close(best, expected_best, atol=1e-6, rtol=0)


def test_screened_search_with_all_keys_tied() -> None:
    """Every key is a candidate: the chunk is rescored with one float32 product; the first index wins."""
    keys = torch.randn(1, 16).expand(5000, 16).clone()
    keys[3000] *= 2.0  # same direction: still a tie in cosine
    queries = torch.randn(5, 16)
    for screening in SCREENINGS:
        _, index = nearest_neighbours(queries, keys, chunk_size=1024, screening=screening)
        assert torch.equal(index, dense_nearest_neighbours(queries, keys)[1])
        assert torch.equal(index, torch.zeros(5, dtype=torch.int64))


@pytest.mark.parametrize("screening", SCREENINGS)
def test_keys_closer_than_float32_resolution(screening: Screening) -> None:
    """All keys within 1e-5 of one direction: bfloat16 cannot tell them apart and float32 barely can.

    Any order of the float32 sums may then pick another near-tied key (the chunked float32 search as
    well); the guarantee is that the chosen key is within float32 rounding of the dense maximum.
    """
    generator = torch.Generator().manual_seed(4)
    keys = torch.randn(1, 32, generator=generator) + 1e-5 * torch.randn(3000, 32, generator=generator)
    queries = keys[:20] + 1e-6 * torch.randn(20, 32, generator=generator)
    _, index = nearest_neighbours(queries, keys, chunk_size=256, screening=screening)
    similarity = F.normalize(queries, dim=1) @ F.normalize(keys, dim=1).T
    chosen = similarity.gather(1, index[:, None]).squeeze(1)
    assert bool((chosen >= similarity.max(dim=1).values - 1e-6).all())


@pytest.mark.parametrize("dim", [3, 64, 384, 1000])
@pytest.mark.parametrize("num_queries", [1, 33])
def test_bf16_product_error_is_within_the_screening_margin(dim: int, num_queries: int) -> None:
    """The assumption behind the screen on this platform: float32 accumulation, output rounded once."""
    generator = torch.Generator().manual_seed(dim)
    unit_queries = F.normalize(torch.randn(num_queries, dim, generator=generator), dim=1)
    keys = torch.cat(
        [
            unit_queries,  # similarity 1: the largest output rounding
            -unit_queries,
            unit_queries + 1e-3 * torch.randn(num_queries, dim, generator=generator),
            torch.rand(300, dim, generator=generator),
            torch.randn(301, dim, generator=generator) * torch.logspace(-6, 2, dim),  # wide dynamic range
        ]
    )
    unit_keys = F.normalize(keys, dim=1)
    screened = (unit_keys.bfloat16() @ unit_queries.bfloat16().T).float()  # (M, n) as in the search
    exact = unit_keys.double() @ unit_queries.double().T
    gamma = dim * FP32_UNIT_ROUNDOFF / (1 - dim * FP32_UNIT_ROUNDOFF)
    beta = screening_margin(unit_queries).double() - 3 * gamma * 1.01**2
    assert bool(((screened.double() - exact).abs() <= beta[None, :]).all())


def test_no_valid_key_gives_minus_one() -> None:
    queries, keys = make_data("gaussian", 4, 20, 8, seed=0)
    for screening in SCREENINGS:
        for mask_keys, mask in ((keys, torch.zeros(20, dtype=torch.bool)), (keys[:0], None)):
            best, index = nearest_neighbours(queries, mask_keys, mask, screening=screening)
            assert torch.equal(index, torch.full((4,), -1)) and bool(torch.isneginf(best).all())


def test_zero_queries_and_raw_keys() -> None:
    queries, keys = make_data("gaussian", 0, 20, 8, seed=0)
    best, index = nearest_neighbours(queries, keys, screening="bf16")
    assert best.shape == (0,) and index.shape == (0,)
    queries, keys = make_data("gaussian", 6, 50, 8, seed=0)
    _, index = nearest_neighbours(queries, keys, normalize_keys=False, chunk_size=16)
    assert torch.equal(index, dense_nearest_neighbours(queries, keys, normalize_keys=False)[1])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("screening", SCREENINGS)
def test_half_precision_queries_are_searched_in_float32(dtype: torch.dtype, screening: Screening) -> None:
    queries, keys = make_data("near_duplicates", 16, 400, 32, seed=3)
    queries = queries.to(dtype)
    best, index = nearest_neighbours(queries, keys, chunk_size=64, screening=screening)
    expected_best, expected_index = dense_nearest_neighbours(queries.float(), keys)
    assert best.dtype == torch.float32 and torch.equal(index, expected_index)
    torch.testing.assert_close(best, expected_best, atol=1e-6, rtol=0)


def test_search_rejects_bad_input() -> None:
    queries, keys = torch.zeros(2, 4), torch.zeros(5, 4)
    with pytest.raises(ValueError, match="must share D"):
        nearest_neighbours(queries, torch.zeros(5, 3))
    with pytest.raises(ValueError, match=r"key_mask must be a bool tensor of shape \(5,\)"):
        nearest_neighbours(queries, keys, torch.ones(5))
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        nearest_neighbours(queries, keys, chunk_size=0)
    with pytest.raises(ValueError, match="screening must be one of"):
        nearest_neighbours(queries, keys, screening=cast(Screening, "fp8"))
    with pytest.raises(ValueError, match="only exact on CPU"):
        nearest_neighbours(queries.to("meta"), keys.to("meta"), screening="bf16")
    with pytest.raises(ValueError, match=r"screen_keys must be bfloat16 with the keys' shape \(5, 4\)"):
        nearest_neighbours(queries, keys, screen_keys=keys)
    with pytest.raises(ValueError, match="screen_keys must be bfloat16"):
        nearest_neighbours(queries, keys, screen_keys=keys[:4].bfloat16())


# --------------------------------------------------------------------------- match_objects


def bank_from_views(view_entries: list[Tensor], max_objects_per_image: int = 1) -> ObjectMemoryBank:
    """A bank holding one object per image, position p = slot p; view_entries[v] is (Q, D)."""
    queue = torch.stack(view_entries)
    counts = torch.ones(queue.shape[1], dtype=torch.int64)
    return ObjectMemoryBank.from_authors_layout(queue, counts, max_objects_per_image)


@pytest.mark.parametrize("screening", SCREENINGS)
def test_hand_computed_cycles(screening: Screening) -> None:
    bank = bank_from_views([torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[1.0, 0.0], [1.0, 0.1]])])
    objects = torch.tensor([[[1.0, 0.1], [1.0, 0.0]], [[0.1, 1.0], [0.0, 1.0]]])  # (n=2, V=2, D=2)
    matches = match_objects(objects, bank, screening=screening)
    assert torch.equal(matches.index, torch.tensor([[0, 1], [0, 1]]))
    # view 1 -> slot 1 -> its view-2 entry (1, 0.1) returns to object 0, not 1
    assert torch.equal(matches.cycle_mask, torch.tensor([[True, False], [True, True]]))
    assert torch.equal(matches.neighbours, torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[1.0, 0.0], [1.0, 0.1]]]))


@pytest.mark.parametrize("screening", SCREENINGS)
def test_nn_retrieval_parity(reference: Path, screening: Screening) -> None:
    """Three consecutive authors' calls: search, cycle masks, indices, then our push carries the state."""
    fixture = load_fixture(reference, "nn_retrieval.pt")
    bank: ObjectMemoryBank | None = None
    for call in fixture["calls"]:
        if bank is None:
            bank = ObjectMemoryBank.from_authors_layout(
                call["centroids_queue_before"], call["cpv_queue_before"], fixture["n_tokens"]
            )
        objects = torch.stack([call["teacher_centroids_v1"], call["teacher_centroids_v2"]], dim=1)
        matches = match_objects(objects, bank, screening=screening)
        expected = [
            (call["nn"], call["bootstrap_centroid_mask"], call["centroids_indices_knn_local1"]),
            (call["nn2"], call["bootstrap_centroid_mask2"], call["centroids_indices_knn_local2"]),
        ]
        for view, (neighbours, mask, index) in enumerate(expected):
            retrieved = torch.stack([bank.lookup(v, matches.index[view]) for v in range(2)])
            torch.testing.assert_close(retrieved, neighbours, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(matches.neighbours[view], neighbours[view], atol=1e-5, rtol=1e-5)
            assert torch.equal(matches.cycle_mask[view], mask)
            assert torch.equal(bank.authors_index(matches.index[view]), index)
        bank.push(objects, call["centroids_per_view"])
        queue, counts = bank.to_authors_layout()
        live = int(call["cpv_queue_after"].sum())
        assert torch.equal(counts, call["cpv_queue_after"])
        torch.testing.assert_close(queue[:, :live], call["centroids_queue_after"][:, :live], atol=1e-5, rtol=1e-5)


def random_bank_and_objects(seed: int, num_objects: int = 24) -> tuple[ObjectMemoryBank, Tensor]:
    """A bank with ragged counts holding noisy copies of the batch's objects, so that some cycles close."""
    generator = torch.Generator().manual_seed(seed)
    bank = ObjectMemoryBank(40, 4, 16, generator=generator)
    objects = torch.randn(num_objects, 2, 16, generator=generator)
    for _ in range(6):
        counts = torch.randint(0, 5, (5,), generator=generator)
        picks = torch.randint(0, num_objects, (int(counts.sum()),), generator=generator)
        bank.push(objects[picks] + 0.3 * torch.randn(len(picks), 2, 16, generator=generator), counts)
    return bank, objects


def swapped_views(bank: ObjectMemoryBank) -> ObjectMemoryBank:
    swapped = ObjectMemoryBank(bank.capacity, bank.max_objects_per_image, bank.dim)
    state = bank.state_dict()
    swapped.load_state_dict({**state, "objects": state["objects"].flip(0)})
    return swapped


@pytest.mark.parametrize("screening", SCREENINGS)
def test_cycle_consistency_is_symmetric_under_swapping_views(screening: Screening) -> None:
    bank, objects = random_bank_and_objects(seed=5)
    matches = match_objects(objects, bank, screening=screening)
    assert 0 < int(matches.cycle_mask.sum()) < matches.cycle_mask.numel()  # the test sees both outcomes
    mirrored = match_objects(objects.flip(1), swapped_views(bank), screening=screening)
    assert torch.equal(mirrored.cycle_mask, matches.cycle_mask.flip(0))
    assert torch.equal(mirrored.index, matches.index.flip(0))
    assert torch.equal(mirrored.neighbours, matches.neighbours.flip(0))


def test_matches_follow_their_definition() -> None:
    """neighbours are raw stored entries; the mask is the dense cycle check; the bank is left untouched."""
    bank, objects = random_bank_and_objects(seed=6)
    before = bank.to_authors_layout()
    matches = match_objects(objects, bank)
    for view in range(2):
        keys, valid = bank.flat_view(view)
        _, index = dense_nearest_neighbours(objects[:, view], keys, valid)
        assert torch.equal(matches.index[view], index)
        assert torch.equal(matches.neighbours[view], keys[index])
        _, back = dense_nearest_neighbours(bank.lookup(1 - view, index), objects[:, 1 - view])
        assert torch.equal(matches.cycle_mask[view], back == torch.arange(len(objects)))
    assert all(torch.equal(a, b) for a, b in zip(before, bank.to_authors_layout()))


@pytest.mark.parametrize("screening", SCREENINGS)
def test_empty_bank_gives_no_match(screening: Screening) -> None:
    bank = ObjectMemoryBank(3, 2, 8)
    bank.counts.zero_()
    objects = torch.randn(5, 2, 8)
    matches = match_objects(objects, bank, screening=screening)
    assert torch.equal(matches.index, torch.full((2, 5), -1))
    assert not bool(matches.cycle_mask.any())
    assert torch.equal(matches.neighbours, torch.zeros(2, 5, 8))


def test_batch_of_one_image_and_of_one_object() -> None:
    bank, objects = random_bank_and_objects(seed=7)
    one_image = match_objects(objects[:3], bank)
    assert one_image.neighbours.shape == (2, 3, 16) and one_image.cycle_mask.shape == (2, 3)
    one_object = match_objects(objects[:1], bank)
    assert bool(one_object.cycle_mask.all())  # the way back has a single object to land on
    assert torch.equal(one_object.index, one_image.index[:, :1])
    no_object = match_objects(objects[:0], bank)
    assert no_object.neighbours.shape == (2, 0, 16) and no_object.index.shape == (2, 0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_objects(dtype: torch.dtype) -> None:
    bank, objects = random_bank_and_objects(seed=8)
    half = objects.to(dtype)
    matches, expected = match_objects(half, bank), match_objects(half.float(), bank)
    assert matches.neighbours.dtype == torch.float32
    assert torch.equal(matches.index, expected.index) and torch.equal(matches.cycle_mask, expected.cycle_mask)


def test_match_objects_rejects_bad_input() -> None:
    bank = ObjectMemoryBank(3, 2, 8)
    with pytest.raises(ValueError, match=r"objects must have shape \(n, 2, D=8\)"):
        match_objects(torch.zeros(4, 2, 7), bank)
    with pytest.raises(ValueError, match="bank must have 2 views"):
        match_objects(torch.zeros(4, 2, 8), ObjectMemoryBank(3, 2, 8, num_views=3))


def test_search_and_push_cycles_with_the_banks_screening_keys() -> None:
    """The bank's bfloat16 unit keys, updated by push, screen as exactly as keys normalised at every call."""
    generator = torch.Generator().manual_seed(9)
    bank = ObjectMemoryBank(300, 8, 24, generator=generator)  # the authors' uniform start, then pushed batches
    plain = ObjectMemoryBank(300, 8, 24)
    plain.load_state_dict(bank.state_dict())
    for _ in range(6):
        counts = torch.randint(0, 9, (20,), generator=generator)
        objects = torch.randn(int(counts.sum()), 2, 24, generator=generator)
        screened = match_objects(objects, bank, chunk_size=1024, screening="bf16")
        expected = match_objects(objects, plain, chunk_size=1024, screening="none")
        assert torch.equal(screened.index, expected.index)
        assert torch.equal(screened.cycle_mask, expected.cycle_mask)
        assert torch.equal(screened.neighbours, expected.neighbours)
        for each in (bank, plain):
            each.push(objects, counts)
    for view in range(2):
        screen_keys = bank.screen_keys(view)
        assert screen_keys is not None and torch.equal(screen_keys, normalize_to_bfloat16(bank.flat_view(view)[0]))
