"""The fused last layer + soft cross-entropy (cribo.fused) against the plain formulation on logits."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from cribo.fused import (
    SoftTarget,
    StepTargets,
    TargetBuilder,
    TeacherFeatures,
    column_blocks,
    default_block_bytes,
    soft_cross_entropy_terms,
    student_terms,
    teacher_targets,
)
from cribo.losses import CrIBoLoss
from cribo.matching import cross_image_entries

TINY_BLOCK = 4 * 10 * 16  # 16 columns of 10 rows: forces several column blocks


def _layer(columns: int, dim: int, generator: torch.Generator, gain: bool = True) -> tuple[Tensor, Tensor]:
    weight_v = torch.randn(columns, dim, generator=generator, dtype=torch.float64).float()
    weight_g = (torch.rand(columns, 1, generator=generator) + 0.5) if gain else torch.ones(columns, 1)
    return weight_v.requires_grad_(), weight_g.requires_grad_(gain)


def _logits(features: Tensor, weight_v: Tensor, weight_g: Tensor) -> Tensor:
    return features @ (weight_v * weight_g / weight_v.norm(dim=1, keepdim=True)).t()


def _unit(rows: int, dim: int, generator: torch.Generator) -> Tensor:
    return F.normalize(torch.randn(rows, dim, generator=generator), dim=-1)


def test_column_blocks_cover_the_columns_within_the_byte_budget() -> None:
    blocks = list(column_blocks(470, 65536, 2**21))
    assert blocks[0] == slice(0, 1115) and blocks[-1].stop == 65536
    assert all(a.stop == b.start for a, b in itertools.pairwise(blocks))
    assert [b.stop - b.start for b in column_blocks(10**6, 40, 2**21)] == [16, 16, 8]  # never below 16 columns
    assert default_block_bytes(torch.device("cpu")) == 2**21
    assert default_block_bytes(torch.device("cuda")) > default_block_bytes(torch.device("cpu"))


@pytest.mark.parametrize("block_bytes", [TINY_BLOCK, 2**20])
@pytest.mark.parametrize("dim", [8, 16], ids=["rows>d", "rows<=d"])  # the column factor on the weight or logits
def test_teacher_targets_match_softmax_of_centred_logits(block_bytes: int, dim: int) -> None:
    gen = torch.Generator().manual_seed(0)
    features = _unit(11, dim, gen)
    weight_v, weight_g = _layer(40, dim, gen)
    center = torch.randn(1, 40, generator=gen)
    probs, sums = teacher_targets(features, weight_v, weight_g, center, 0.04, column_sums=True, block_bytes=block_bytes)
    logits = _logits(features, weight_v, weight_g).detach()
    torch.testing.assert_close(probs, F.softmax((logits - center) / 0.04, dim=-1), atol=1e-6, rtol=1e-5)
    assert sums is not None
    torch.testing.assert_close(sums, logits.sum(0), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="temperature"):
        teacher_targets(features, weight_v, weight_g, center, 0.0)


@pytest.mark.parametrize("dim", [4, 16], ids=["rows>d", "rows<=d"])
def test_teacher_targets_in_bfloat16_stay_close(dim: int) -> None:
    gen = torch.Generator().manual_seed(1)
    features = _unit(6, dim, gen)
    weight_v, weight_g = _layer(50, dim, gen)
    center = torch.zeros(1, 50)
    exact, _ = teacher_targets(features, weight_v, weight_g, center, 0.1)
    low, _ = teacher_targets(features, weight_v, weight_g, center, 0.1, compute_dtype=torch.bfloat16)
    assert low.dtype == torch.float32
    torch.testing.assert_close(low, exact, atol=2e-2, rtol=0.1)


@pytest.mark.parametrize("gain", [True, False])
@pytest.mark.parametrize("block_bytes", [TINY_BLOCK, 2**20])
@pytest.mark.parametrize("store_bytes", [0, 2**20], ids=["recompute", "stored"])
@pytest.mark.parametrize("dim", [8, 16], ids=["rows>d", "rows<=d"])  # the column factor on the weight or logits
def test_soft_cross_entropy_terms_values_and_gradients(
    gain: bool, block_bytes: int, store_bytes: int, dim: int
) -> None:
    gen = torch.Generator().manual_seed(2)
    features = _unit(10, dim, gen).requires_grad_()
    weight_v, weight_g = _layer(40, dim, gen, gain=gain)
    first = F.softmax(torch.randn(10, 40, generator=gen), dim=-1)
    second = F.softmax(torch.randn(4, 40, generator=gen) * 3, dim=-1)
    rows2 = torch.tensor([0, 3, 4, 9])
    w1, w2 = torch.full((10,), 0.1), torch.rand(4, generator=gen)
    targets = [SoftTarget(first.clone(), torch.arange(10), w1), SoftTarget(second.clone(), rows2, w2)]
    out = soft_cross_entropy_terms(
        features, weight_v, weight_g, 7.0, targets, block_bytes=block_bytes, store_bytes=store_bytes
    )

    log_probs = F.log_softmax(7.0 * _logits(features, weight_v, weight_g), dim=-1)
    reference = torch.stack(
        [(w1 * -(first * log_probs).sum(-1)).sum(), (w2 * -(second * log_probs[rows2]).sum(-1)).sum()]
    )
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=1e-5)
    upstream = torch.tensor([0.7, -1.3])
    inputs = [features, weight_v] + ([weight_g] if gain else [])
    got = torch.autograd.grad((out * upstream).sum(), inputs)
    want = torch.autograd.grad((reference * upstream).sum(), inputs)
    for mine, theirs in zip(got, want, strict=True):
        torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=1e-4)


def test_soft_cross_entropy_terms_empty_target_and_bad_inputs() -> None:
    gen = torch.Generator().manual_seed(3)
    features = _unit(5, 4, gen).requires_grad_()
    weight_v, weight_g = _layer(6, 4, gen)
    empty = SoftTarget(torch.zeros(0, 6), torch.zeros(0, dtype=torch.long), torch.zeros(0))
    (out,) = soft_cross_entropy_terms(features, weight_v, weight_g, 1.0, [empty])
    assert out.item() == 0.0
    out.backward()
    assert features.grad is not None and torch.count_nonzero(features.grad) == 0
    with pytest.raises(ValueError, match="ascending"):
        SoftTarget(torch.zeros(2, 6), torch.tensor([1, 0]), torch.ones(2))
    with pytest.raises(ValueError, match="columns"):
        soft_cross_entropy_terms(
            features,
            weight_v,
            weight_g,
            1.0,
            [SoftTarget(torch.zeros(1, 5), torch.zeros(1, dtype=torch.long), torch.ones(1))],
        )
    with pytest.raises(ValueError, match="rows must lie"):
        soft_cross_entropy_terms(
            features, weight_v, weight_g, 1.0, [SoftTarget(torch.zeros(1, 6), torch.tensor([5]), torch.ones(1))]
        )
    with pytest.raises(ValueError, match="share d"):
        soft_cross_entropy_terms(features[:, :3], weight_v, weight_g, 1.0, [empty])


def _targets(
    builder: TargetBuilder,
    criterion: CrIBoLoss,
    features: TeacherFeatures,
    layers: tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]],
    mask: Tensor,
    temperatures: tuple[float, float] = (0.04, 0.04),
) -> StepTargets:
    """A step's targets, then the centre update, as the training step does them."""
    entries = cross_image_entries(mask, criterion.cross_image_normalization)
    centers = (criterion.center.center, criterion.center_c.center)
    targets, statistics = builder(features, layers, centers, temperatures, entries)
    criterion.update_centers(statistics)
    return targets


def _step_inputs(seed: int, num_objects: int, mask: Tensor | None = None) -> dict[str, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    images, dim = 3, 8
    mask = torch.rand(2, num_objects, generator=gen) < 0.6 if mask is None else mask
    return {
        "student_global": _unit(2 * images, dim, gen),
        "teacher_global": _unit(2 * images, dim, gen),
        "student_objects": _unit(2 * num_objects, dim, gen),
        "teacher_objects": _unit(2 * num_objects, dim, gen),
        "neighbours": _unit(2 * num_objects, dim, gen).unflatten(0, (2, num_objects)),
        "cycle_mask": mask,
    }


@pytest.mark.parametrize("normalization", ["per_view", "view1"])
@pytest.mark.parametrize(
    ("num_objects", "mask"),
    [
        (7, None),
        (5, torch.tensor([[False] * 5, [True, False, True, False, True]])),
        (0, torch.zeros(2, 0, dtype=torch.bool)),
    ],
)
def test_fused_step_equals_crib_loss_on_logits(normalization: str, num_objects: int, mask: Tensor | None) -> None:
    """TargetBuilder + student_terms() give CrIBoLoss.forward's terms, centre updates and gradients."""
    inputs = _step_inputs(4, num_objects, mask)
    gen = torch.Generator().manual_seed(5)
    student_layers = [_layer(30, 8, gen), _layer(20, 8, gen)]
    teacher_layers = [tuple(t.detach() for t in _layer(30, 8, gen)), tuple(t.detach() for t in _layer(20, 8, gen))]
    plain = CrIBoLoss(30, 20, student_temp=0.1, student_temp_c=0.2, cross_image_normalization=normalization)  # type: ignore[arg-type]
    with torch.no_grad():
        plain.center.center.normal_(generator=gen)
        plain.center_c.center.normal_(generator=gen)
    fused = copy.deepcopy(plain)
    sg = inputs["student_global"].clone().requires_grad_()
    so = inputs["student_objects"].clone().requires_grad_()
    reference = plain(
        _logits(sg, *student_layers[0]),
        _logits(inputs["teacher_global"], *teacher_layers[0]),
        _logits(so, *student_layers[1]),
        _logits(inputs["teacher_objects"], *teacher_layers[1]),
        _logits(inputs["neighbours"].flatten(0, 1), *teacher_layers[1]).unflatten(0, (2, num_objects)),
        inputs["cycle_mask"],
        teacher_temp=0.04,
        teacher_temp_c=0.07,
        cross_image=True,
    )
    order = cross_image_entries(inputs["cycle_mask"], normalization).order  # type: ignore[arg-type]
    features = TeacherFeatures(
        inputs["teacher_global"], inputs["teacher_objects"], inputs["neighbours"].flatten(0, 1)[order]
    )
    layers = (teacher_layers[0], teacher_layers[1])
    targets = _targets(TargetBuilder(), fused, features, layers, inputs["cycle_mask"], (0.04, 0.07))  # type: ignore[arg-type]
    fg = inputs["student_global"].clone().requires_grad_()
    fo = inputs["student_objects"].clone().requires_grad_()
    terms = student_terms(fg, fo, (student_layers[0], student_layers[1]), targets, (0.1, 0.2))
    for key in ("global", "object", "cross_image"):
        torch.testing.assert_close(terms[key], reference[key], atol=1e-5, rtol=1e-5, msg=key)
    torch.testing.assert_close(fused.center.center, plain.center.center, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(fused.center_c.center, plain.center_c.center, atol=1e-6, rtol=1e-5)
    params = [p for layer in student_layers for p in layer]
    weights = torch.tensor([1.0, 0.5, 2.0])
    total_ref = sum(w * reference[k] for w, k in zip(weights, ("global", "object", "cross_image"), strict=True))
    total = sum(w * terms[k] for w, k in zip(weights, ("global", "object", "cross_image"), strict=True))
    want = torch.autograd.grad(total_ref, [sg, so, *params], allow_unused=True)
    got = torch.autograd.grad(total, [fg, fo, *params], allow_unused=True)
    for mine, theirs in zip(got, want, strict=True):
        if theirs is None:
            assert mine is None or torch.count_nonzero(mine) == 0
        else:
            torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=1e-4)


def test_targets_reject_a_neighbour_count_that_does_not_match_the_mask() -> None:
    inputs = _step_inputs(6, 4, torch.tensor([[True, True, False, False], [False, False, False, True]]))
    gen = torch.Generator().manual_seed(7)
    layer = tuple(t.detach() for t in _layer(10, 8, gen))
    features = TeacherFeatures(inputs["teacher_global"], inputs["teacher_objects"], inputs["teacher_objects"][:2])
    with pytest.raises(ValueError, match="one row per cross-image entry"):
        _targets(TargetBuilder(), CrIBoLoss(10, 10), features, (layer, layer), inputs["cycle_mask"])  # type: ignore[arg-type]


@pytest.mark.parametrize("dim", [8, 16], ids=["rows>d", "rows<=d"])
def test_soft_cross_entropy_terms_in_bfloat16_stay_close(dim: int) -> None:
    gen = torch.Generator().manual_seed(8)
    features = _unit(9, dim, gen).requires_grad_()
    weight_v, weight_g = _layer(64, dim, gen)
    probs = F.softmax(torch.randn(9, 64, generator=gen), dim=-1)
    results = []
    for dtype in (torch.float32, torch.bfloat16):
        target = SoftTarget(probs.clone(), torch.arange(9), torch.full((9,), 1 / 9))
        (out,) = soft_cross_entropy_terms(features, weight_v, weight_g, 5.0, [target], compute_dtype=dtype)
        results.append((out, *torch.autograd.grad(out, [features, weight_v, weight_g])))
    for exact, low in zip(*results, strict=True):
        assert low.dtype == exact.dtype
        torch.testing.assert_close(low, exact, atol=5e-2, rtol=5e-2)


def test_targets_reuse_one_workspace_between_steps() -> None:
    gen = torch.Generator().manual_seed(9)
    layer = tuple(t.detach() for t in _layer(10, 8, gen))
    criterion, builder = CrIBoLoss(10, 10), TargetBuilder()
    mask = torch.tensor([[True, False, True], [False, False, True]])
    inputs = _step_inputs(10, 3, mask)
    order = cross_image_entries(mask, "per_view").order
    features = TeacherFeatures(
        inputs["teacher_global"], inputs["teacher_objects"], inputs["neighbours"].flatten(0, 1)[order]
    )
    first = _targets(builder, criterion, features, (layer, layer), mask)  # type: ignore[arg-type]
    expected = first.objects.probs.clone()
    storage = first.objects.probs.untyped_storage().data_ptr()
    second = _targets(builder, criterion, features, (layer, layer), mask)  # type: ignore[arg-type]
    assert second.objects.probs.untyped_storage().data_ptr() == storage  # same memory, no new allocation
    assert set(criterion.state_dict()) == {"center.center", "center_c.center"}  # the workspace is never saved
    center_moved = not torch.equal(expected, second.objects.probs)  # the centre moved between the calls
    assert center_moved and torch.allclose(second.objects.probs.sum(-1), torch.ones(6))
    with pytest.raises(ValueError, match="contiguous float32"):
        teacher_targets(inputs["teacher_global"], *layer, torch.zeros(1, 10), 0.1, out=torch.empty(5, 10))  # type: ignore[misc]
