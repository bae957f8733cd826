"""Object memory bank: a ragged ring buffer of past teacher objects, one bank per view.

CrIBo (ICLR 2024, §3.3) keeps the teacher object representations of the last ``Q`` images
(``queue_size``, 25 000 in the paper) to retrieve cross-image nearest neighbours. Each image
brings a different number of valid objects (clusters non-empty in both views), so the
authors store a *ragged* queue: ``centroids_queue`` ``(V, K*Q, D)`` holds the objects of the
newest image first and ``cpv_queue`` ``(Q,)`` their per-image counts; every update
re-concatenates the queue (authors' ``train_cribo``/``get_nn_centroids``).

Here the bank has fixed slots instead: ``objects`` ``(V, Q, K, D)`` with ``counts`` ``(Q,)``
valid objects per image slot, and a write pointer ``head`` (the slot of the newest image).
A push of ``B`` images overwrites the ``B`` oldest slots in place (no copy, no
``torch.cat`` of the bank). Slot entries at or past an image's count are stale and
never read. The newest-first order of the authors' layout is recovered as slot
``(head + p) mod Q`` for position ``p`` (``to_authors_layout`` / ``from_authors_layout``,
used for parity tests and to import the authors' checkpoint queues ``centroids_queue_cpu``
and ``cpv_queue_cpu``).

The bank itself knows nothing of searching: :mod:`cribo.search` holds the nearest-neighbour search and
the bfloat16 screening keys (:class:`cribo.search.BankKeys`), which :meth:`ObjectMemoryBank.push` helps keep
in step by returning the slots it wrote.

The authors also keep a queue of normalised [CLS] features (``cls_queue``); it is
filled but never read for retrieval, so it is not implemented here.

Axis letters: V views, Q bank capacity in images, K max objects per image (``n_tokens``),
D dim, B images in a batch, n objects in a batch (all images), M = Q*K flat bank slots.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = ["ObjectMemoryBank", "PushedSlots"]


@dataclass(frozen=True)
class PushedSlots:
    """Where :meth:`ObjectMemoryBank.push` wrote a batch's objects: object ``i`` went to ``objects[:, slots[i],
    ranks[i]]``.

    Attributes:
        slots: ``(n,)`` int64 image slot of each stored object.
        ranks: ``(n,)`` int64 position of each object within its image slot.
    """

    slots: Tensor
    ranks: Tensor


def _check_counts(counts: Tensor, max_objects_per_image: int, name: str) -> None:
    """Raise ``ValueError`` unless ``counts`` is a 1-d integer tensor with values in [0, K]."""
    if counts.ndim != 1 or counts.dtype.is_floating_point or counts.dtype == torch.bool:
        raise ValueError(f"{name} must be a 1-d integer tensor, got shape {tuple(counts.shape)} and {counts.dtype}")
    if counts.numel() and (int(counts.min()) < 0 or int(counts.max()) > max_objects_per_image):
        raise ValueError(
            f"{name} must lie in [0, max_objects_per_image={max_objects_per_image}], "
            f"got values in [{int(counts.min())}, {int(counts.max())}]"
        )


class ObjectMemoryBank(nn.Module):
    """Fixed-slot ring buffer of the objects of the last ``capacity`` images, per view.

    Buffers (all persistent, so ``state_dict``/``load_state_dict`` round-trip a checkpoint):
        objects: ``(V, Q, K, D)`` float32 stored (un-normalised) objects.
        counts: ``(Q,)`` int32 valid objects per image slot (entries ``[:count]`` are valid).
        head: ``()`` int64 slot of the newest image; position ``p`` in newest-first order is
            slot ``(head + p) mod Q``.

    The initial state is the authors': every slot full (count ``K``) of uniform [0, 1)
    values (``train_cribo`` initialises its queues with ``torch.rand``).

    Args:
        capacity: ``Q``, number of images kept (``queue_size``).
        max_objects_per_image: ``K``, slots per image (``n_tokens``).
        dim: ``D``, object dimension.
        num_views: ``V``, number of banks (2 in CrIBo).
        generator: optional generator for the uniform initial values.
    """

    objects: Tensor
    counts: Tensor
    head: Tensor

    def __init__(
        self,
        capacity: int,
        max_objects_per_image: int,
        dim: int,
        num_views: int = 2,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        for name, value in (
            ("capacity", capacity),
            ("max_objects_per_image", max_objects_per_image),
            ("dim", dim),
            ("num_views", num_views),
        ):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        shape = (num_views, capacity, max_objects_per_image, dim)
        self.register_buffer("objects", torch.rand(shape, generator=generator, dtype=torch.float32))
        self.register_buffer("counts", torch.full((capacity,), max_objects_per_image, dtype=torch.int32))
        self.register_buffer("head", torch.zeros((), dtype=torch.int64))

    # ------------------------------------------------------------------ sizes
    @property
    def num_views(self) -> int:
        """``V``, the number of per-view banks."""
        return int(self.objects.shape[0])

    @property
    def capacity(self) -> int:
        """``Q``, the number of image slots."""
        return int(self.objects.shape[1])

    @property
    def max_objects_per_image(self) -> int:
        """``K``, the object slots per image."""
        return int(self.objects.shape[2])

    @property
    def dim(self) -> int:
        """``D``, the object dimension."""
        return int(self.objects.shape[3])

    @property
    def num_objects(self) -> int:
        """Number of valid stored objects per view (the authors' ``cpv_queue.sum()``)."""
        return int(self.counts.sum())

    @property
    def num_images(self) -> int:
        """Number of image slots holding at least one object."""
        return int((self.counts > 0).sum())

    def extra_repr(self) -> str:
        return (
            f"capacity={self.capacity}, max_objects_per_image={self.max_objects_per_image}, "
            f"dim={self.dim}, num_views={self.num_views}"
        )

    # ------------------------------------------------------------------ order
    def _slots_newest_first(self) -> Tensor:
        """``(Q,)`` int64 slot of each position, newest image first."""
        positions = torch.arange(self.capacity, device=self.counts.device)
        return (self.head + positions) % self.capacity

    # ------------------------------------------------------------------ update
    @torch.no_grad()
    def push(self, objects: Tensor, objects_per_image: Tensor) -> PushedSlots:
        """Store a batch of images, evicting the oldest ones (in place).

        Image ``i`` of the batch gets newest-first position ``i`` (as the authors'
        ``cat(new, queue[:Q-B])``). If ``B >= Q`` only the first ``Q`` images (and their objects)
        are stored, as in the authors' code.

        Args:
            objects: ``(n, V, D)`` objects of the batch, image-major, any float dtype.
            objects_per_image: ``(B,)`` integer number of objects of each image, each in
                ``[0, K]``, summing to ``n``.

        Returns:
            Where the stored objects went (for :class:`cribo.search.BankKeys`).

        Raises:
            ValueError: on wrong shapes, counts outside ``[0, K]`` or a count total != ``n``.
        """
        self._check_push(objects, objects_per_image)
        per_image = objects_per_image.to(device=self.counts.device, dtype=torch.int64)[: self.capacity]
        num_images = int(per_image.numel())
        if num_images == 0:
            empty = per_image.new_empty(0)
            return PushedSlots(empty, empty)
        num_stored = int(per_image.sum())
        new_head = (self.head - num_images) % self.capacity
        image_slots = (new_head + torch.arange(num_images, device=per_image.device)) % self.capacity
        image_of_object = torch.repeat_interleave(torch.arange(num_images, device=per_image.device), per_image)
        first_object = torch.cumsum(per_image, 0) - per_image
        rank_of_object = torch.arange(num_stored, device=per_image.device) - first_object[image_of_object]
        values = objects[:num_stored].to(device=self.objects.device, dtype=self.objects.dtype)
        slot_of_object = image_slots[image_of_object]
        self.objects[:, slot_of_object, rank_of_object] = values.transpose(0, 1)
        self.counts[image_slots] = per_image.to(self.counts.dtype)
        self.head.copy_(new_head)
        return PushedSlots(slot_of_object, rank_of_object)

    def _check_push(self, objects: Tensor, objects_per_image: Tensor) -> None:
        """Validate the arguments of :meth:`push`."""
        if objects.ndim != 3 or objects.shape[1] != self.num_views or objects.shape[2] != self.dim:
            raise ValueError(
                f"objects must have shape (n, V={self.num_views}, D={self.dim}), got {tuple(objects.shape)}"
            )
        if not objects.dtype.is_floating_point:
            raise ValueError(f"objects must be a floating-point tensor, got {objects.dtype}")
        _check_counts(objects_per_image, self.max_objects_per_image, "objects_per_image")
        total = int(objects_per_image.sum())
        if total != objects.shape[0]:
            raise ValueError(f"objects_per_image must sum to the number of objects n={objects.shape[0]}, got {total}")

    # ------------------------------------------------------------------ matching views
    def flat_view(self, view: int) -> tuple[Tensor, Tensor]:
        """Keys of one view as a flat ``(M, D)`` view (no copy) and their validity.

        Flat slot ``m = slot * K + j`` is valid iff ``j < counts[slot]``.

        Args:
            view: bank index in ``[0, V)``.

        Returns:
            keys ``(M, D)`` float32 (a view of ``objects``), valid ``(M,)`` bool.
        """
        self._check_view(view)
        keys = self.objects[view].view(self.capacity * self.max_objects_per_image, self.dim)
        ranks = torch.arange(self.max_objects_per_image, device=self.counts.device)
        valid = ranks[None, :] < self.counts[:, None].to(torch.int64)
        return keys, valid.reshape(-1)

    def lookup(self, view: int, flat_index: Tensor) -> Tensor:
        """Raw stored view-``view`` entries at flat slot indices.

        Args:
            view: bank index in ``[0, V)``.
            flat_index: ``(...)`` int64 flat slot indices in ``[0, M)``.

        Returns:
            ``(..., D)`` float32 copies of the stored objects.
        """
        keys, _ = self.flat_view(view)
        return keys[flat_index]

    def authors_index(self, flat_index: Tensor) -> Tensor:
        """Map flat slot indices to row indices of :meth:`to_authors_layout`'s queue.

        Args:
            flat_index: ``(...)`` int64 flat slot indices of valid entries.

        Returns:
            ``(...)`` int64 rows ``offset(position of the slot) + j`` in the newest-first queue.
        """
        slot = torch.div(flat_index, self.max_objects_per_image, rounding_mode="floor")
        rank = flat_index - slot * self.max_objects_per_image
        position = (slot - self.head) % self.capacity
        counts_newest_first = self.counts[self._slots_newest_first()].to(torch.int64)
        offsets = torch.cumsum(counts_newest_first, 0) - counts_newest_first
        return offsets[position] + rank

    def _check_view(self, view: int) -> None:
        if not 0 <= view < self.num_views:
            raise ValueError(f"view must be in [0, {self.num_views}), got {view}")

    # ------------------------------------------------------------------ authors' layout
    @torch.no_grad()
    def to_authors_layout(self) -> tuple[Tensor, Tensor]:
        """Export to the authors' ragged queue layout.

        Returns:
            queue ``(V, K*Q, D)`` float32: the valid objects of the newest image first, the rows of an
            image contiguous; rows past ``cpv.sum()`` are zeros.
            cpv ``(Q,)`` int32: objects per image, newest first.
        """
        slots = self._slots_newest_first()
        counts = self.counts[slots]
        ranks = torch.arange(self.max_objects_per_image, device=slots.device)
        valid = ranks[None, :] < counts[:, None].to(torch.int64)
        rows = (slots[:, None] * self.max_objects_per_image + ranks[None, :])[valid]
        flat = self.objects.view(self.num_views, -1, self.dim)
        queue = torch.zeros_like(flat)
        queue[:, : rows.numel()] = flat.index_select(1, rows)
        return queue, counts.clone()

    @classmethod
    def from_authors_layout(cls, queue: Tensor, counts: Tensor, max_objects_per_image: int) -> ObjectMemoryBank:
        """Build a bank equal to an authors' ragged queue (``centroids_queue``, ``cpv_queue``).

        Args:
            queue: ``(V, R, D)`` objects, newest image first, with ``R >= counts.sum()``; rows past
                ``counts.sum()`` are ignored (stale in the authors' code).
            counts: ``(Q,)`` integer objects per image, newest first, each in ``[0, K]``.
            max_objects_per_image: ``K`` (``n_tokens``).

        Returns:
            A bank of capacity ``Q`` on ``queue``'s device with position ``p`` in slot ``p``.
        """
        if queue.ndim != 3:
            raise ValueError(f"queue must have shape (V, R, D), got {tuple(queue.shape)}")
        _check_counts(counts, max_objects_per_image, "counts")
        if counts.numel() == 0:
            raise ValueError("counts must hold at least one image (capacity >= 1)")
        total = int(counts.sum())
        if total > queue.shape[1]:
            raise ValueError(f"queue has {queue.shape[1]} rows but counts sum to {total}")
        num_views, _, dim = queue.shape
        capacity = int(counts.numel())
        # Build a one-image bank, then swap in zeroed buffers: skips drawing Q*K*D random values.
        bank = cls(1, max_objects_per_image, int(dim), int(num_views)).to(queue.device)
        bank.objects = queue.new_zeros((num_views, capacity, max_objects_per_image, dim), dtype=torch.float32)
        bank.counts = torch.zeros(capacity, dtype=torch.int32, device=queue.device)
        # Pushing all Q images puts position p in slot p and leaves head at 0.
        bank.push(queue[:, :total].transpose(0, 1), counts.to(torch.int64))
        return bank
