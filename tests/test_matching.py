"""Tests of cribo.matching: cycle consistency, the cross-image entries, parity with the authors' retrieval."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import Tensor

from conftest import dense_nearest_neighbours, load_fixture
from cribo.matching import cross_image_entries, match_objects
from cribo.memory import ObjectMemoryBank
from cribo.search import BankKeys, Screening, normalize_to_bfloat16

SCREENINGS: list[Screening] = ["none", "bf16"]


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
    """The bank's bfloat16 unit keys, updated after each push, screen as exactly as keys normalised at every call."""
    generator = torch.Generator().manual_seed(9)
    bank = ObjectMemoryBank(300, 8, 24, generator=generator)  # the authors' uniform start, then pushed batches
    keys = BankKeys()
    plain = ObjectMemoryBank(300, 8, 24)
    plain.load_state_dict(bank.state_dict())
    for _ in range(6):
        counts = torch.randint(0, 9, (20,), generator=generator)
        objects = torch.randn(int(counts.sum()), 2, 24, generator=generator)
        screened = match_objects(objects, bank, chunk_size=1024, screening="bf16", keys=keys)
        expected = match_objects(objects, plain, chunk_size=1024, screening="none")
        assert torch.equal(screened.index, expected.index)
        assert torch.equal(screened.cycle_mask, expected.cycle_mask)
        assert torch.equal(screened.neighbours, expected.neighbours)
        keys.update(bank, bank.push(objects, counts))
        plain.push(objects, counts)
    for view in range(2):
        assert torch.equal(keys.view(bank, view), normalize_to_bfloat16(bank.flat_view(view)[0]))


@pytest.mark.parametrize("normalization", ["per_view", "view1"])
def test_cross_image_entries_follow_the_mask(normalization: str) -> None:
    mask = torch.tensor([[True, False, True, True], [False, True, False, False]])
    entries = cross_image_entries(mask, normalization)  # type: ignore[arg-type]
    order, rows, weights = entries.order, entries.rows, entries.weights
    # Student view 0 (rows 0..3) learns from view-1 neighbours, student view 1 (rows 4..7) from view-0 ones.
    assert order.tolist() == [5, 0, 2, 3] and rows.tolist() == [1, 4, 6, 7]
    expected = [0.5, 1 / 6, 1 / 6, 1 / 6] if normalization == "per_view" else [1 / 6] * 4
    torch.testing.assert_close(weights, torch.tensor(expected))
    none = cross_image_entries(torch.tensor([[False, False], [True, False]]), "view1").weights
    assert none.tolist() == [0.0]


@pytest.mark.parametrize("normalization", ["per_view", "view1"])
def test_matches_carry_their_entries_and_used_neighbours(normalization: str) -> None:
    bank, objects = random_bank_and_objects(seed=10)
    matches = match_objects(objects, bank, normalization=normalization)  # type: ignore[arg-type]
    expected = cross_image_entries(matches.cycle_mask, normalization)  # type: ignore[arg-type]
    for mine, theirs in zip(
        (matches.entries.order, matches.entries.rows, matches.entries.weights),
        (expected.order, expected.rows, expected.weights),
        strict=True,
    ):
        assert torch.equal(mine, theirs)
    used = matches.used_neighbours()
    assert used.shape == (int(matches.cycle_mask.sum()), objects.shape[-1])
    for entry, row in enumerate(matches.entries.rows.tolist()):  # a neighbour of view v supervises the other view
        source_view, index = 1 - row // objects.shape[0], row % objects.shape[0]
        assert bool(matches.cycle_mask[source_view, index])
        assert torch.equal(used[entry], matches.neighbours[source_view, index])
