"""The EMA teacher: a frozen copy of the student, moved towards it after every optimiser step (paper §3.1).

``teacher <- momentum * teacher + (1 - momentum) * student`` on the parameters; buffers are copied.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def _matched(kind: str, teacher: dict[str, Tensor], student: dict[str, Tensor]) -> tuple[list[Tensor], list[Tensor]]:
    """Pair the teacher's and the student's tensors by name; names and shapes must agree exactly."""
    if teacher.keys() != student.keys():
        only_teacher = sorted(teacher.keys() - student.keys())[:5]
        only_student = sorted(student.keys() - teacher.keys())[:5]
        raise ValueError(
            f"teacher and student {kind} names differ: only in teacher {only_teacher}, only in student {only_student}"
        )
    for name, value in teacher.items():
        if value.shape != student[name].shape:
            raise ValueError(
                f"teacher and student {kind} {name!r} differ in shape: "
                f"{tuple(value.shape)} vs {tuple(student[name].shape)}"
            )
    names = list(teacher)
    return [teacher[name] for name in names], [student[name] for name in names]


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """Move the teacher's parameters towards the student's, in place, with one fused foreach lerp.

    Args:
        teacher: the EMA network (same architecture and parameter names as ``student``).
        student: the trained network; pass the bare module, not a ``DistributedDataParallel`` wrapper.
        momentum: EMA momentum in [0, 1]; 0 copies the student, 1 leaves the teacher unchanged.
    """
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must lie in [0, 1], got {momentum}")
    teacher_params, student_params = _matched(
        "parameter", dict(teacher.named_parameters()), dict(student.named_parameters())
    )
    teacher_buffers, student_buffers = _matched("buffer", dict(teacher.named_buffers()), dict(student.named_buffers()))
    if teacher_params:
        # lerp(t, s, 1 - m) = m * t + (1 - m) * s, exact at m = 0 and m = 1.
        torch._foreach_lerp_(teacher_params, [p.detach() for p in student_params], 1.0 - momentum)
    for teacher_buffer, student_buffer in zip(teacher_buffers, student_buffers):
        teacher_buffer.copy_(student_buffer)


def freeze(module: nn.Module) -> None:
    """Stop gradients to every parameter of ``module`` and put it in eval mode (the teacher is never trained).

    The loop must not call ``.train()`` on the teacher afterwards (it would switch dropout/drop-path back on).
    """
    for parameter in module.parameters():
        parameter.requires_grad_(False)
    module.eval()
