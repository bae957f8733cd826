"""Training checkpoints: the trainer's state as a file, written atomically, and its exact restoration.

A run directory holds one ``checkpoint.pth`` (rewritten in place, atomically: temp file, fsync, rename) and,
optionally, snapshots ``checkpointNNNN.pth``. The file is a plain dict of tensors, numbers, strings and nested
dicts/lists of them (:func:`trainer_state`), so it loads with ``torch.load(weights_only=True)``; with the
random-number states it holds, :func:`load_trainer` resumes a run bit for bit.

Before a run resumes, :func:`read_resume_state` tells a damaged file from a foreign one and refuses settings that
change a saved tensor's shape (:data:`SHAPE_SETTINGS`), and the run folder is made ready: checked writable
(:func:`check_output_dir`), temp files of a killed writer removed, ``log.txt`` cut back to the checkpoint's step
(the running log window is saved too, so the resumed run writes exactly the lines of an uninterrupted one). A full
disk while saving keeps the previous checkpoint and says which step it holds (:class:`cribo.files.DiskFullError`).
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
from cribo.files import TEMP_PATTERN, DiskFullError, atomic_save, disk_full_cause
from cribo.hub import PickleRefusedError, WeightsFileError, read_torch_file

if TYPE_CHECKING:
    from cribo.train import Trainer

logger = logging.getLogger(__name__)

CHECKPOINT_NAME = "checkpoint.pth"
SNAPSHOT_NAME = "checkpoint{epoch:04d}.pth"
# Settings that change the shape of a saved tensor or the optimiser's parameter groups: a run cannot resume from a
# checkpoint written with other values (its tensors would not load, or the optimiser state would not match).
SHAPE_SETTINGS: tuple[tuple[str, str], ...] = (
    ("model", "arch"),
    ("model", "patch_size"),
    ("model", "depth"),
    ("model", "out_dim"),
    ("model", "out_dim_c"),
    ("model", "head_hidden_dim"),
    ("model", "head_bottleneck_dim"),
    ("model", "use_bn_in_head"),
    ("model", "norm_last_layer"),
    ("model", "frozen_blocks"),
    ("method", "n_tokens"),
    ("method", "queue_size"),
    ("optim", "backbone_lr_scale"),
)


def disk_full_error(path: Path, output_dir: Path) -> DiskFullError:
    """The error for a write to ``path`` that ran out of space, naming the checkpoint that survives."""
    last = saved_step(Path(output_dir) / CHECKPOINT_NAME)
    return DiskFullError(
        f"{path}: no space left on device, last good checkpoint: step {'none' if last is None else last} "
        f"({Path(output_dir) / CHECKPOINT_NAME}); free some space and run the same command again to resume"
    )


def load(path: Path, mmap: bool = False) -> dict[str, Any]:
    """Load a cribo checkpoint with the safe loader (it holds no pickled objects); ``mmap`` maps the tensors'
    bytes instead of reading them (a quick look at the small entries).

    Raises:
        ValueError: the file is damaged, truncated, pickled or not a cribo training checkpoint; the message says
            how to resume or start over.
    """
    path = Path(path)
    try:
        data = read_torch_file(path, mmap=mmap)
    except WeightsFileError as err:
        problem = err.problem or "cannot be read"
        raise ValueError(f"{path} is not a valid checkpoint: it {problem}. {_restart_advice(path)}") from err
    except PickleRefusedError as err:
        raise ValueError(
            f"{path} holds pickled Python objects, which a cribo training checkpoint never does, so it is not one. "
            f"{_restart_advice(path)}"
        ) from err
    if not isinstance(data, dict) or "student" not in data or "step" not in data:
        raise ValueError(
            f"{path} is not a cribo training checkpoint (expected keys 'student', 'step', ...). {_restart_advice(path)}"
        )
    return data


def _restart_advice(path: Path) -> str:
    """What to do with a run directory whose checkpoint cannot be resumed."""
    snapshots = sorted(path.parent.glob("checkpoint[0-9][0-9][0-9][0-9].pth"))
    snapshot = f"copy the snapshot {snapshots[-1].name} over it to resume from there, or " if snapshots else ""
    return f"To continue, {snapshot}move it away or pass a new --output_dir to start a new run"


def saved_step(path: Path) -> int | None:
    """The step of the checkpoint at ``path``, or None when there is none (or it cannot be read)."""
    if not path.is_file():
        return None
    try:  # memory-mapped: only the small entries are read
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # a damaged file has no step to report (the caller says "none")
        return None
    step = state.get("step") if isinstance(state, dict) else None
    return int(step) if isinstance(step, int) else None


def check_resume_config(saved: dict[str, Any], config: config_lib.TrainConfig, path: Path) -> None:
    """Fail before loading when the run's settings change a tensor shape or parameter group of the checkpoint.

    Raises:
        ValueError: naming each differing setting, the checkpoint's value and this run's, and how to go on.
    """
    current = config_lib.to_dict(config)
    differences = []
    for section, name in SHAPE_SETTINGS:
        old = saved.get(section, {}).get(name) if isinstance(saved.get(section), dict) else None
        new = current[section][name]
        if old is not None and old != new:
            differences.append((name, old, new))
    if differences:
        found = ", ".join(f"--{name} {old} in the checkpoint, {new} in this run" for name, old, new in differences)
        keep = " ".join(f"--{name} {old}" for name, old, _ in differences)
        raise ValueError(
            f"{path} cannot be resumed with these settings ({found}): they change the shape of saved tensors or the "
            f"optimiser's parameter groups. Resume with {keep}, or pass a new --output_dir to start a new run"
        )


def read_resume_state(output_dir: Path, config: config_lib.TrainConfig, mmap: bool = False) -> dict[str, Any] | None:
    """The checkpoint a run in ``output_dir`` resumes from (checked against ``config``), or None for a fresh run.

    Raises:
        ValueError: the checkpoint is damaged or not a cribo checkpoint, or ``config`` changes a tensor shape.
    """
    path = Path(output_dir) / CHECKPOINT_NAME
    if not path.exists():
        return None
    if not path.is_file():
        raise ValueError(f"{path} is not a file; move it away or pass a new --output_dir")
    state = load(path, mmap=mmap)
    if isinstance(state.get("config"), dict):
        check_resume_config(state["config"], config, path)
    return state


def check_output_dir(output_dir: Path) -> None:
    """Check, without creating anything, that ``--output_dir`` is or can become a folder this process writes to.

    Raises:
        ValueError: it is a file, sits under a file, or it (or the folder it would be created in) is not writable.
    """
    path = Path(output_dir)
    if path.exists() and not path.is_dir():
        raise ValueError(f"--output_dir {path} is a file, not a folder; pass a folder (it is created if missing)")
    existing = path if path.exists() else next((folder for folder in path.parents if folder.exists()), None)
    if existing is None:
        return
    if not existing.is_dir():
        raise ValueError(f"--output_dir {path}: {existing} is a file, so no folder can be created under it")
    probe = existing / f".write-test.tmp-{os.getpid()}"  # TEMP_PATTERN: removed by a later run if ever left
    try:
        probe.write_bytes(b"")
    except OSError as err:
        where = "" if existing == path else f" (it would be created in {existing})"
        raise ValueError(
            f"--output_dir {path} is not writable{where}: {err.strerror or err}; pass a folder you can write to"
        ) from err
    finally:
        probe.unlink(missing_ok=True)


def prepare_output_dir(output_dir: Path) -> Path:
    """Create ``--output_dir`` if needed, after :func:`check_output_dir`; returns it."""
    path = Path(output_dir)
    check_output_dir(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(f"--output_dir {path} cannot be created: {err.strerror or err}") from err
    return path


def remove_stale_temp_files(output_dir: Path) -> list[Path]:
    """Delete the temp files that a killed writer left in ``output_dir`` (``.<name>.tmp-<pid>``); returns them.

    A file is stale when its process is gone or is this one (which has not started writing yet).
    """
    removed = []
    for path in Path(output_dir).iterdir():
        match = TEMP_PATTERN.fullmatch(path.name)
        if match is None or not path.is_file() or _process_alive(int(match["pid"])):
            continue
        path.unlink(missing_ok=True)
        removed.append(path)
        logger.warning("removed %s, left by an interrupted write", path)
    return removed


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


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
        "log_window": trainer.log_window.state(),
        "init": trainer.init,
    }


def save_trainer(trainer: Trainer, output_dir: Path, snapshot: bool = False) -> None:
    """Write ``checkpoint.pth`` atomically (rank 0), and a numbered snapshot when asked.

    Raises:
        DiskFullError: no space left on the device; the previous checkpoint is intact and the message gives its step.
    """
    if not distributed.is_main_process():
        return
    state = trainer_state(trainer)
    targets = [output_dir / CHECKPOINT_NAME] + (
        [output_dir / SNAPSHOT_NAME.format(epoch=trainer.epoch)] if snapshot else []
    )
    for path in targets:
        try:
            atomic_save(state, path)
        except (OSError, RuntimeError) as err:
            if disk_full_cause(err) is not None:
                raise disk_full_error(path, output_dir) from err
            if isinstance(err, OSError):  # name the checkpoint, not its temp file
                raise OSError(err.errno, err.strerror or str(err), str(path)) from err
            raise


def load_trainer(trainer: Trainer, state: dict[str, Any]) -> None:
    """Restore a :func:`trainer_state` into a freshly built trainer.

    If the number of steps per epoch changed (other data size, batch size or number of processes), the position
    is carried over by images seen in the current epoch and a warning says the resume is no longer exact.
    """
    modules = trainer.modules
    try:
        modules.student.load_state_dict(state["student"])
        modules.teacher.load_state_dict(state["teacher"])
        modules.optimizer.load_state_dict(state["optimizer"])
        modules.scaler.load_state_dict(state["scaler"])
        modules.criterion.load_state_dict(state["criterion"])
        modules.bank.load_state_dict(state["bank"])
    except (RuntimeError, ValueError, KeyError) as err:  # what load_state_dict raises for tensors that do not fit
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(
            f"the checkpoint does not fit this run's networks ({first_line}); resume with the settings it was "
            "written with (its config.yaml), or pass a new --output_dir to start a new run"
        ) from err
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
    trainer.log_window.restore(state.get("log_window", {}))
    trainer.init = dict(state.get("init", {}))
    modules.cluster_generator.set_state(state["cluster_rng"])
    if distributed.rank() == 0:
        set_rng_state(state["rng"])
    else:  # other ranks continue from a distinct, reproducible stream
        torch.manual_seed(trainer.config.run.seed + distributed.rank() + trainer.step)
