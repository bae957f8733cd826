"""Tests of cribo.losses: parity with the authors' CrIBoLoss (loss.pt), hand-computed values, centring, edge cases."""

from __future__ import annotations

import math
import multiprocessing
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from conftest import load_fixture
from cribo import losses
from cribo.losses import (
    Center,
    CrIBoLoss,
    cross_image_loss,
    cross_view_loss,
    sharpen,
    soft_cross_entropy,
)
from cribo.schedules import teacher_temperature

ATOL = 1e-5
RTOL = 1e-5


def _close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    torch.testing.assert_close(actual.detach(), expected, atol=ATOL, rtol=RTOL, msg=lambda m: f"{what}: {m}")


def test_parity_with_authors_loss(reference: Path) -> None:
    """Four consecutive calls on one loss object, centres carried over, "view1" normalisation (authors)."""
    fixture = load_fixture(reference, "loss.pt")
    calls = fixture["calls"]
    assert len(calls) > 0
    criterion = CrIBoLoss(
        fixture["out_dim"],
        fixture["out_dim_c"],
        student_temp=calls[0]["student_temp"],
        student_temp_c=calls[0]["student_temp_c"],
        center_momentum=fixture["center_momentum"],
        center_momentum_c=fixture["center_momentum_c"],
        cross_image_normalization="view1",
    )
    criterion.load_authors_centers({"center": calls[0]["center_before"], "center_c": calls[0]["center_c_before"]})
    for index, call in enumerate(calls):
        _close(criterion.center.center, call["center_before"], f"call {index} center_before")
        _close(criterion.center_c.center, call["center_c_before"], f"call {index} center_c_before")
        student_global = call["student_output"].clone().requires_grad_(True)
        student_objects = call["student_centroids"].clone().requires_grad_(True)
        neighbours = torch.stack([call["teacher_nn_centroids"][0], call["teacher_nn2_centroids"][1]])
        cycle_mask = torch.stack([call["bootstrap_centroid_mask"], call["bootstrap_centroid_mask2"]])
        out = criterion(
            student_global,
            call["teacher_output"],
            student_objects,
            call["teacher_centroids"],
            neighbours,
            cycle_mask,
            teacher_temp=call["teacher_temp"],
            teacher_temp_c=call["teacher_temp_c"],
            cross_image=call["epoch"] >= 1,
        )
        out["loss"].backward()
        for ours, theirs in (("global", "d_loss"), ("object", "s_loss"), ("cross_image", "nn_loss"), ("loss", "total")):
            _close(out[ours], call[theirs], f"call {index} {ours}")
        assert student_global.grad is not None and student_objects.grad is not None
        _close(student_global.grad, call["grad_student_output"], f"call {index} grad_student_output")
        _close(student_objects.grad, call["grad_student_centroids"], f"call {index} grad_student_centroids")
        _close(criterion.center.center, call["center_after"], f"call {index} center_after")
        _close(criterion.center_c.center, call["center_c_after"], f"call {index} center_c_after")
        assert torch.equal(out["num_cycle_consistent"], cycle_mask.sum(dim=-1))
        assert int(out["num_objects"]) == call["student_centroids"].shape[0] // 2


def test_fixture_temperatures_follow_schedule(reference: Path) -> None:
    fixture = load_fixture(reference, "loss.pt")
    for call in fixture["calls"]:
        for suffix in ("", "_c"):
            expected = teacher_temperature(
                call["epoch"],
                fixture[f"warmup_teacher_temp{suffix}"],
                fixture[f"teacher_temp{suffix}"],
                fixture["warmup_teacher_temp_epochs"],
            )
            assert call[f"teacher_temp{suffix}"] == expected


def test_state_dict_keys() -> None:
    criterion = CrIBoLoss(8, 6)
    state = criterion.state_dict()
    assert set(state) == {"center.center", "center_c.center"}
    assert state["center.center"].shape == (1, 8) and state["center_c.center"].shape == (1, 6)


def test_load_authors_centers_round_trip() -> None:
    criterion = CrIBoLoss(4, 3)
    authors = {"center": torch.arange(4.0)[None], "center_c": -torch.arange(3.0)[None]}
    criterion.load_authors_centers(authors)
    for key, value in criterion.authors_centers().items():
        assert torch.equal(value, authors[key])
    with pytest.raises(ValueError, match="center_c"):
        criterion.load_authors_centers({"center": torch.zeros(1, 4)})
    with pytest.raises(ValueError, match="shape"):
        criterion.load_authors_centers({"center": torch.zeros(1, 5), "center_c": torch.zeros(1, 3)})


def test_soft_cross_entropy_and_sharpen_by_hand() -> None:
    probs = torch.tensor([[0.25, 0.75]])
    logits = torch.tensor([[0.0, math.log(3.0)]])  # log_softmax = [log 1/4, log 3/4]
    expected = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    torch.testing.assert_close(soft_cross_entropy(probs, logits), torch.tensor([expected]))
    # ((t - c) / 0.5) = [0, 2 + ln 3] -> softmax = [1, 3 e^2] / (1 + 3 e^2)
    sharpened = sharpen(torch.tensor([[1.0, 1.0 + math.log(3.0) * 0.5]]), torch.tensor([[1.0, 0.0]]), 0.5)
    torch.testing.assert_close(
        sharpened, torch.tensor([[1 / (1 + 3 * math.e**2), 3 * math.e**2 / (1 + 3 * math.e**2)]])
    )
    with pytest.raises(ValueError, match="temperature"):
        sharpen(probs, torch.zeros(1, 2), 0.0)


def test_cross_view_pairs_each_teacher_view_with_the_other_student_view() -> None:
    one_hot = torch.eye(2)[None, None].expand(2, 1, 2, 2)[:, :, 0]  # (V=2, R=1, C=2), target class 0
    student = torch.tensor([[[0.0, math.log(3.0)]], [[0.0, 0.0]]])  # view 1 -> CE ln 4; view 2 -> CE ln 2
    loss = cross_view_loss(one_hot, student)
    torch.testing.assert_close(loss, torch.tensor((math.log(4.0) + math.log(2.0)) / 2))


def _cross_image_case() -> tuple[torch.Tensor, torch.Tensor]:
    """Neighbour one-hot targets (V, n=3, C=2) and student logits whose log-softmax is [ln 1/4, ln 3/4] per row."""
    targets = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]], [[0.0, 1.0], [0.0, 1.0], [1.0, 0.0]]])
    student = torch.tensor([0.0, math.log(3.0)]).expand(2, 3, 2).clone()
    return targets, student


def test_cross_image_per_view_by_hand() -> None:
    targets, student = _cross_image_case()
    mask = torch.tensor([[True, True, False], [False, False, True]])
    ln4, ln43 = math.log(4.0), math.log(4.0 / 3.0)  # CE of a class-0 / class-1 target
    per_view = cross_image_loss(targets, student, mask, "per_view")
    torch.testing.assert_close(per_view, torch.tensor(((ln4 + ln43) / 2 + ln4 / 1) / 2))
    view1 = cross_image_loss(targets, student, mask, "view1")
    torch.testing.assert_close(view1, torch.tensor(((ln4 + ln43) / 2 + ln4 / 2) / 2))


def test_cross_image_empty_masks() -> None:
    targets, student = _cross_image_case()
    student.requires_grad_(True)
    only_view2 = torch.tensor([[False, False, False], [True, False, True]])
    term2 = (math.log(4.0 / 3.0) + math.log(4.0)) / 2  # rows 0 and 2 of view 2: class-1 and class-0 targets
    torch.testing.assert_close(cross_image_loss(targets, student, only_view2, "per_view"), torch.tensor(term2 / 2))
    assert cross_image_loss(targets, student, only_view2, "view1").item() == 0.0  # authors: 0 when mask 1 is empty
    nothing = torch.zeros(2, 3, dtype=torch.bool)
    for mode in ("per_view", "view1"):
        loss = cross_image_loss(targets, student, nothing, mode)
        assert loss.item() == 0.0
        (grad,) = torch.autograd.grad(loss, student)
        assert torch.equal(grad, torch.zeros_like(student))


def test_cross_image_rejects_bad_arguments() -> None:
    targets, student = _cross_image_case()
    with pytest.raises(ValueError, match="normalization"):
        cross_image_loss(targets, student, torch.ones(2, 3, dtype=torch.bool), "view2")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="cycle_mask"):
        cross_image_loss(targets, student, torch.ones(2, 3), "per_view")


def _random_inputs(num_images: int, num_objects: int, dim: int, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)

    def draw(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator)

    return {
        "student_global": draw(2 * num_images, dim).requires_grad_(True),
        "teacher_global": draw(2 * num_images, dim),
        "student_objects": draw(2 * num_objects, dim).requires_grad_(True),
        "teacher_objects": draw(2 * num_objects, dim),
        "teacher_neighbours": draw(2, num_objects, dim),
        "cycle_mask": torch.rand(2, num_objects, generator=generator) > 0.5,
    }


def test_cross_image_switch_and_teacher_gets_no_gradient() -> None:
    inputs = _random_inputs(3, 5, 8)
    for name in ("teacher_global", "teacher_objects", "teacher_neighbours"):
        inputs[name].requires_grad_(True)
    inputs["cycle_mask"][0, 0] = True
    criterion = CrIBoLoss(8, 8)
    off = criterion(**inputs, teacher_temp=0.04, teacher_temp_c=0.04, cross_image=False)
    assert off["cross_image"].item() == 0.0
    on = criterion(**inputs, teacher_temp=0.04, teacher_temp_c=0.04, cross_image=True)
    assert on["cross_image"].item() > 0.0
    torch.testing.assert_close(on["loss"], on["global"] + on["object"] + on["cross_image"])
    on["loss"].backward()
    for name in ("teacher_global", "teacher_objects", "teacher_neighbours"):
        assert inputs[name].grad is None, name
    assert inputs["student_objects"].grad is not None
    for key in ("num_cycle_consistent", "num_objects"):
        assert not on[key].requires_grad


def test_no_valid_objects_gives_zero_object_loss_with_gradient_path() -> None:
    inputs = _random_inputs(2, 0, 8)
    criterion = CrIBoLoss(8, 8)
    criterion.load_authors_centers({"center": torch.zeros(1, 8), "center_c": torch.ones(1, 8)})
    out = criterion(**inputs, teacher_temp=0.04, teacher_temp_c=0.04, cross_image=True)
    assert out["object"].item() == 0.0 and out["cross_image"].item() == 0.0
    assert torch.isfinite(out["loss"])
    out["loss"].backward()
    grad = inputs["student_objects"].grad
    assert grad is not None and grad.shape == (0, 8)
    assert torch.equal(criterion.center_c.center, torch.ones(1, 8))  # no rows: the object centre keeps its value
    assert int(out["num_objects"]) == 0


def test_loss_uses_old_centres_then_updates() -> None:
    inputs = _random_inputs(2, 3, 4)
    criterion = CrIBoLoss(4, 4, center_momentum=0.5, center_momentum_c=0.25)
    out = criterion(**inputs, teacher_temp=0.05, teacher_temp_c=0.05, cross_image=True)
    teacher_probs = sharpen(inputs["teacher_global"], torch.zeros(1, 4), 0.05).unflatten(0, (2, 2))
    expected_global = cross_view_loss(teacher_probs, (inputs["student_global"] / 0.1).unflatten(0, (2, 2)))
    torch.testing.assert_close(out["global"], expected_global)
    torch.testing.assert_close(criterion.center.center, 0.5 * inputs["teacher_global"].mean(0, keepdim=True))
    # Neighbours do not enter the object centre.
    torch.testing.assert_close(criterion.center_c.center, 0.75 * inputs["teacher_objects"].mean(0, keepdim=True))


def test_forward_rejects_bad_shapes() -> None:
    criterion = CrIBoLoss(8, 8)
    inputs = _random_inputs(2, 3, 8)
    bad = dict(inputs, teacher_global=inputs["teacher_global"][:3])
    with pytest.raises(ValueError, match="teacher_global"):
        criterion(**bad, teacher_temp=0.04, teacher_temp_c=0.04, cross_image=True)
    bad = dict(inputs, teacher_neighbours=inputs["teacher_neighbours"][:, :2])
    with pytest.raises(ValueError, match="teacher_neighbours"):
        criterion(**bad, teacher_temp=0.04, teacher_temp_c=0.04, cross_image=True)
    with pytest.raises(ValueError, match="columns"):
        CrIBoLoss(8, 6)(**inputs, teacher_temp=0.04, teacher_temp_c=0.04, cross_image=True)
    with pytest.raises(ValueError, match="cross_image_normalization"):
        CrIBoLoss(8, 8, cross_image_normalization="view2")  # type: ignore[arg-type]


def test_center_update_by_hand() -> None:
    center = Center(2, momentum=0.9)
    center.update(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    torch.testing.assert_close(center.center, torch.tensor([[0.2, 0.3]]))
    center.update(torch.zeros(0, 2))  # nothing anywhere: unchanged, not NaN
    torch.testing.assert_close(center.center, torch.tensor([[0.2, 0.3]]))
    with pytest.raises(ValueError, match="values"):
        center.update(torch.zeros(3, 5))
    with pytest.raises(ValueError, match="momentum"):
        Center(2, momentum=1.5)


def test_center_weights_ragged_processes_by_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rank 0 holds 3 rows, rank 1 one row: the update uses the mean of all 4 rows, not the mean of rank means."""
    rows_rank0 = torch.tensor([[0.0, 0.0], [0.0, 0.0], [0.0, 0.0]])
    rows_rank1 = torch.tensor([[4.0, 8.0]])
    other_rank_stats = torch.cat([rows_rank1.sum(0), torch.tensor([1.0])])
    monkeypatch.setattr(losses, "all_reduce_sum", lambda local: local + other_rank_stats)
    center = Center(2, momentum=0.5)
    center.update(rows_rank0)
    torch.testing.assert_close(center.center, 0.5 * torch.tensor([[1.0, 2.0]]))


def _center_worker(rank: int, store_path: str, rows: torch.Tensor, results: multiprocessing.SimpleQueue) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=2)
    try:
        center = Center(rows.shape[1], momentum=0.5)
        center.update(rows)
        results.put((rank, center.center.tolist()))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(sys.platform != "linux", reason="uses fork to start a 2-process gloo group quickly")
def test_center_two_process_gloo_equals_single_process(tmp_path: Path) -> None:
    """A real 2-process gloo group with ragged rows (3 and 1) gives the single-process centre of all 4 rows."""
    generator = torch.Generator().manual_seed(0)
    all_rows = torch.randn(4, 5, generator=generator)
    per_rank = [all_rows[:3], all_rows[3:]]
    context = multiprocessing.get_context("fork")  # spawn would re-import torch (~10 s); tiny ops are fork-safe
    results = context.SimpleQueue()
    store = str(tmp_path / "store")
    workers = [context.Process(target=_center_worker, args=(r, store, per_rank[r], results)) for r in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=60)
        if worker.is_alive():
            worker.kill()
    assert all(worker.exitcode == 0 for worker in workers), [worker.exitcode for worker in workers]
    single = Center(5, momentum=0.5)
    single.update(all_rows)
    for _ in range(2):
        _, value = results.get()
        torch.testing.assert_close(torch.tensor(value), single.center)
