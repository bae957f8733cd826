"""Tests of cribo.teacher: EMA limits and hand-computed values, buffers, name checks, no gradient to the teacher."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from cribo.teacher import ema_update, freeze


def _pair(seed: int = 0) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(seed)
    student = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    teacher = copy.deepcopy(student)
    with torch.no_grad():
        for parameter in student.parameters():
            parameter.add_(1.0)
    return teacher, student


def test_momentum_zero_copies_student() -> None:
    teacher, student = _pair()
    ema_update(teacher, student, 0.0)
    for (name, t), s in zip(teacher.state_dict().items(), student.state_dict().values()):
        assert torch.equal(t, s), name


def test_momentum_one_keeps_teacher() -> None:
    teacher, student = _pair()
    before = [p.clone() for p in teacher.parameters()]
    ema_update(teacher, student, 1.0)
    for old, new in zip(before, teacher.parameters()):
        assert torch.equal(old, new)


def test_hand_computed_value() -> None:
    teacher, student = nn.Linear(2, 1, bias=False), nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        teacher.weight.copy_(torch.tensor([[1.0, -2.0]]))
        student.weight.copy_(torch.tensor([[3.0, 2.0]]))
    ema_update(teacher, student, 0.75)  # 0.75 * t + 0.25 * s
    torch.testing.assert_close(teacher.weight, torch.tensor([[1.5, -1.0]]))
    assert torch.equal(student.weight, torch.tensor([[3.0, 2.0]]))


def test_buffers_are_copied() -> None:
    teacher, student = _pair()
    student.train()
    student(torch.randn(8, 3))  # moves the BatchNorm running statistics
    ema_update(teacher, student, 0.9)
    for (name, t), s in zip(teacher.named_buffers(), student.buffers()):
        assert torch.equal(t, s), name


def test_mismatched_networks_raise() -> None:
    teacher, student = _pair()
    with pytest.raises(ValueError, match="names"):
        ema_update(teacher, nn.Sequential(nn.Linear(3, 4)), 0.9)
    with pytest.raises(ValueError, match="shape"):
        ema_update(nn.Linear(3, 4), nn.Linear(3, 5), 0.9)
    with pytest.raises(ValueError, match="momentum"):
        ema_update(teacher, student, 1.5)


def test_no_gradient_reaches_the_teacher() -> None:
    teacher, student = _pair()
    freeze(teacher)
    assert not teacher.training and all(not p.requires_grad for p in teacher.parameters())
    inputs = torch.randn(5, 3)
    student.train()
    loss = (student(inputs) - teacher(inputs)).pow(2).sum()
    loss.backward()
    ema_update(teacher, student, 0.5)
    assert all(p.grad is None and p.grad_fn is None and not p.requires_grad for p in teacher.parameters())
    assert all(p.grad is not None for p in student.parameters())


def test_update_does_not_build_a_graph_for_trainable_teacher() -> None:
    teacher, student = _pair()  # neither frozen: the update itself must stay out of autograd
    ema_update(teacher, student, 0.5)
    assert all(p.is_leaf and p.grad_fn is None for p in teacher.parameters())
