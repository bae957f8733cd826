"""Tests of cribo.search: exact chunked/screened search against a dense float32 search; the bank's kept keys."""

from __future__ import annotations

from typing import cast

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from conftest import dense_nearest_neighbours
from cribo.memory import ObjectMemoryBank
from cribo.search import (
    FP32_UNIT_ROUNDOFF,
    MIN_KEYS_TO_SCREEN,
    BankKeys,
    Screening,
    nearest_neighbours,
    normalize_to_bfloat16,
    screening_margin,
)

SCREENINGS: list[Screening] = ["none", "bf16"]


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


# --------------------------------------------------------------------------- the bank's bfloat16 screening keys


def random_batch(generator: torch.Generator, num_images: int, max_objects: int, dim: int) -> tuple[Tensor, Tensor]:
    """Objects (n, 2, D) and counts (B,) in [0, K] with a fixed seed."""
    counts = torch.randint(0, max_objects + 1, (num_images,), generator=generator)
    objects = torch.randn(int(counts.sum()), 2, dim, generator=generator)
    return objects, counts


def assert_keys_follow_objects(keys: BankKeys, bank: ObjectMemoryBank) -> None:
    """Each view's screening keys equal the bfloat16 rounding of F.normalize of the stored objects, stale slots too."""
    for view in range(bank.num_views):
        stored, _ = bank.flat_view(view)
        screen_keys = keys.view(bank, view)
        assert screen_keys.dtype == torch.bfloat16
        expected = torch.nn.functional.normalize(stored, dim=1).bfloat16()
        assert torch.equal(screen_keys, expected)
        assert torch.equal(screen_keys, normalize_to_bfloat16(stored))


def test_bank_keys_are_updated_after_push_without_a_rebuild(monkeypatch: pytest.MonkeyPatch) -> None:
    generator = torch.Generator().manual_seed(4)
    bank, keys = ObjectMemoryBank(6, 3, 8, generator=generator), BankKeys()
    assert_keys_follow_objects(keys, bank)
    screen_keys = keys.view(bank, 0)
    storage = screen_keys.data_ptr()

    def no_rebuild(bank: ObjectMemoryBank) -> Tensor:
        raise AssertionError("update must write the pushed rows in place, not rebuild the keys")

    monkeypatch.setattr(BankKeys, "_build", staticmethod(no_rebuild))
    for _ in range(5):  # wraps around the ring; ragged counts leave stale slots
        keys.update(bank, bank.push(*random_batch(generator, 4, 3, 8)))
        assert_keys_follow_objects(keys, bank)
    objects, counts = random_batch(generator, 2, 3, 8)
    keys.update(bank, bank.push(objects.half(), counts))  # stored (and normalised) in float32
    assert_keys_follow_objects(keys, bank)
    assert torch.equal(screen_keys, normalize_to_bfloat16(bank.flat_view(0)[0]))  # the same tensor, kept in step
    assert screen_keys.data_ptr() == storage


def test_bank_keys_follow_a_cleared_change_of_the_objects() -> None:
    generator = torch.Generator().manual_seed(5)
    bank, keys = ObjectMemoryBank(5, 4, 6, generator=generator), BankKeys()
    assert_keys_follow_objects(keys, bank)
    other = ObjectMemoryBank(5, 4, 6, generator=generator)
    bank.load_state_dict(other.state_dict())
    keys.clear()  # the owner's duty after any change other than a push
    assert torch.equal(bank.objects, other.objects)
    assert_keys_follow_objects(keys, bank)
    bank.objects = torch.randn(2, 6, 4, 6, generator=generator)  # another shape: rebuilt without a clear
    bank.counts = torch.full((6,), 4, dtype=torch.int32)
    assert_keys_follow_objects(keys, bank)
    keys.update(bank, bank.push(*random_batch(generator, 3, 4, 6)))
    assert_keys_follow_objects(keys, bank)


def test_bank_keys_are_not_saved_and_an_empty_push_changes_nothing() -> None:
    generator = torch.Generator().manual_seed(6)
    bank, keys = ObjectMemoryBank(4, 3, 5, generator=generator), BankKeys()
    keys.update(bank, bank.push(*random_batch(generator, 3, 3, 5)))  # before any view: nothing to update
    assert keys.values is None
    assert_keys_follow_objects(keys, bank)
    assert set(bank.state_dict()) == {"objects", "counts", "head"}
    keys.update(bank, bank.push(torch.zeros(0, 2, 5), torch.zeros(0, dtype=torch.int64)))
    assert_keys_follow_objects(keys, bank)


def test_bank_keys_of_an_authors_layout_import() -> None:
    generator = torch.Generator().manual_seed(7)
    bank = ObjectMemoryBank(5, 4, 3, generator=generator)
    for _ in range(3):
        bank.push(*random_batch(generator, 2, 4, 3))
    rebuilt, keys = ObjectMemoryBank.from_authors_layout(*bank.to_authors_layout(), 4), BankKeys()
    assert_keys_follow_objects(keys, rebuilt)
    keys.update(rebuilt, rebuilt.push(*random_batch(generator, 3, 4, 3)))
    assert_keys_follow_objects(keys, rebuilt)


def test_auto_screens_only_where_bfloat16_products_pay(monkeypatch: pytest.MonkeyPatch) -> None:
    from cribo import search

    queries, keys = torch.randn(4, 8), torch.randn(MIN_KEYS_TO_SCREEN, 8)
    decision = search.bfloat16_matmul_pays()
    assert isinstance(decision, bool) and search.bfloat16_matmul_pays() is decision  # timed once per process
    for pays in (True, False):
        monkeypatch.setattr(search, "bfloat16_matmul_pays", lambda pays=pays: pays)
        assert search.use_screening("auto", queries, keys) is pays
        assert search.use_screening("bf16", queries, keys)  # asked for explicitly: always
        assert not search.use_screening("auto", queries, keys[:100])  # a small bank is never screened
