"""Tests of cribo.schedules: hand-computed cosine values, the authors' temperature and pos_alpha schedules."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from conftest import load_fixture
from cribo.schedules import (
    cosine_schedule,
    last_layer_frozen,
    lr_schedule,
    pos_alpha_at,
    scaled_lr,
    teacher_momentum_schedule,
    teacher_temperature,
    weight_decay_schedule,
)


def test_cosine_schedule_by_hand() -> None:
    values = cosine_schedule(1.0, 0.0, 4)
    expected = [1.0, 0.5 + 0.5 * math.cos(math.pi / 4), 0.5, 0.5 + 0.5 * math.cos(3 * math.pi / 4)]
    np.testing.assert_allclose(values, expected, rtol=0, atol=1e-15)
    assert values.dtype == np.float64


def test_cosine_schedule_with_warmup() -> None:
    values = cosine_schedule(2.0, 1.0, 7, warmup_steps=3, warmup_start=0.5)
    assert values.shape == (7,)
    np.testing.assert_allclose(values[:3], [0.5, 1.25, 2.0])
    assert values[3] == 2.0  # the cosine starts at base
    assert np.all(np.diff(values[3:]) < 0) and values[-1] > 1.0
    only_warmup = cosine_schedule(1.0, 0.0, 3, warmup_steps=3)
    np.testing.assert_allclose(only_warmup, [0.0, 0.5, 1.0])


@pytest.mark.parametrize(("total_steps", "warmup_steps"), [(0, 0), (-1, 0), (5, 6), (5, -1)])
def test_cosine_schedule_rejects_bad_lengths(total_steps: int, warmup_steps: int) -> None:
    with pytest.raises(ValueError, match="steps"):
        cosine_schedule(1.0, 0.0, total_steps, warmup_steps=warmup_steps)


def test_teacher_temperature_matches_fixture(reference: Path) -> None:
    fixture = load_fixture(reference, "loss.pt")
    for suffix in ("", "_c"):
        expected = fixture[f"teacher_temp_schedule{suffix}"]
        ours = [
            teacher_temperature(
                epoch,
                fixture[f"warmup_teacher_temp{suffix}"],
                fixture[f"teacher_temp{suffix}"],
                fixture["warmup_teacher_temp_epochs"],
            )
            for epoch in range(fixture["nepochs"])
        ]
        assert ours == expected.tolist()  # exact, float64


def test_teacher_temperature_edges() -> None:
    assert teacher_temperature(0, 0.04, 0.07, 0) == 0.07
    assert teacher_temperature(1000, 0.04, 0.07, 30) == 0.07
    assert teacher_temperature(0, 0.04, 0.07, 30) == 0.04
    with pytest.raises(ValueError, match="epoch"):
        teacher_temperature(-1, 0.04, 0.07, 30)


def test_pos_alpha_authors_order_matches_fixture(reference: Path) -> None:
    fixture = load_fixture(reference, "teacher_centroids.pt")
    for case in fixture["cases"]:
        pair = tuple(case["pos_alpha_arg"].tolist())
        used = pos_alpha_at(case["epoch"], case["epochs"], pair, order="authors")
        assert used == case["pos_alpha_used"], case["name"]


def test_pos_alpha_orders() -> None:
    assert pos_alpha_at(0, 5, (0.5, 2.0)) == 0.5
    assert pos_alpha_at(4, 5, (0.5, 2.0)) == 2.0
    assert pos_alpha_at(0, 5, (0.5, 2.0), order="authors") == 2.0
    assert pos_alpha_at(1, 5, (0.5, 2.0), order="authors") == 1.625
    assert pos_alpha_at(0, 1, (3.0, 1.0)) == 3.0
    with pytest.raises(ValueError, match="order"):
        pos_alpha_at(0, 5, (0.5, 2.0), order="reversed")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="epoch"):
        pos_alpha_at(5, 5, (0.5, 2.0))


def test_training_schedules() -> None:
    assert scaled_lr(5e-4, 1024) == pytest.approx(2e-3)
    with pytest.raises(ValueError, match="total_batch"):
        scaled_lr(5e-4, 0)
    lr = lr_schedule(5e-4, 1e-5, 512, epochs=4, steps_per_epoch=3, warmup_epochs=1)
    assert lr.shape == (12,) and lr[0] == 0.0 and lr[3] == pytest.approx(1e-3)
    assert lr[-1] > 1e-5 and np.all(np.diff(lr[3:]) < 0)
    wd = weight_decay_schedule(0.04, 0.4, epochs=2, steps_per_epoch=5)
    assert wd.shape == (10,) and wd[0] == pytest.approx(0.04) and np.all(np.diff(wd) > 0) and wd[-1] < 0.4
    momentum = teacher_momentum_schedule(0.996, epochs=3, steps_per_epoch=2)
    assert momentum[0] == pytest.approx(0.996) and np.all(momentum < 1.0) and np.all(np.diff(momentum) > 0)
    with pytest.raises(ValueError, match="steps_per_epoch"):
        teacher_momentum_schedule(0.996, epochs=3, steps_per_epoch=0)
    assert last_layer_frozen(0, 1) and not last_layer_frozen(1, 1) and not last_layer_frozen(0, 0)
