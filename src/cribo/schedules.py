"""Training schedules as pure functions of the global step or the epoch (no state; resume needs only the step).

Per-step schedules (learning rate, weight decay, teacher momentum) are float64 arrays of one value per optimiser
step, built once and indexed by the global step, as in DINO's ``cosine_scheduler``. Per-epoch schedules (teacher
temperatures, ``pos_alpha``, last-layer freezing) are evaluated directly from the epoch. :class:`Schedules` holds a
run's arrays and gives every value of one step as a :class:`StepValues` (plain floats: the losses know no epochs).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np
import numpy.typing as npt

from cribo.config import TrainConfig

PosAlphaOrder = Literal["paper", "authors"]
POS_ALPHA_ORDERS: tuple[str, ...] = get_args(PosAlphaOrder)

LR_REFERENCE_BATCH = 256  # linear scaling rule: lr is given per 256 images (DINO / authors' main_cribo.py)
FINAL_TEACHER_MOMENTUM = 1.0  # teacher momentum goes from --momentum_teacher to 1 (DINO / authors)


def cosine_schedule(
    base: float, final: float, total_steps: int, warmup_steps: int = 0, warmup_start: float = 0.0
) -> npt.NDArray[np.float64]:
    """Linear warm-up then half-cosine decay, one value per step (DINO's ``cosine_scheduler``).

    Steps ``0 .. warmup_steps-1`` are ``linspace(warmup_start, base, warmup_steps)``; the remaining
    ``L = total_steps - warmup_steps`` steps are ``final + (base - final) * (1 + cos(pi * i / L)) / 2`` for
    ``i = 0 .. L-1`` (so the last value approaches, but does not reach, ``final``).

    Args:
        base: value at the end of the warm-up (start of the cosine).
        final: value the cosine decays towards.
        total_steps: length of the schedule (epochs * steps per epoch), >= 1.
        warmup_steps: number of warm-up steps, ``0 <= warmup_steps <= total_steps``.
        warmup_start: first warm-up value.

    Returns:
        ``(total_steps,)`` float64.
    """
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if not 0 <= warmup_steps <= total_steps:
        raise ValueError(f"warmup_steps must lie in [0, total_steps={total_steps}], got {warmup_steps}")
    warmup = np.linspace(warmup_start, base, warmup_steps, dtype=np.float64)
    decay_steps = total_steps - warmup_steps
    progress = np.arange(decay_steps, dtype=np.float64) / max(decay_steps, 1)
    decay = final + 0.5 * (base - final) * (1 + np.cos(np.pi * progress))
    return np.concatenate([warmup, decay])


def scaled_lr(lr: float, total_batch: int) -> float:
    """Linear scaling rule: ``lr * total_batch / 256``, with ``total_batch`` summed over all processes."""
    if total_batch < 1:
        raise ValueError(f"total_batch must be >= 1, got {total_batch}")
    return lr * total_batch / LR_REFERENCE_BATCH


def lr_schedule(
    lr: float, min_lr: float, total_batch: int, epochs: int, steps_per_epoch: int, warmup_epochs: int
) -> npt.NDArray[np.float64]:
    """Per-step learning rate: linear warm-up from 0 to the scaled lr over ``warmup_epochs``, cosine to ``min_lr``.

    Returns:
        ``(epochs * steps_per_epoch,)`` float64.
    """
    _check_epochs(epochs, steps_per_epoch)
    return cosine_schedule(
        scaled_lr(lr, total_batch), min_lr, epochs * steps_per_epoch, warmup_steps=warmup_epochs * steps_per_epoch
    )


def weight_decay_schedule(
    weight_decay: float, weight_decay_end: float, epochs: int, steps_per_epoch: int
) -> npt.NDArray[np.float64]:
    """Per-step weight decay, cosine from ``weight_decay`` to ``weight_decay_end`` (0.04 -> 0.4 in CrIBo).

    Returns:
        ``(epochs * steps_per_epoch,)`` float64.
    """
    _check_epochs(epochs, steps_per_epoch)
    return cosine_schedule(weight_decay, weight_decay_end, epochs * steps_per_epoch)


def teacher_momentum_schedule(momentum_teacher: float, epochs: int, steps_per_epoch: int) -> npt.NDArray[np.float64]:
    """Per-step EMA momentum of the teacher, cosine from ``momentum_teacher`` (0.996) to 1.

    Returns:
        ``(epochs * steps_per_epoch,)`` float64.
    """
    _check_epochs(epochs, steps_per_epoch)
    return cosine_schedule(momentum_teacher, FINAL_TEACHER_MOMENTUM, epochs * steps_per_epoch)


def teacher_temperature(epoch: int, warmup_temp: float, temp: float, warmup_epochs: int) -> float:
    """Teacher temperature at ``epoch``: ``linspace(warmup_temp, temp, warmup_epochs)[epoch]``, then ``temp``.

    Equal, bit for bit, to the authors' ``concat(linspace(warmup, temp, warmup_epochs), temp * ones(...))[epoch]``.
    """
    if epoch < 0:
        raise ValueError(f"epoch must be >= 0, got {epoch}")
    if warmup_epochs < 0:
        raise ValueError(f"warmup_epochs must be >= 0, got {warmup_epochs}")
    if epoch < warmup_epochs:
        return float(np.linspace(warmup_temp, temp, warmup_epochs, dtype=np.float64)[epoch])
    return float(temp)


def pos_alpha_at(epoch: int, epochs: int, pos_alpha: tuple[float, float], order: PosAlphaOrder = "paper") -> float:
    """Weight of the spatial cost at ``epoch``, a float64 ``linspace`` over the ``epochs`` of training.

    Args:
        epoch: current epoch, ``0 <= epoch < epochs``.
        epochs: total number of epochs.
        pos_alpha: the ``--pos_alpha`` pair.
        order: ``"paper"`` runs from ``pos_alpha[0]`` to ``pos_alpha[1]``; ``"authors"`` from ``pos_alpha[1]`` to
            ``pos_alpha[0]`` (README quirk 3). Identical for the published constant pairs.
    """
    if order not in POS_ALPHA_ORDERS:
        raise ValueError(f"order must be one of {POS_ALPHA_ORDERS}, got {order!r}")
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    if not 0 <= epoch < epochs:
        raise ValueError(f"epoch must lie in [0, epochs={epochs}), got {epoch}")
    if len(pos_alpha) != 2:
        raise ValueError(f"pos_alpha must be a pair (first, second), got {pos_alpha!r}")
    start, stop = (pos_alpha[0], pos_alpha[1]) if order == "paper" else (pos_alpha[1], pos_alpha[0])
    return float(np.linspace(start, stop, epochs, dtype=np.float64)[epoch])


def last_layer_frozen(epoch: int, freeze_last_layer: int) -> bool:
    """Whether the heads' last layers get no update at ``epoch`` (the first ``freeze_last_layer`` epochs)."""
    if freeze_last_layer < 0:
        raise ValueError(f"freeze_last_layer must be >= 0, got {freeze_last_layer}")
    return epoch < freeze_last_layer


def _check_epochs(epochs: int, steps_per_epoch: int) -> None:
    if epochs < 1 or steps_per_epoch < 1:
        raise ValueError(f"epochs and steps_per_epoch must be >= 1, got {epochs} and {steps_per_epoch}")


@dataclass(frozen=True)
class StepValues:
    """Schedule values at one step (plain floats: the losses know no epochs)."""

    lr: float
    weight_decay: float
    momentum: float
    teacher_temp: float
    teacher_temp_c: float
    pos_alpha: float
    cross_image: bool
    freeze_last_layer: bool


@dataclass(frozen=True)
class Schedules:
    """Every per-step value: DINO-style arrays over global steps, and the per-epoch values of the configuration."""

    config: TrainConfig
    lr: np.ndarray
    weight_decay: np.ndarray
    momentum: np.ndarray

    @classmethod
    def build(cls, config: TrainConfig, iters: int, world_size: int) -> Schedules:
        opt = config.optim
        total_batch = opt.batch_size_per_gpu * world_size
        return cls(
            config=config,
            lr=lr_schedule(opt.lr, opt.min_lr, total_batch, opt.epochs, iters, opt.warmup_epochs),
            weight_decay=weight_decay_schedule(opt.weight_decay, opt.weight_decay_end, opt.epochs, iters),
            momentum=teacher_momentum_schedule(opt.momentum_teacher, opt.epochs, iters),
        )

    def at(self, step: int, epoch: int) -> StepValues:
        """The values of global step ``step`` in epoch ``epoch``."""
        cfg, it = self.config, min(step, len(self.lr) - 1)
        loss = cfg.loss
        return StepValues(
            lr=float(self.lr[it]),
            weight_decay=float(self.weight_decay[it]),
            momentum=float(self.momentum[it]),
            teacher_temp=teacher_temperature(
                epoch, loss.warmup_teacher_temp, loss.teacher_temp, loss.warmup_teacher_temp_epochs
            ),
            teacher_temp_c=teacher_temperature(
                epoch, loss.warmup_teacher_temp_c, loss.teacher_temp_c, loss.warmup_teacher_temp_epochs
            ),
            pos_alpha=pos_alpha_at(epoch, cfg.optim.epochs, cfg.method.pos_alpha, order=cfg.method.semantics),
            cross_image=epoch >= 1,  # the cross-image term starts with the second epoch (paper §3.3)
            freeze_last_layer=last_layer_frozen(epoch, cfg.optim.freeze_last_layer),
        )
