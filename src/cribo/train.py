"""CrIBo pretraining: ``build_*`` helpers around one ``train()`` loop (DESIGN.md §2, §3).

Axis letters: B images per process, V = 2 views, N patches per view, T = 2N, K clusters, D backbone dim,
n valid objects in the batch, C / Cc global / object head dims.

One step reads top to bottom: schedules -> teacher -> cluster -> match -> student -> losses -> step -> EMA ->
bank push -> log -> checkpoint. Everything random is seeded and saved, so stopping and resuming gives the same
weights bit for bit on CPU.
"""

from __future__ import annotations

import contextlib
import json
import logging
import resource
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Sampler

from cribo import checkpoint, distributed
from cribo import config as config_lib
from cribo.augment import TwoViewAugmentation
from cribo.clustering import joint_space_clustering, pool_objects, select_valid, valid_objects
from cribo.config import TrainConfig
from cribo.losses import CrIBoLoss, StepTargets, cross_image_entries, student_terms
from cribo.matching import CrossImageMatches, match_objects
from cribo.memory import ObjectMemoryBank
from cribo.models import CrIBoNetwork, ProjectionHead, create_backbone
from cribo.runtime import autocast_dtype, resolve_device
from cribo.schedules import (
    last_layer_frozen,
    lr_schedule,
    pos_alpha_at,
    teacher_momentum_schedule,
    teacher_temperature,
    weight_decay_schedule,
)
from cribo.teacher import ema_update, freeze

logger = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """Raised when a loss term is NaN or infinite; the last checkpoint on disk is left as it was."""


# --------------------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------------------


def build_image_source(config: TrainConfig) -> Any:
    """The pretraining images: a folder (recursive) or the built-in synthetic scenes' training split."""
    if config.data.data_path:
        from cribo.data.folder import ImageFolder

        return ImageFolder(config.data.data_path)
    from cribo.data.scenes import SyntheticScenes

    return SyntheticScenes(
        "train", config.data.scenes_num_images, image_size=config.data.scenes_image_size, seed=config.run.seed
    )


class TwoViewDataset(Dataset):
    """Items are keyed by ``(epoch, index)`` so every augmentation is a pure function of the seed and the key."""

    def __init__(self, source: Any, augmentation: TwoViewAugmentation, seed: int) -> None:
        self.source = source
        self.augmentation = augmentation
        self.seed = seed

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key: tuple[int, int]) -> tuple[Tensor, Tensor] | None:
        epoch, index = key
        item = self.source[index]
        image = item[0] if isinstance(item, tuple) else item
        if image is None:  # unreadable file: the folder dataset already warned
            return None
        # A fixed bijection of (seed, epoch, index) to a 63-bit seed; independent of workers and resumes.
        sample_seed = (self.seed * 1_000_003 + epoch * 2_147_483_647 + index * 97_531) % (2**63 - 1)
        views = self.augmentation(image, seed=sample_seed)
        return views.images, views.positions


@dataclass
class Batch:
    """A collated batch: images (B,V,3,S,S), positions (B,V,N,2), and how many items were unreadable."""

    images: Tensor
    positions: Tensor
    num_skipped: int


def collate(items: list[tuple[Tensor, Tensor] | None]) -> Batch:
    """Stack the readable items and count the skipped ones."""
    kept = [item for item in items if item is not None]
    if not kept:
        return Batch(torch.empty(0), torch.empty(0), len(items))
    return Batch(torch.stack([k[0] for k in kept]), torch.stack([k[1] for k in kept]), len(items) - len(kept))


class EpochBatchSampler(Sampler[list[tuple[int, int]]]):
    """Seeded per-epoch permutation, sharded over processes, whole batches only; can start mid-epoch."""

    def __init__(self, num_items: int, batch_size: int, seed: int, rank: int, world_size: int) -> None:
        self.num_items = num_items
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.start_batch = 0

    def __len__(self) -> int:
        return self.num_items // (self.batch_size * self.world_size) - self.start_batch

    def set_position(self, epoch: int, start_batch: int) -> None:
        """Iterate epoch ``epoch`` from its batch ``start_batch`` on (resume mid-epoch)."""
        self.epoch = epoch
        self.start_batch = start_batch

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        generator = torch.Generator().manual_seed(self.seed * 7919 + self.epoch)
        order = torch.randperm(self.num_items, generator=generator).tolist()
        per_step = self.batch_size * self.world_size
        for step in range(self.start_batch, self.num_items // per_step):
            chunk = order[step * per_step : (step + 1) * per_step]
            mine = chunk[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
            yield [(self.epoch, index) for index in mine]


def iterations_per_epoch(num_items: int, batch_size: int, world_size: int) -> int:
    """Full steps per epoch (drop-last), with an error naming the flags when the data is too small."""
    steps = num_items // (batch_size * world_size)
    if steps == 0:
        raise ValueError(
            f"{num_items} training images cannot fill one step of --batch_size_per_gpu {batch_size} x "
            f"{world_size} processes; lower the batch size or add images"
        )
    return steps


# --------------------------------------------------------------------------------------------------------------
# Model, optimiser, schedules
# --------------------------------------------------------------------------------------------------------------


def build_network(config: TrainConfig, drop_path_rate: float, norm_last_layer: bool) -> CrIBoNetwork:
    """Backbone + projection head of the configured size."""
    backbone = create_backbone(
        config.model.arch,
        patch_size=config.model.patch_size,
        drop_path_rate=drop_path_rate,
        depth=config.model.depth or None,
    )
    head = ProjectionHead(
        backbone.embed_dim,
        config.model.out_dim,
        config.model.out_dim_c,
        hidden_dim=config.model.head_hidden_dim,
        bottleneck_dim=config.model.head_bottleneck_dim,
        use_bn=config.model.use_bn_in_head,
        norm_last_layer=norm_last_layer,
    )
    return CrIBoNetwork(backbone, head)


class StudentStep(nn.Module):
    """The student's whole differentiable work in one ``forward`` (so that DDP sees every parameter): backbone,
    object pooling with the teacher's assignment, head MLP and the three loss terms through the fused last layers.

    Returns the ``global``, ``object`` and ``cross_image`` terms (:func:`cribo.losses.student_terms`).
    """

    def __init__(self, network: CrIBoNetwork) -> None:
        super().__init__()
        self.network = network

    def forward(
        self,
        images: Tensor,
        assignment: Tensor,
        valid: Tensor,
        targets: StepTargets,
        temperatures: tuple[float, float],
        compute_dtype: torch.dtype,
    ) -> dict[str, Tensor]:
        features = student_features(self.network, self.network(images), assignment, valid)
        return student_terms(
            *features, *self.network.head.last_layer_parameters(), targets, *temperatures, compute_dtype=compute_dtype
        )


def student_features(network: CrIBoNetwork, tokens: Tensor, assignment: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
    """Student tokens (2B,1+N,D) -> head bottleneck features of [CLS] (2B,d) and of the objects pooled with the
    teacher's assignment (2n,d), view-major."""
    cls, patches = split_tokens(tokens, assignment.shape[0])
    objects, _ = select_valid(pool_objects(patches, assignment.to(patches.dtype)), valid)
    global_features, object_features = network.head.bottlenecks(cls, objects.transpose(0, 1).flatten(0, 1))
    return global_features, object_features


def split_tokens(tokens: Tensor, num_images: int) -> tuple[Tensor, Tensor]:
    """(2B,1+N,D) view-major backbone tokens -> [CLS] (2B,D) and joint patch tokens (B,T=2N,D)."""
    cls = tokens[:, 0]
    patches = tokens[:, 1:].unflatten(0, (2, num_images)).transpose(0, 1).flatten(1, 2)
    return cls, patches


def parameter_groups(model: nn.Module) -> list[dict[str, Any]]:
    """The authors' two groups: no weight decay on biases and 1-d parameters (norms), decay on the rest."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if name.endswith(".bias") or param.ndim == 1 else decay).append(param)
    return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]


@dataclass(frozen=True)
class Schedules:
    """Per-step values, evaluated from the global step (DINO-style arrays)."""

    lr: np.ndarray
    weight_decay: np.ndarray
    momentum: np.ndarray

    @classmethod
    def build(cls, config: TrainConfig, iters: int, world_size: int) -> Schedules:
        opt = config.optim
        total_batch = opt.batch_size_per_gpu * world_size
        return cls(
            lr=lr_schedule(opt.lr, opt.min_lr, total_batch, opt.epochs, iters, opt.warmup_epochs),
            weight_decay=weight_decay_schedule(opt.weight_decay, opt.weight_decay_end, opt.epochs, iters),
            momentum=teacher_momentum_schedule(opt.momentum_teacher, opt.epochs, iters),
        )


# --------------------------------------------------------------------------------------------------------------
# The run's state
# --------------------------------------------------------------------------------------------------------------


@dataclass
class Trainer:
    """Everything a step touches; built once by :func:`build_trainer`."""

    config: TrainConfig
    device: torch.device
    student: CrIBoNetwork
    student_step: nn.Module  # StudentStep, DDP-wrapped with several processes
    teacher: CrIBoNetwork
    criterion: CrIBoLoss
    bank: ObjectMemoryBank
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    schedules: Schedules
    loader: DataLoader
    sampler: EpochBatchSampler
    iters_per_epoch: int
    cluster_generator: torch.Generator
    loader_generator: torch.Generator
    amp_dtype: torch.dtype | None
    epoch: int = 0
    step: int = 0  # global step: epochs * iters_per_epoch + step in epoch
    skipped_images: int = 0
    history: list[dict[str, float]] = field(default_factory=list)


def build_criterion(config: TrainConfig) -> CrIBoLoss:
    """The loss with its centres; ``semantics: authors`` fixes the [CLS] student temperature at 0.1 (quirk 4)
    and normalises the cross-image term by view 1's count (quirk 1)."""
    authors = config.method.semantics == "authors"
    return CrIBoLoss(
        config.model.out_dim,
        config.model.out_dim_c,
        student_temp=0.1 if authors else config.loss.student_temp,
        student_temp_c=config.loss.student_temp_c,
        center_momentum=config.loss.center_momentum,
        center_momentum_c=config.loss.center_momentum,
        cross_image_normalization="view1" if authors else "per_view",
    )


def build_trainer(config: TrainConfig) -> Trainer:
    """Construct networks, loss, bank, optimiser, data and schedules from the configuration."""
    device = resolve_device(config.run.device)
    world, rank = distributed.world_size(), distributed.rank()
    torch.manual_seed(config.run.seed)  # identical initial weights on every process
    student = build_network(config, config.model.drop_path_rate, config.model.norm_last_layer).to(device)
    teacher = build_network(config, 0.0, True).to(device)
    teacher.load_state_dict(student.state_dict())
    freeze(teacher)
    student_step: nn.Module = StudentStep(student)
    if distributed.is_enabled():
        device_ids = [device.index] if device.type == "cuda" else None
        student_step = nn.parallel.DistributedDataParallel(student_step, device_ids=device_ids)
    torch.manual_seed(config.run.seed + rank)  # from here on (drop-path), each process draws its own stream
    np.random.seed(config.run.seed + rank)
    criterion = build_criterion(config).to(device)
    bank_generator = torch.Generator().manual_seed(config.run.seed)
    bank = ObjectMemoryBank(
        config.method.queue_size, config.method.n_tokens, student.backbone.embed_dim, generator=bank_generator
    ).to(device)
    # The fused AdamW kernel (CPU and CUDA) makes no parameter-sized temporaries; ~4x faster than foreach on CPU.
    fused = device.type in ("cpu", "cuda")
    optimizer = torch.optim.AdamW(parameter_groups(student), fused=fused, foreach=None if fused else True)
    amp_dtype = autocast_dtype(config.run.precision, device)
    loader, sampler, loader_generator = build_loader(config, device, rank, world)
    iters = iterations_per_epoch(sampler.num_items, config.optim.batch_size_per_gpu, world)
    return Trainer(
        config=config,
        device=device,
        student=student,
        student_step=student_step,
        teacher=teacher,
        criterion=criterion,
        bank=bank,
        optimizer=optimizer,
        scaler=torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16),
        schedules=Schedules.build(config, iters, world),
        loader=loader,
        sampler=sampler,
        iters_per_epoch=iters,
        cluster_generator=torch.Generator(device=device).manual_seed(config.run.seed + 1 + rank),
        loader_generator=loader_generator,
        amp_dtype=amp_dtype,
    )


def build_loader(
    config: TrainConfig, device: torch.device, rank: int, world: int
) -> tuple[DataLoader, EpochBatchSampler, torch.Generator]:
    """The two-view data pipeline of one process: its loader, batch sampler (this rank's share of each epoch) and
    the loader's generator (saved in checkpoints)."""
    augmentation = TwoViewAugmentation(
        output_size=config.data.image_size, scale=config.data.global_crops_scale, patch_size=config.model.patch_size
    )
    dataset = TwoViewDataset(build_image_source(config), augmentation, config.run.seed)
    sampler = EpochBatchSampler(len(dataset), config.optim.batch_size_per_gpu, config.run.seed, rank, world)
    loader_generator = torch.Generator().manual_seed(config.run.seed)
    loader = DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=config.data.num_workers,
        collate_fn=collate,
        pin_memory=device.type == "cuda",
        generator=loader_generator,
        persistent_workers=False,
    )
    return loader, sampler, loader_generator


def state_dict(trainer: Trainer) -> dict[str, Any]:
    """Everything needed for an exact resume (see checkpoint.py)."""
    return {
        "student": trainer.student.state_dict(),
        "teacher": trainer.teacher.state_dict(),
        "optimizer": trainer.optimizer.state_dict(),
        "scaler": trainer.scaler.state_dict(),
        "criterion": trainer.criterion.state_dict(),
        "bank": trainer.bank.state_dict(),
        "epoch": trainer.epoch,
        "step": trainer.step,
        "iters_per_epoch": trainer.iters_per_epoch,
        "world_size": distributed.world_size(),
        "skipped_images": trainer.skipped_images,
        "rng": checkpoint.rng_state(),
        "cluster_rng": trainer.cluster_generator.get_state(),
        "config": config_lib.to_dict(trainer.config),
        "history": trainer.history,
    }


def load_state(trainer: Trainer, state: dict[str, Any]) -> None:
    """Restore a :func:`state_dict` into a freshly built trainer.

    If the number of steps per epoch changed (other data size, batch size or number of processes), the position
    is carried over by images seen in the current epoch and a warning says the resume is no longer exact.
    """
    trainer.student.load_state_dict(state["student"])
    trainer.teacher.load_state_dict(state["teacher"])
    trainer.optimizer.load_state_dict(state["optimizer"])
    trainer.scaler.load_state_dict(state["scaler"])
    trainer.criterion.load_state_dict(state["criterion"])
    trainer.bank.load_state_dict(state["bank"])
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
    trainer.cluster_generator.set_state(state["cluster_rng"])
    if distributed.rank() == 0:
        checkpoint.set_rng_state(state["rng"])
    else:  # other ranks continue from a distinct, reproducible stream
        torch.manual_seed(trainer.config.run.seed + distributed.rank() + trainer.step)


# --------------------------------------------------------------------------------------------------------------
# One step
# --------------------------------------------------------------------------------------------------------------


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


def step_values(trainer: Trainer) -> StepValues:
    """Evaluate every schedule at the trainer's current step and epoch."""
    cfg, epoch, it = trainer.config, trainer.epoch, min(trainer.step, len(trainer.schedules.lr) - 1)
    return StepValues(
        lr=float(trainer.schedules.lr[it]),
        weight_decay=float(trainer.schedules.weight_decay[it]),
        momentum=float(trainer.schedules.momentum[it]),
        teacher_temp=teacher_temperature(
            epoch, cfg.loss.warmup_teacher_temp, cfg.loss.teacher_temp, cfg.loss.warmup_teacher_temp_epochs
        ),
        teacher_temp_c=teacher_temperature(
            epoch, cfg.loss.warmup_teacher_temp_c, cfg.loss.teacher_temp_c, cfg.loss.warmup_teacher_temp_epochs
        ),
        pos_alpha=pos_alpha_at(epoch, cfg.optim.epochs, cfg.method.pos_alpha, order=cfg.method.semantics),
        cross_image=epoch >= 1,  # the cross-image term starts with the second epoch (paper §3.3)
        freeze_last_layer=last_layer_frozen(epoch, cfg.optim.freeze_last_layer),
    )


@dataclass
class TeacherOutput:
    """What the teacher side of a step produces (no gradient)."""

    targets: StepTargets  # the three terms' targets
    assignment: Tensor  # (B,T,K)
    valid: Tensor  # (B,K)
    objects: Tensor  # (n,V,D) raw teacher objects, pushed to the bank
    objects_per_image: Tensor  # (B,)
    cycle_mask: Tensor  # (V,n)


def compute_dtype(trainer: Trainer) -> torch.dtype:
    """dtype of the fused last layers' matrix products: the autocast dtype, float32 without mixed precision."""
    return trainer.amp_dtype or torch.float32


@torch.no_grad()
def teacher_objects(
    trainer: Trainer, patches: Tensor, positions: Tensor, values: StepValues
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Joint-space clustering of the teacher's patch tokens (B,T,D) and object pooling.

    Returns the assignment (B,T,K), the valid clusters (B,K), the objects (n,V,D) and objects per image (B,).
    """
    cfg = trainer.config.method
    clusters = joint_space_clustering(
        patches,
        positions.flatten(1, 2),
        cfg.n_tokens,
        values.pos_alpha,
        sinkhorn_lambda=cfg.sinkhorn_lambda,
        sinkhorn_iterations=cfg.sinkhorn_iterations,
        num_rounds=cfg.n_iter,
        update_marginals=cfg.update_c,
        cost_normalization="batch" if cfg.semantics == "authors" else "image",
        generator=trainer.cluster_generator,
    )
    valid = valid_objects(clusters.assignment)
    objects, per_image = select_valid(pool_objects(patches, clusters.assignment), valid)
    return clusters.assignment, valid, objects, per_image


def used_neighbours(trainer: Trainer, matches: CrossImageMatches, values: StepValues) -> Tensor:
    """The retrieved neighbours the cross-image term uses (J,D), in :func:`cross_image_entries` order; none when
    the term is off. The teacher head runs on these only."""
    if not values.cross_image:
        return matches.neighbours.new_zeros(0, matches.neighbours.shape[-1])
    order, _, _ = cross_image_entries(matches.cycle_mask, trainer.criterion.cross_image_normalization)
    return matches.neighbours.flatten(0, 1)[order]


@torch.no_grad()
def teacher_targets(
    trainer: Trainer, features: tuple[Tensor, Tensor, Tensor], cycle_mask: Tensor, values: StepValues
) -> StepTargets:
    """The three targets from the teacher's bottleneck features of [CLS], objects and used neighbours."""
    return trainer.criterion.targets(
        *features,
        cycle_mask,
        *trainer.teacher.head.last_layer_parameters(),
        values.teacher_temp,
        values.teacher_temp_c,
        compute_dtype=compute_dtype(trainer),
    )


@torch.no_grad()
def teacher_side(trainer: Trainer, images: Tensor, positions: Tensor, values: StepValues) -> TeacherOutput:
    """Teacher forward, joint-space clustering, object pooling, cross-image matching and the teacher's targets."""
    with autocast(trainer):
        tokens = trainer.teacher(images)
    cls, patches = split_tokens(tokens.float(), positions.shape[0])
    assignment, valid, objects, per_image = teacher_objects(trainer, patches, positions, values)
    matches = match_objects(objects, trainer.bank, chunk_size=trainer.config.method.bank_chunk_size)
    head = trainer.teacher.head
    neighbours = used_neighbours(trainer, matches, values)
    with autocast(trainer):
        global_features, object_features, neighbour_features = head.bottlenecks(
            cls, objects.transpose(0, 1).flatten(0, 1), neighbours
        )
    features = (global_features, object_features, neighbour_features)
    return TeacherOutput(
        targets=teacher_targets(trainer, features, matches.cycle_mask, values),
        assignment=assignment,
        valid=valid,
        objects=objects,
        objects_per_image=per_image,
        cycle_mask=matches.cycle_mask,
    )


def autocast(trainer: Trainer) -> contextlib.AbstractContextManager:
    """Mixed precision context for the configured precision (a no-op in fp32)."""
    if trainer.amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(trainer.device.type, dtype=trainer.amp_dtype)


def set_optimizer_values(optimizer: torch.optim.Optimizer, values: StepValues) -> None:
    """Write this step's learning rate and weight decay (group 0 only is regularised)."""
    for index, group in enumerate(optimizer.param_groups):
        group["lr"] = values.lr
        if index == 0:
            group["weight_decay"] = values.weight_decay


def optimiser_step(trainer: Trainer, loss: Tensor, values: StepValues) -> None:
    """Backward, optional clipping, last-layer freezing, optimiser step (through the scaler)."""
    trainer.optimizer.zero_grad(set_to_none=True)
    trainer.scaler.scale(loss).backward()
    apply_gradients(trainer, values)


def apply_gradients(trainer: Trainer, values: StepValues) -> None:
    """After the backward: optional clipping, last-layer freezing, optimiser step (through the scaler)."""
    if trainer.config.optim.clip_grad > 0:
        trainer.scaler.unscale_(trainer.optimizer)
        nn.utils.clip_grad_norm_(trainer.student.parameters(), trainer.config.optim.clip_grad)
    if values.freeze_last_layer:
        for name, param in trainer.student.head.named_parameters():
            if name.startswith("last_layer"):
                param.grad = None
    trainer.scaler.step(trainer.optimizer)
    trainer.scaler.update()


def train_step(trainer: Trainer, batch: Batch) -> dict[str, float]:
    """One optimisation step on one batch; returns the logged numbers."""
    values = step_values(trainer)
    set_optimizer_values(trainer.optimizer, values)
    images = batch.images.to(trainer.device, non_blocking=True).transpose(0, 1).flatten(0, 1)  # (2B,3,S,S)
    positions = batch.positions.to(trainer.device, non_blocking=True)  # (B,V,N,2)
    teacher = teacher_side(trainer, images, positions, values)
    criterion = trainer.criterion
    with autocast(trainer):
        terms = trainer.student_step(
            images,
            teacher.assignment,
            teacher.valid,
            teacher.targets,
            (criterion.student_temp, criterion.student_temp_c),
            compute_dtype(trainer),
        )
    loss = weighted_loss(terms, trainer.config)
    terms["loss"] = loss
    if not torch.isfinite(loss):
        details = ", ".join(f"{k}={float(v.detach()):.4g}" for k, v in terms.items() if v.numel() == 1)
        raise NonFiniteLossError(
            f"non-finite loss at epoch {trainer.epoch} step {trainer.step} ({details}); stopping. The last "
            "checkpoint on disk is intact; try a lower --lr, --clip_grad 3.0 or --precision fp32"
        )
    optimiser_step(trainer, loss, values)
    ema_update(trainer.teacher, trainer.student, values.momentum)
    trainer.bank.push(
        distributed.all_gather_ragged(teacher.objects), distributed.all_gather_ragged(teacher.objects_per_image)
    )
    return step_log(terms, teacher, values)


def weighted_loss(terms: dict[str, Tensor], config: TrainConfig) -> Tensor:
    """The optimised loss: the three terms with the configured weights (``loss.weight_*``)."""
    weights = config.loss
    return (
        weights.weight_global * terms["global"]
        + weights.weight_object * terms["object"]
        + weights.weight_cross_image * terms["cross_image"]
    )


def step_log(terms: dict[str, Tensor], teacher: TeacherOutput, values: StepValues) -> dict[str, float]:
    """The authors' log keys for one step: d_loss, s_loss, nn_loss, r_cnt, bootstrap_centroid_ratio, lr, wd."""
    n = max(teacher.objects.shape[0], 1)
    return {
        "loss": float(terms["loss"].detach()),
        "d_loss": float(terms["global"].detach()),
        "s_loss": float(terms["object"].detach()),
        "nn_loss": float(terms["cross_image"].detach()),
        "r_cnt": float(teacher.objects_per_image.float().mean()),
        "bootstrap_centroid_ratio": float(teacher.cycle_mask.float().sum()) / (2 * n),
        "lr": values.lr,
        "wd": values.weight_decay,
    }


# --------------------------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------------------------


@dataclass
class RunningMeans:
    """Averages of the logged numbers since the last log line."""

    sums: dict[str, float] = field(default_factory=dict)
    count: int = 0
    images: int = 0
    started: float = field(default_factory=time.perf_counter)

    def add(self, numbers: dict[str, float], images: int) -> None:
        for key, value in numbers.items():
            self.sums[key] = self.sums.get(key, 0.0) + value
        self.count += 1
        self.images += images

    def flush(self) -> dict[str, float]:
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        means = {key: value / max(self.count, 1) for key, value in self.sums.items()}
        means["images_per_s"] = self.images * distributed.world_size() / elapsed
        self.sums, self.count, self.images, self.started = {}, 0, 0, time.perf_counter()
        return means


def peak_memory_mb(device: torch.device) -> float:
    """Peak accelerator memory (CUDA) or peak resident set size (CPU) in MiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def write_log_line(trainer: Trainer, numbers: dict[str, float], output_dir: Path) -> None:
    """Append one JSON line to log.txt (rank 0 only)."""
    record = {"epoch": trainer.epoch, "step": trainer.step, **numbers}
    record["peak_mem_mb"] = peak_memory_mb(trainer.device)
    record["skipped_images"] = trainer.skipped_images
    trainer.history.append({k: float(v) for k, v in record.items()})
    if distributed.is_main_process():
        with open(output_dir / "log.txt", "a") as handle:
            handle.write(json.dumps(record) + "\n")


def save_checkpoint(trainer: Trainer, output_dir: Path, snapshot: bool = False) -> None:
    """Write checkpoint.pth atomically (rank 0), and a numbered snapshot when asked."""
    if not distributed.is_main_process():
        return
    state = state_dict(trainer)
    checkpoint.atomic_save(state, output_dir / checkpoint.CHECKPOINT_NAME)
    if snapshot:
        checkpoint.atomic_save(state, output_dir / f"checkpoint{trainer.epoch:04d}.pth")


def run_epoch(trainer: Trainer, output_dir: Path, progress: Any, stop_at: int) -> None:
    """Train from the current position to the end of the epoch, or to global step ``stop_at``."""
    cfg = trainer.config.run
    trainer.sampler.set_position(trainer.epoch, trainer.step - trainer.epoch * trainer.iters_per_epoch)
    means = RunningMeans()
    for batch in trainer.loader:
        trainer.skipped_images += batch.num_skipped
        if batch.images.numel() == 0 or batch.images.shape[0] < 1:
            logger.warning("step %d: every image of the batch was unreadable; skipped", trainer.step)
            trainer.step += 1
            continue
        numbers = train_step(trainer, batch)
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
            save_checkpoint(trainer, output_dir)
    if means.count:
        write_log_line(trainer, means.flush(), output_dir)


@dataclass(frozen=True)
class TrainResult:
    """Where the run left its files and how far it got."""

    output_dir: Path
    checkpoint: Path
    epoch: int
    step: int
    history: list[dict[str, float]]


def train(config: TrainConfig, progress_bar: bool = True) -> TrainResult:
    """Pretrain with CrIBo; resumes automatically from ``output_dir/checkpoint.pth`` when present."""
    if config.run.threads:
        torch.set_num_threads(config.run.threads)
    trainer = build_trainer(config)
    return fit(trainer, progress_bar=progress_bar)


def fit(trainer: Trainer, progress_bar: bool = True) -> TrainResult:
    """Run (or resume) the loop of a built trainer until ``epochs`` (or ``max_steps``) is reached."""
    config = trainer.config
    output_dir = Path(config.run.output_dir)
    ckpt_path = output_dir / checkpoint.CHECKPOINT_NAME
    if ckpt_path.is_file():
        load_state(trainer, checkpoint.load(ckpt_path))
        logger.info("resumed from %s at epoch %d, step %d", ckpt_path, trainer.epoch, trainer.step)
    if distributed.is_main_process():
        output_dir.mkdir(parents=True, exist_ok=True)
        config_lib.save(config, output_dir / "config.yaml")
    distributed.barrier()
    total = config.optim.epochs * trainer.iters_per_epoch
    stop_at = min(total, config.run.max_steps) if config.run.max_steps else total
    progress = make_progress(trainer.step, stop_at) if progress_bar and distributed.is_main_process() else None
    try:
        while trainer.step < stop_at:
            trainer.epoch = trainer.step // trainer.iters_per_epoch
            run_epoch(trainer, output_dir, progress, stop_at)
            epoch_done = trainer.step % trainer.iters_per_epoch == 0
            trainer.epoch = trainer.step // trainer.iters_per_epoch
            freq = config.run.saveckp_freq
            save_checkpoint(trainer, output_dir, snapshot=epoch_done and bool(freq) and trainer.epoch % freq == 0)
    finally:
        if progress is not None:
            progress.close()
    distributed.barrier()
    return TrainResult(output_dir, ckpt_path, trainer.epoch, trainer.step, trainer.history)


def make_progress(start: int, total: int) -> Any:
    """A tqdm bar over global steps with ETA."""
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, unit="step", dynamic_ncols=True, desc="cribo train")
