"""Training checkpoints: the trainer's state as a file, written atomically, and its exact restoration.

A run directory holds one ``checkpoint.pth`` (rewritten in place, atomically: temp file, fsync, rename) and,
optionally, snapshots ``checkpointNNNN.pth``. The file is a plain dict of tensors, numbers, strings and nested
dicts/lists of them (:func:`trainer_state`), so it loads with ``torch.load(weights_only=True)``; with the
random-number states it holds, :func:`load_trainer` resumes a run bit for bit.
"""

from __future__ import annotations

import logging
import os
import random
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from cribo import config as config_lib
from cribo import distributed

if TYPE_CHECKING:
    from cribo.train import Trainer

logger = logging.getLogger(__name__)

CHECKPOINT_NAME = "checkpoint.pth"
SNAPSHOT_NAME = "checkpoint{epoch:04d}.pth"


def atomic_save(obj: Any, path: Path) -> None:
    """Write ``obj`` with ``torch.save`` so that ``path`` always holds either the old or the new file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    # Make the rename itself durable where the platform allows it.
    try:
        fd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    """Write a small text file so that ``path`` always holds either the old or the new text."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def load(path: Path) -> dict[str, Any]:
    """Load a cribo checkpoint with the safe loader (it holds no pickled objects)."""
    data = torch.load(Path(path), map_location="cpu", weights_only=True)
    if not isinstance(data, dict) or "student" not in data or "step" not in data:
        raise ValueError(f"{path} is not a cribo training checkpoint (expected keys 'student', 'step', ...)")
    return data


def rng_state() -> dict[str, Any]:
    """Every global RNG state that training consumes (Python, NumPy, torch CPU, torch CUDA if present)."""
    _, keys, position, *_ = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy_keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
        "numpy_pos": int(position),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda_rng"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    keys = state["numpy_keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, state["numpy_pos"], 0, 0.0))
    torch.set_rng_state(state["torch"])
    if "cuda_rng" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])


def trainer_state(trainer: Trainer) -> dict[str, Any]:
    """Everything needed for an exact resume of ``trainer``."""
    modules = trainer.modules
    return {
        "student": modules.student.state_dict(),
        "teacher": modules.teacher.state_dict(),
        "optimizer": modules.optimizer.state_dict(),
        "scaler": modules.scaler.state_dict(),
        "criterion": modules.criterion.state_dict(),
        "bank": modules.bank.state_dict(),
        "epoch": trainer.epoch,
        "step": trainer.step,
        "iters_per_epoch": trainer.iters_per_epoch,
        "world_size": distributed.world_size(),
        "skipped_images": trainer.skipped_images,
        "rng": rng_state(),
        "cluster_rng": modules.cluster_generator.get_state(),
        "config": config_lib.to_dict(trainer.config),
        "history": trainer.history,
        "init": trainer.init,
    }


def save_trainer(trainer: Trainer, output_dir: Path, snapshot: bool = False) -> None:
    """Write ``checkpoint.pth`` atomically (rank 0), and a numbered snapshot when asked."""
    if not distributed.is_main_process():
        return
    state = trainer_state(trainer)
    atomic_save(state, output_dir / CHECKPOINT_NAME)
    if snapshot:
        atomic_save(state, output_dir / SNAPSHOT_NAME.format(epoch=trainer.epoch))


def load_trainer(trainer: Trainer, state: dict[str, Any]) -> None:
    """Restore a :func:`trainer_state` into a freshly built trainer.

    If the number of steps per epoch changed (other data size, batch size or number of processes), the position
    is carried over by images seen in the current epoch and a warning says the resume is no longer exact.
    """
    modules = trainer.modules
    modules.student.load_state_dict(state["student"])
    modules.teacher.load_state_dict(state["teacher"])
    modules.optimizer.load_state_dict(state["optimizer"])
    modules.scaler.load_state_dict(state["scaler"])
    modules.criterion.load_state_dict(state["criterion"])
    modules.bank.load_state_dict(state["bank"])
    modules.bank_keys.clear()  # the bank changed other than by a push
    trainer.epoch, trainer.step = state["epoch"], state["step"]
    old_iters = state["iters_per_epoch"]
    if old_iters != trainer.iters_per_epoch:
        epoch, in_epoch = divmod(state["step"], old_iters)
        trainer.step = epoch * trainer.iters_per_epoch + in_epoch * trainer.iters_per_epoch // old_iters
        logger.warning(
            "the checkpoint has %d steps per epoch (world size %d), this run %d (world size %d): continuing at "
            "step %d of epoch %d; the resume is not bit-exact",
            old_iters,
            state.get("world_size", 1),
            trainer.iters_per_epoch,
            distributed.world_size(),
            trainer.step,
            epoch,
        )
    trainer.skipped_images = state.get("skipped_images", 0)
    trainer.history = list(state.get("history", []))
    trainer.init = dict(state.get("init", {}))
    modules.cluster_generator.set_state(state["cluster_rng"])
    if distributed.rank() == 0:
        set_rng_state(state["rng"])
    else:  # other ranks continue from a distinct, reproducible stream
        torch.manual_seed(trainer.config.run.seed + distributed.rank() + trainer.step)
