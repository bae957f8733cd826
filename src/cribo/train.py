"""CrIBo pretraining: ``build_*`` helpers around one loop (DESIGN.md §2, §3).

:func:`build_trainer` turns a :class:`~cribo.config.TrainConfig` into a :class:`Trainer`; :func:`fit` runs (or
resumes) the loop: for each batch, the schedules' values, one :func:`cribo.step.train_step`, a log line every
``log_every`` steps, a checkpoint every ``checkpoint_every`` steps and at each epoch's end. Everything random is
seeded and saved, so stopping and resuming gives the same weights bit for bit on CPU.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from cribo import checkpoint, distributed, files, logs
from cribo import config as config_lib
from cribo.clustering import ClusteringSettings
from cribo.config import TrainConfig
from cribo.data.pretrain import Batch, Loader, build_loader, iterations_per_epoch
from cribo.fused import TargetBuilder
from cribo.hub import InitReport, initialize_network, read_init_weights
from cribo.losses import CrIBoLoss
from cribo.memory import ObjectMemoryBank
from cribo.models import CrIBoNetwork, ProjectionHead, create_backbone, freeze_blocks
from cribo.runtime import autocast_dtype, resolve_device
from cribo.schedules import Schedules, StepValues
from cribo.search import BankKeys
from cribo.step import (
    LossWeights,
    NonFiniteLossError,
    StepModules,
    StepSettings,
    StudentStep,
    train_step,
)
from cribo.teacher import freeze

if TYPE_CHECKING:
    from tqdm import tqdm

__all__ = ["NonFiniteLossError", "Schedules", "TrainResult", "Trainer", "build_trainer", "fit", "train"]

logger = logging.getLogger(__name__)

INIT_REPORT_NAME = "init.json"  # what --init loaded, next to config.yaml
AUTHORS_STUDENT_TEMP = 0.1  # the [CLS] student temperature the authors' training really uses (README quirk 4)
CLUSTER_SEED_OFFSET = 1  # the clustering generator of rank r is seeded seed + 1 + r (distinct from the init seed)


# --------------------------------------------------------------------------------------------------------------
# Building
# --------------------------------------------------------------------------------------------------------------


def build_network(config: TrainConfig, drop_path_rate: float, norm_last_layer: bool) -> CrIBoNetwork:
    """Backbone + projection head of the configured size."""
    model = config.model
    backbone = create_backbone(
        model.arch, patch_size=model.patch_size, drop_path_rate=drop_path_rate, depth=model.depth or None
    )
    head = ProjectionHead(
        backbone.embed_dim,
        model.out_dim,
        model.out_dim_c,
        hidden_dim=model.head_hidden_dim,
        bottleneck_dim=model.head_bottleneck_dim,
        use_bn=model.use_bn_in_head,
        norm_last_layer=norm_last_layer,
    )
    return CrIBoNetwork(backbone, head)


def build_criterion(config: TrainConfig) -> CrIBoLoss:
    """The loss with its centres; ``semantics: authors`` fixes the [CLS] student temperature at 0.1 (quirk 4)
    and normalises the cross-image term by view 1's count (quirk 1)."""
    authors = config.method.semantics == "authors"
    return CrIBoLoss(
        config.model.out_dim,
        config.model.out_dim_c,
        student_temp=AUTHORS_STUDENT_TEMP if authors else config.loss.student_temp,
        student_temp_c=config.loss.student_temp_c,
        center_momentum=config.loss.center_momentum,
        center_momentum_c=config.loss.center_momentum,
        cross_image_normalization="view1" if authors else "per_view",
    )


def build_step_settings(config: TrainConfig, device: torch.device) -> StepSettings:
    """The fixed settings of every step."""
    method, loss = config.method, config.loss
    clustering = ClusteringSettings(
        sinkhorn_lambda=method.sinkhorn_lambda,
        sinkhorn_iterations=method.sinkhorn_iterations,
        num_rounds=method.n_iter,
        update_marginals=method.update_c,
        cost_normalization="batch" if method.semantics == "authors" else "image",
    )
    return StepSettings(
        num_clusters=method.n_tokens,
        clustering=clustering,
        bank_chunk_size=method.bank_chunk_size,
        loss_weights=LossWeights(loss.weight_global, loss.weight_object, loss.weight_cross_image),
        clip_grad=config.optim.clip_grad,
        amp_dtype=autocast_dtype(config.run.precision, device),
        device=device,
    )


def parameter_groups(model: CrIBoNetwork, backbone_lr_scale: float = 1.0) -> list[dict[str, Any]]:
    """The authors' two groups: no weight decay on biases and 1-d parameters (norms), decay on the rest; frozen
    parameters left out. With ``backbone_lr_scale != 1`` the backbone's parameters form two more groups whose
    learning rate is scaled (see :func:`cribo.step.set_optimizer_values`)."""
    groups: dict[tuple[bool, float], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        decay = not (name.endswith(".bias") or param.ndim == 1)
        scale = backbone_lr_scale if name.startswith("backbone.") else 1.0
        groups.setdefault((decay, scale), []).append(param)
    scales = sorted({1.0, backbone_lr_scale}, reverse=True)  # the heads' (and, at scale 1, everything's) groups first
    return [
        {"params": groups.get((decay, scale), []), "weight_decay_on": decay, "lr_scale": scale}
        | ({} if decay else {"weight_decay": 0.0})
        for scale in scales
        for decay in (True, False)
    ]


def build_modules(config: TrainConfig, settings: StepSettings) -> StepModules:
    """Networks (identical initial weights on every process), loss, bank, optimiser and generators."""
    device, rank = settings.device, distributed.rank()
    torch.manual_seed(config.run.seed)  # identical initial weights on every process
    student = build_network(config, config.model.drop_path_rate, config.model.norm_last_layer).to(device)
    teacher = build_network(config, 0.0, True).to(device)
    teacher.load_state_dict(student.state_dict())
    freeze(teacher)
    freeze_blocks(student.backbone, config.model.frozen_blocks)  # before DDP and the optimiser see the parameters
    criterion = build_criterion(config).to(device)
    student_step: nn.Module = StudentStep(student, (criterion.student_temp, criterion.student_temp_c))
    if distributed.is_enabled():
        device_ids = [device.index] if device.type == "cuda" else None
        student_step = nn.parallel.DistributedDataParallel(student_step, device_ids=device_ids)
    torch.manual_seed(config.run.seed + rank)  # from here on (drop-path), each process draws its own stream
    np.random.seed(config.run.seed + rank)
    random.seed(config.run.seed + rank)  # saved in checkpoints too: two identical runs store the same state
    bank_generator = torch.Generator().manual_seed(config.run.seed)
    bank = ObjectMemoryBank(
        config.method.queue_size, config.method.n_tokens, student.backbone.embed_dim, generator=bank_generator
    ).to(device)
    # The fused AdamW kernel (CPU and CUDA) makes no parameter-sized temporaries; ~4x faster than foreach on CPU.
    fused = device.type in ("cpu", "cuda")
    groups = parameter_groups(student, config.optim.backbone_lr_scale)
    optimizer = torch.optim.AdamW(groups, fused=fused, foreach=None if fused else True)
    cluster_seed = config.run.seed + CLUSTER_SEED_OFFSET + rank
    return StepModules(
        teacher=teacher,
        student=student,
        student_step=student_step,
        criterion=criterion,
        targets=TargetBuilder(),
        bank=bank,
        bank_keys=BankKeys(),
        optimizer=optimizer,
        scaler=torch.amp.GradScaler(device.type, enabled=settings.amp_dtype == torch.float16),
        cluster_generator=torch.Generator(device=device).manual_seed(cluster_seed),
    )


@dataclass
class Trainer:
    """A run's whole state: what a step touches (``modules``, ``settings``), the data and the position."""

    config: TrainConfig
    modules: StepModules
    settings: StepSettings
    schedules: Schedules
    data: Loader
    iters_per_epoch: int
    epoch: int = 0
    step: int = 0  # global step: epochs * iters_per_epoch + step in epoch
    skipped_images: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    log_window: logs.RunningMeans = field(default_factory=logs.RunningMeans)  # steps since the last log line
    init: dict[str, Any] = field(default_factory=dict)  # the InitReport of --init (empty without one)

    @property
    def device(self) -> torch.device:
        return self.settings.device

    def values(self) -> StepValues:
        """The schedules' values at the current step."""
        return self.schedules.at(self.step, self.epoch)


def build_trainer(config: TrainConfig) -> Trainer:
    """Construct networks, loss, bank, optimiser, data and schedules from the configuration."""
    device = resolve_device(config.run.device)
    if not config.model.init and (config.optim.backbone_lr_scale < 1 or config.model.frozen_blocks):
        logger.warning(
            "--backbone_lr_scale %g / --frozen_blocks %d are post-training settings, but no --init is given: the "
            "backbone starts from random weights",
            config.optim.backbone_lr_scale,
            config.model.frozen_blocks,
        )
    world, rank = distributed.world_size(), distributed.rank()
    settings = build_step_settings(config, device)
    modules = build_modules(config, settings)
    data = build_loader(config, device, rank, world)
    iters = iterations_per_epoch(data.sampler.num_items, config.optim.batch_size_per_gpu, world)
    return Trainer(config, modules, settings, Schedules.build(config, iters, world), data, iters)


def apply_init(trainer: Trainer) -> InitReport:
    """Start student and teacher from ``model.init`` (a fresh run only; a resumed run has its own weights).

    The teacher's weights (backbone; head tensors whose shapes fit) go into both networks; the loss centres too
    when the whole head was loaded. The report is logged and kept in the trainer (saved with the checkpoint).
    """
    config, modules = trainer.config, trainer.modules
    weights = read_init_weights(config.model.init, config.model.patch_size)
    report = initialize_network(modules.student, weights, config.model.init)
    modules.teacher.load_state_dict(modules.student.state_dict())
    criterion = modules.criterion
    centers = weights.centers
    fits = (
        not report.head_fresh
        and set(centers) == {"center", "center_c"}
        and centers["center"].shape == criterion.center.center.shape
        and centers["center_c"].shape == criterion.center_c.center.shape
    )
    if fits:
        criterion.load_authors_centers(centers)
        report = dataclasses.replace(report, centers_loaded=True)
    for line in report.lines():
        logger.info(line)
    trainer.init = report.to_dict()
    return report


# --------------------------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------------------------


def write_log_line(trainer: Trainer, numbers: dict[str, float], output_dir: Path) -> None:
    """One line of ``log.txt`` at the trainer's position, kept in its history too."""
    record = logs.log_record((trainer.epoch, trainer.step), numbers, trainer.device, trainer.skipped_images)
    trainer.history.append({key: float(value) for key, value in record.items()})
    logs.append_line(output_dir, record)


def one_step(trainer: Trainer, batch: Batch) -> dict[str, float]:
    """:func:`cribo.step.train_step` at the trainer's position, with the position in a non-finite loss error."""
    try:
        return train_step(trainer.modules, trainer.settings, batch, trainer.values()).log
    except NonFiniteLossError as err:
        raise NonFiniteLossError(
            f"{err} at epoch {trainer.epoch} step {trainer.step}; stopping. The last checkpoint on disk is intact; "
            "try a lower --lr, --clip_grad 3.0 or --precision fp32"
        ) from None


def run_epoch(trainer: Trainer, output_dir: Path, progress: tqdm | None, stop_at: int) -> None:
    """Train from the current position to the end of the epoch, or to global step ``stop_at``.

    A log line is written every ``log_every`` steps and for the epoch's last, partial window; a window cut by
    ``stop_at`` (or by a kill) continues from the checkpoint, so a resumed run writes the same lines.

    Raises:
        ValueError: a whole epoch's worth of batches in a row held no readable image.
    """
    cfg = trainer.config.run
    trainer.data.sampler.set_position(trainer.epoch, trainer.step - trainer.epoch * trainer.iters_per_epoch)
    means, unreadable_batches = trainer.log_window, 0
    for batch in trainer.data.loader:
        trainer.skipped_images += batch.num_skipped
        if batch.images.numel() == 0 or batch.images.shape[0] < 1:
            logger.warning("step %d: every image of the batch was unreadable; skipped", trainer.step)
            trainer.step += 1
            unreadable_batches += 1
            if unreadable_batches >= trainer.iters_per_epoch:
                raise unreadable_data_error(trainer)
            continue
        unreadable_batches = 0
        numbers = one_step(trainer, batch)
        trainer.step += 1
        means.add(numbers, batch.images.shape[0])
        if progress is not None:
            progress.update(1)
            progress.set_postfix(
                loss=f"{numbers['loss']:.3f}",
                d=f"{numbers['d_loss']:.3f}",
                s=f"{numbers['s_loss']:.3f}",
                nn=f"{numbers['nn_loss']:.3f}",
                cyc=f"{numbers['bootstrap_centroid_ratio']:.2f}",
            )
        if trainer.step % cfg.log_every == 0:
            write_log_line(trainer, means.flush(), output_dir)
        if trainer.step >= stop_at:
            break
        if cfg.checkpoint_every and trainer.step % cfg.checkpoint_every == 0:
            checkpoint.save_trainer(trainer, output_dir)
    if means.count and trainer.step % trainer.iters_per_epoch == 0:
        write_log_line(trainer, means.flush(), output_dir)


def unreadable_data_error(trainer: Trainer) -> ValueError:
    """The error for training data of which a whole epoch's worth of images in a row could not be read."""
    images = trainer.iters_per_epoch * trainer.config.optim.batch_size_per_gpu * distributed.world_size()
    return ValueError(
        f"--data_path {trainer.config.data.data_path}: none of {images} images in a row could be read (see the "
        "warnings above), so training stops without writing a checkpoint; check the files (format, permissions) "
        "or point --data_path at another folder"
    )


@dataclass(frozen=True)
class TrainResult:
    """Where the run left its files and how far it got."""

    output_dir: Path
    checkpoint: Path
    epoch: int
    step: int
    history: list[dict[str, float]]


def train(config: TrainConfig, progress_bar: bool = True) -> TrainResult:
    """Pretrain with CrIBo; resumes automatically from ``output_dir/checkpoint.pth`` when present.

    The output folder and the checkpoint (readable, written with the same tensor shapes) are checked before
    anything is built.
    """
    if config.run.threads:
        torch.set_num_threads(config.run.threads)
    output_dir = Path(config.run.output_dir)
    if distributed.is_main_process():
        checkpoint.check_output_dir(output_dir)
    checkpoint.read_resume_state(output_dir, config, mmap=True)  # a quick check: fit reads it in full
    trainer = build_trainer(config)
    return fit(trainer, progress_bar=progress_bar)


def fit(trainer: Trainer, progress_bar: bool = True) -> TrainResult:
    """Run (or resume) the loop of a built trainer until ``epochs`` (or ``max_steps``) is reached."""
    config = trainer.config
    output_dir = Path(config.run.output_dir)
    ckpt_path = output_dir / checkpoint.CHECKPOINT_NAME
    state = checkpoint.read_resume_state(output_dir, config)
    if state is not None:
        checkpoint.load_trainer(trainer, state)
        logger.info("resumed from %s at epoch %d, step %d", ckpt_path, trainer.epoch, trainer.step)
    elif config.model.init:
        apply_init(trainer)
    del state  # the trainer holds its own copies of the tensors
    total = config.optim.epochs * trainer.iters_per_epoch
    stop_at = min(total, config.run.max_steps) if config.run.max_steps else total
    progress = make_progress(trainer.step, stop_at) if progress_bar and distributed.is_main_process() else None
    try:
        start_run_files(trainer, output_dir)
        while trainer.step < stop_at:
            trainer.epoch = trainer.step // trainer.iters_per_epoch
            run_epoch(trainer, output_dir, progress, stop_at)
            epoch_done = trainer.step % trainer.iters_per_epoch == 0
            trainer.epoch = trainer.step // trainer.iters_per_epoch
            freq = config.run.saveckp_freq
            checkpoint.save_trainer(
                trainer, output_dir, snapshot=epoch_done and bool(freq) and trainer.epoch % freq == 0
            )
    except (OSError, RuntimeError) as err:
        full = files.disk_full_cause(err)
        if full is None or isinstance(err, files.DiskFullError):
            raise
        raise checkpoint.disk_full_error(Path(full.filename or output_dir), output_dir) from err
    finally:
        if progress is not None:
            progress.close()
    distributed.barrier()
    return TrainResult(output_dir, ckpt_path, trainer.epoch, trainer.step, trainer.history)


def start_run_files(trainer: Trainer, output_dir: Path) -> None:
    """Rank 0 readies the run folder: created and writable, temp files of a killed writer removed, log.txt cut
    back to the checkpoint's step (a resumed run writes the later lines again), config.yaml and init.json."""
    if distributed.is_main_process():
        checkpoint.prepare_output_dir(output_dir)
        checkpoint.remove_stale_temp_files(output_dir)
        logs.trim_log(output_dir, trainer.step)
        config_lib.save(trainer.config, output_dir / "config.yaml")
        if trainer.init:
            files.atomic_write_text(output_dir / INIT_REPORT_NAME, json.dumps(trainer.init, indent=2) + "\n")
    distributed.barrier()


def make_progress(start: int, total: int) -> tqdm:
    """A tqdm bar over global steps with ETA."""
    from tqdm.auto import tqdm as progress_bar

    return progress_bar(total=total, initial=start, unit="step", dynamic_ncols=True, desc="cribo train")
