"""Tests of cribo.memory: the ragged ring buffer against a list model of the authors' queue, and parity."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch
from torch import Tensor

from conftest import load_fixture
from cribo.memory import ObjectMemoryBank


class AuthorsQueue:
    """The authors' ragged queue update (cat of the new objects and the kept images), as plain lists."""

    def __init__(self, queue: Tensor, counts: Tensor) -> None:
        self.images: list[Tensor] = []  # newest first, each (V, count, D)
        offset = 0
        for count in counts.tolist():
            self.images.append(queue[:, offset : offset + count].clone())
            offset += count

    def push(self, objects: Tensor, objects_per_image: Tensor) -> None:
        capacity = len(self.images)
        new, offset = [], 0
        for count in objects_per_image.tolist()[:capacity]:
            new.append(objects[offset : offset + count].transpose(0, 1).clone())
            offset += count
        self.images = (new + self.images)[:capacity]

    def layout(self) -> tuple[Tensor, Tensor]:
        counts = torch.tensor([image.shape[1] for image in self.images], dtype=torch.int32)
        return torch.cat(self.images, dim=1), counts


def random_batch(generator: torch.Generator, num_images: int, max_objects: int, dim: int) -> tuple[Tensor, Tensor]:
    """Objects (n, 2, D) and counts (B,) in [0, K] with a fixed seed."""
    counts = torch.randint(0, max_objects + 1, (num_images,), generator=generator)
    objects = torch.randn(int(counts.sum()), 2, dim, generator=generator)
    return objects, counts


def assert_same_live_rows(bank: ObjectMemoryBank, queue: Tensor, counts: Tensor) -> None:
    """The bank's authors layout equals (queue, counts) on the live rows; rows past them are zero."""
    bank_queue, bank_counts = bank.to_authors_layout()
    live = int(counts.sum())
    assert bank_counts.dtype == torch.int32
    assert torch.equal(bank_counts, counts.to(torch.int32))
    assert torch.equal(bank_queue[:, :live], queue[:, :live])
    assert not bank_queue[:, live:].any()


def test_initial_state_is_the_authors() -> None:
    bank = ObjectMemoryBank(5, 3, 4, generator=torch.Generator().manual_seed(0))
    assert bank.objects.shape == (2, 5, 3, 4) and bank.objects.dtype == torch.float32
    assert bool((bank.objects >= 0).all()) and bool((bank.objects < 1).all())
    assert torch.equal(bank.counts, torch.full((5,), 3, dtype=torch.int32))
    assert (bank.capacity, bank.max_objects_per_image, bank.dim, bank.num_views) == (5, 3, 4, 2)
    assert bank.num_objects == 15 and bank.num_images == 5
    again = ObjectMemoryBank(5, 3, 4, generator=torch.Generator().manual_seed(0))
    assert torch.equal(bank.objects, again.objects)


def test_buffers_are_persistent_and_round_trip() -> None:
    generator = torch.Generator().manual_seed(1)
    bank = ObjectMemoryBank(4, 3, 5, generator=generator)
    for _ in range(3):
        bank.push(*random_batch(generator, 3, 3, 5))
    state = bank.state_dict()
    assert set(state) == {"objects", "counts", "head"}
    restored = ObjectMemoryBank(4, 3, 5)
    restored.load_state_dict(state)
    batch = random_batch(generator, 2, 3, 5)
    bank.push(*batch)
    restored.push(*batch)
    for a, b in zip(bank.to_authors_layout(), restored.to_authors_layout()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("capacity", [1, 3, 7])
def test_push_matches_the_authors_queue_update(capacity: int) -> None:
    """Random pushes (including B >= Q and images without objects) against the list model."""
    generator = torch.Generator().manual_seed(capacity)
    max_objects, dim = 4, 3
    bank = ObjectMemoryBank(capacity, max_objects, dim, generator=generator)
    model = AuthorsQueue(*bank.to_authors_layout())
    for step in range(12):
        batch = random_batch(generator, 1 + step % (capacity + 2), max_objects, dim)
        bank.push(*batch)
        model.push(*batch)
        assert_same_live_rows(bank, *model.layout())
        assert bank.counts.numel() == capacity and bank.num_objects <= capacity * max_objects


def test_push_evicts_the_oldest_image_first() -> None:
    bank = ObjectMemoryBank(3, 2, 1)  # starts with 3 random images of 2 objects
    for image in range(5):  # one object per image, whose value is the image number
        bank.push(torch.full((1, 2, 1), float(image)), torch.tensor([1]))
        queue, counts = bank.to_authors_layout()
        recent = min(image + 1, 3)
        assert torch.equal(queue[:, :recent, 0], torch.arange(image, image - recent, -1.0).expand(2, recent))
        assert torch.equal(counts, torch.tensor([1] * recent + [2] * (3 - recent), dtype=torch.int32))


def test_push_more_images_than_capacity_keeps_the_first() -> None:
    bank = ObjectMemoryBank(2, 3, 1)
    objects = torch.arange(6, dtype=torch.float32)[:, None, None].expand(6, 2, 1)
    bank.push(objects, torch.tensor([1, 2, 3]))
    queue, counts = bank.to_authors_layout()
    assert torch.equal(counts, torch.tensor([1, 2], dtype=torch.int32))
    assert torch.equal(queue[1, :3, 0], torch.tensor([0.0, 1.0, 2.0]))


def test_push_is_in_place_and_casts_to_float32() -> None:
    bank = ObjectMemoryBank(4, 2, 3)
    pointer = bank.objects.data_ptr()
    bank.push(torch.ones(3, 2, 3, dtype=torch.bfloat16), torch.tensor([2, 1]))
    assert bank.objects.data_ptr() == pointer and bank.objects.dtype == torch.float32
    assert bank.num_objects == 3 + 2 * 2
    bank.push(torch.zeros(0, 2, 3), torch.zeros(0, dtype=torch.int64))  # an empty batch changes nothing
    assert bank.num_objects == 7


@pytest.mark.parametrize(
    ("objects", "counts", "message"),
    [
        (torch.zeros(3, 2), torch.tensor([3]), "objects must have shape"),
        (torch.zeros(3, 3, 4), torch.tensor([3]), "objects must have shape"),
        (torch.zeros(3, 2, 5), torch.tensor([3]), "objects must have shape"),
        (torch.zeros(3, 2, 4, dtype=torch.int64), torch.tensor([3]), "floating-point"),
        (torch.zeros(4, 2, 4), torch.tensor([4]), r"\[0, max_objects_per_image=3\]"),
        (torch.zeros(1, 2, 4), torch.tensor([2, -1]), r"\[0, max_objects_per_image=3\]"),
        (torch.zeros(3, 2, 4), torch.tensor([1, 1]), "sum to the number of objects n=3"),
        (torch.zeros(3, 2, 4), torch.tensor([3.0]), "integer"),
        (torch.zeros(3, 2, 4), torch.tensor([[3]]), "1-d integer"),
    ],
)
def test_push_rejects_bad_input(objects: Tensor, counts: Tensor, message: str) -> None:
    bank = ObjectMemoryBank(2, 3, 4)
    with pytest.raises(ValueError, match=message):
        bank.push(objects, counts)


def test_constructor_rejects_bad_sizes() -> None:
    with pytest.raises(ValueError, match="capacity must be a positive int"):
        ObjectMemoryBank(0, 3, 4)
    with pytest.raises(ValueError, match="dim must be a positive int"):
        ObjectMemoryBank(2, 3, -1)


def test_authors_layout_round_trip() -> None:
    generator = torch.Generator().manual_seed(2)
    bank = ObjectMemoryBank(5, 4, 3, generator=generator)
    for _ in range(4):
        bank.push(*random_batch(generator, 2, 4, 3))
    queue, counts = bank.to_authors_layout()
    rebuilt = ObjectMemoryBank.from_authors_layout(queue, counts, 4)
    assert_same_live_rows(rebuilt, queue, counts)
    batch = random_batch(generator, 3, 4, 3)
    bank.push(*batch)
    rebuilt.push(*batch)
    assert_same_live_rows(rebuilt, *bank.to_authors_layout())


def test_from_authors_layout_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match=r"queue must have shape \(V, R, D\)"):
        ObjectMemoryBank.from_authors_layout(torch.zeros(4, 3), torch.tensor([1]), 2)
    with pytest.raises(ValueError, match="counts sum to 5"):
        ObjectMemoryBank.from_authors_layout(torch.zeros(2, 4, 3), torch.tensor([2, 3]), 3)
    with pytest.raises(ValueError, match=r"\[0, max_objects_per_image=2\]"):
        ObjectMemoryBank.from_authors_layout(torch.zeros(2, 6, 3), torch.tensor([3, 0]), 2)


def test_flat_view_lookup_and_authors_index() -> None:
    generator = torch.Generator().manual_seed(3)
    bank = ObjectMemoryBank(4, 3, 2, generator=generator)
    bank.push(*random_batch(generator, 3, 3, 2))
    keys, valid = bank.flat_view(1)
    assert keys.shape == (12, 2) and keys.data_ptr() == bank.objects[1].data_ptr()  # a view, no copy
    ranks = torch.arange(3).repeat(4)
    assert torch.equal(valid, ranks < bank.counts.repeat_interleave(3))
    assert int(valid.sum()) == bank.num_objects
    queue, _ = bank.to_authors_layout()
    flat_index = valid.nonzero().squeeze(1)
    for view in range(2):
        assert torch.equal(bank.lookup(view, flat_index), queue[view, bank.authors_index(flat_index)])
    assert torch.equal(bank.authors_index(flat_index).sort().values, torch.arange(bank.num_objects))
    with pytest.raises(ValueError, match=r"view must be in \[0, 2\)"):
        bank.flat_view(2)


def test_push_parity_with_the_authors_queues(reference: Path) -> None:
    """Three consecutive authors' updates, replayed with our push from the first 'before' state."""
    fixture = load_fixture(reference, "nn_retrieval.pt")
    first = fixture["calls"][0]
    bank = ObjectMemoryBank.from_authors_layout(
        first["centroids_queue_before"], first["cpv_queue_before"], fixture["n_tokens"]
    )
    assert bank.capacity == fixture["queue_size"] and bank.dim == fixture["dim"]
    for call in fixture["calls"]:
        assert_same_live_rows(bank, call["centroids_queue_before"], call["cpv_queue_before"])
        objects = torch.stack([call["teacher_centroids_v1"], call["teacher_centroids_v2"]], dim=1)
        bank.push(objects, call["centroids_per_view"])
        assert_same_live_rows(bank, call["centroids_queue_after"], call["cpv_queue_after"])


def test_import_of_the_authors_checkpoint_queues(reference: Path) -> None:
    """``centroids_queue_cpu`` / ``cpv_queue_cpu`` of an authors' checkpoint become an equal bank."""
    path = reference / "checkpoint_vit_tiny.pth"
    if not path.is_file():
        pytest.fail(f"reference fixture {path} is missing")
    torch.serialization.add_safe_globals([argparse.Namespace])
    checkpoint = torch.load(path, weights_only=True, map_location="cpu", mmap=True)
    queue, counts = checkpoint["centroids_queue_cpu"], checkpoint["cpv_queue_cpu"]
    bank = ObjectMemoryBank.from_authors_layout(queue, counts, checkpoint["args"].n_tokens)
    assert bank.capacity == checkpoint["args"].queue_size and bank.dim == queue.shape[2]
    assert_same_live_rows(bank, queue, counts)
