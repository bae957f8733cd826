"""One CrIBo training step: teacher side, student side, optimiser step, EMA and bank push (DESIGN.md §2).

:func:`train_step` reads top to bottom: schedules' values into the optimiser -> teacher backbone -> joint-space
clustering -> cross-image matching -> teacher head and targets -> student backbone, object pooling, head and
losses -> backward, optimiser -> EMA -> bank push. It takes the step's state (:class:`StepModules`) and settings
(:class:`StepSettings`), never the whole trainer.

Two hooks make the step inspectable without a copy of it: ``lap(name)`` is called after each phase (the
instrumented benchmark passes a clock; the names are :data:`PHASES`), and ``inspect=True`` returns the step's
intermediates (objects, assignment, matches, targets). With both object-level loss weights at 0 the step is
DINO's: no clustering, matching, object heads or bank push.

Axis letters: B images per process, V = 2 views, N patches per view, T = 2N, K clusters, D backbone dim,
n valid objects in the batch, J cross-image entries, d head bottleneck dim.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from cribo import distributed, runtime
from cribo.clustering import ClusteringSettings, joint_space_clustering, pool_objects, select_valid, valid_objects
from cribo.data.pretrain import Batch
from cribo.fused import StepTargets, TargetBuilder, TeacherFeatures, student_terms
from cribo.losses import CrIBoLoss
from cribo.matching import CrossImageMatches, cross_image_entries, match_objects
from cribo.memory import ObjectMemoryBank
from cribo.models import CrIBoNetwork
from cribo.schedules import StepValues
from cribo.search import BankKeys
from cribo.teacher import ema_update

__all__ = [
    "PHASES",
    "LossWeights",
    "NonFiniteLossError",
    "StepModules",
    "StepOutput",
    "StepSettings",
    "StudentStep",
    "TeacherOutput",
    "split_tokens",
    "train_step",
]

Lap = Callable[[str], None]

# The names ``lap`` is called with, in order (a DINO-only step skips the object phases).
PHASES: tuple[str, ...] = (
    "teacher_backbone",
    "clustering",
    "bank_search",
    "teacher_head_mlp",
    "teacher_targets",
    "student_backbone_forward",
    "student_head_mlp",
    "loss",
    "heads_loss_backward",
    "student_backbone_backward",
    "optimiser",
    "ema",
    "bank_push",
)


def _no_lap(name: str) -> None:
    """The default ``lap``: nothing."""


class NonFiniteLossError(RuntimeError):
    """Raised when a loss term is NaN or infinite; the last checkpoint on disk is left as it was."""


@dataclass(frozen=True)
class LossWeights:
    """Weights of the three terms in the optimised loss (``loss.weight_*``; 1, 1, 1 in the paper)."""

    global_: float = 1.0
    object: float = 1.0
    cross_image: float = 1.0

    @property
    def objects_on(self) -> bool:
        """Whether any object-level term counts (else the step is DINO's)."""
        return self.object != 0.0 or self.cross_image != 0.0


@dataclass(frozen=True)
class StepSettings:
    """What a step needs from the configuration (built once by ``cribo.train.build_trainer``)."""

    num_clusters: int
    clustering: ClusteringSettings
    bank_chunk_size: int
    loss_weights: LossWeights
    clip_grad: float
    amp_dtype: torch.dtype | None
    device: torch.device

    @property
    def compute_dtype(self) -> torch.dtype:
        """dtype of the fused last layers' matrix products: the autocast dtype, float32 without it."""
        return self.amp_dtype or torch.float32

    def autocast(self) -> contextlib.AbstractContextManager:
        """Mixed precision context of the step (a no-op in fp32)."""
        return runtime.autocast(self.device, self.amp_dtype)


@dataclass
class StepModules:
    """Everything with state that a step reads or updates."""

    teacher: CrIBoNetwork
    student: CrIBoNetwork
    student_step: nn.Module  # StudentStep, DDP-wrapped with several processes
    criterion: CrIBoLoss  # temperatures, normalisation and the two centres
    targets: TargetBuilder  # owns the teacher targets' workspace
    bank: ObjectMemoryBank
    bank_keys: BankKeys  # the bank's bfloat16 screening keys, kept in step with it
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    cluster_generator: torch.Generator


@dataclass
class TeacherOutput:
    """What the teacher side of a step produces (no gradient).

    ``targets`` are views into :class:`cribo.fused.TargetBuilder`'s workspace, overwritten by the next step.
    """

    targets: StepTargets
    assignment: Tensor  # (B,T,K)
    valid: Tensor  # (B,K)
    objects: Tensor  # (n,V,D) raw teacher objects, pushed to the bank
    objects_per_image: Tensor  # (B,)
    matches: CrossImageMatches


@dataclass
class StepOutput:
    """A step's logged numbers, and with ``inspect=True`` its loss terms and the teacher side."""

    log: dict[str, float]
    terms: dict[str, Tensor] | None = None
    teacher: TeacherOutput | None = None


def split_tokens(tokens: Tensor, num_images: int) -> tuple[Tensor, Tensor]:
    """(2B,1+N,D) view-major backbone tokens -> [CLS] (2B,D) and joint patch tokens (B,T=2N,D)."""
    cls = tokens[:, 0]
    patches = tokens[:, 1:].unflatten(0, (2, num_images)).transpose(0, 1).flatten(1, 2)
    return cls, patches


# --------------------------------------------------------------------------------------------------------------
# Teacher side
# --------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def teacher_objects(
    patches: Tensor, positions: Tensor, pos_alpha: float, settings: StepSettings, generator: torch.Generator
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Joint-space clustering of the teacher's patch tokens (B,T,D) and object pooling.

    Returns the assignment (B,T,K), the valid clusters (B,K), the objects (n,V,D) and objects per image (B,).
    """
    clusters = joint_space_clustering(
        patches, positions.flatten(1, 2), settings.num_clusters, pos_alpha, settings.clustering, generator=generator
    )
    valid = valid_objects(clusters.assignment)
    objects, per_image = select_valid(pool_objects(patches, clusters.assignment), valid)
    return clusters.assignment, valid, objects, per_image


def _no_objects(patches: Tensor, cls: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, CrossImageMatches]:
    """The teacher side's object outputs of a DINO-only step: none."""
    batch, num_tokens, dim = patches.shape
    no_mask = torch.zeros(2, 0, dtype=torch.bool, device=cls.device)
    index = torch.zeros(2, 0, dtype=torch.int64, device=cls.device)
    matches = CrossImageMatches(cls.new_zeros(2, 0, dim), no_mask, index, cross_image_entries(no_mask, "per_view"))
    empty = torch.zeros(batch, 0, dtype=torch.int64, device=cls.device)
    return patches.new_zeros(batch, num_tokens, 0), empty.bool(), cls.new_zeros(0, 2, dim), empty.sum(1), matches


@torch.no_grad()
def teacher_side(
    modules: StepModules, settings: StepSettings, batch: tuple[Tensor, Tensor], values: StepValues, lap: Lap
) -> TeacherOutput:
    """Teacher forward, joint-space clustering, object pooling, cross-image matching and the teacher's targets.

    Args:
        batch: (2B,3,S,S) view-major images and (B,V,N,2) patch positions.
    """
    images, positions = batch
    with settings.autocast():
        tokens = modules.teacher(images)
    cls, patches = split_tokens(tokens.float(), positions.shape[0])
    lap("teacher_backbone")
    if settings.loss_weights.objects_on:
        generator = modules.cluster_generator
        assignment, valid, objects, per_image = teacher_objects(
            patches, positions, values.pos_alpha, settings, generator
        )
        lap("clustering")
        matches = match_objects(
            objects,
            modules.bank,
            settings.bank_chunk_size,
            keys=modules.bank_keys,
            normalization=modules.criterion.cross_image_normalization,
        )
        lap("bank_search")
    else:
        assignment, valid, objects, per_image, matches = _no_objects(patches, cls)
    neighbours = matches.used_neighbours() if values.cross_image else objects.new_zeros(0, objects.shape[-1])
    with settings.autocast():
        features = TeacherFeatures(
            *modules.teacher.head.bottlenecks(cls, objects.transpose(0, 1).flatten(0, 1), neighbours)
        )
    lap("teacher_head_mlp")
    criterion = modules.criterion
    targets, statistics = modules.targets(
        features,
        modules.teacher.head.last_layer_parameters(),
        (criterion.center.center, criterion.center_c.center),
        (values.teacher_temp, values.teacher_temp_c),
        matches.entries,
        settings.compute_dtype,
    )
    criterion.update_centers(statistics)  # after the targets used the old centres
    lap("teacher_targets")
    return TeacherOutput(targets, assignment, valid, objects, per_image, matches)


# --------------------------------------------------------------------------------------------------------------
# Student side
# --------------------------------------------------------------------------------------------------------------


def student_features(network: CrIBoNetwork, tokens: Tensor, assignment: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
    """Student tokens (2B,1+N,D) -> head bottleneck features of [CLS] (2B,d) and of the objects pooled with the
    teacher's assignment (2n,d), view-major."""
    cls, patches = split_tokens(tokens, assignment.shape[0])
    objects, _ = select_valid(pool_objects(patches, assignment.to(patches.dtype)), valid)
    global_features, object_features = network.head.bottlenecks(cls, objects.transpose(0, 1).flatten(0, 1))
    return global_features, object_features


class StudentStep(nn.Module):
    """The student's whole differentiable work in one ``forward`` (so that DDP sees every parameter): backbone,
    object pooling with the teacher's assignment, head MLP and the three loss terms through the fused last layers.

    Returns the ``global``, ``object`` and ``cross_image`` terms (:func:`cribo.fused.student_terms`).
    """

    def __init__(self, network: CrIBoNetwork, temperatures: tuple[float, float]) -> None:
        super().__init__()
        self.network = network
        self.temperatures = temperatures

    def forward(
        self, images: Tensor, pooling: tuple[Tensor, Tensor], targets: StepTargets, compute_dtype: torch.dtype, lap: Lap
    ) -> dict[str, Tensor]:
        """Images (2B,3,S,S) view-major, the teacher's assignment (B,T,K) and valid clusters (B,K), its targets."""
        tokens = self.network(images)
        lap("student_backbone_forward")
        if lap is not _no_lap and tokens.requires_grad:  # the gradient reaches the tokens: heads' backward is done
            tokens.register_hook(lambda grad: lap("heads_loss_backward"))
        features = student_features(self.network, tokens, *pooling)
        lap("student_head_mlp")
        last_layers = self.network.head.last_layer_parameters()
        terms = student_terms(*features, last_layers, targets, self.temperatures, compute_dtype)
        lap("loss")
        return terms


def weighted_loss(terms: dict[str, Tensor], weights: LossWeights) -> Tensor:
    """The optimised loss: the three terms with their weights."""
    return (
        weights.global_ * terms["global"]
        + weights.object * terms["object"]
        + weights.cross_image * terms["cross_image"]
    )


# --------------------------------------------------------------------------------------------------------------
# Optimiser
# --------------------------------------------------------------------------------------------------------------


def set_optimizer_values(optimizer: torch.optim.Optimizer, values: StepValues) -> None:
    """Write this step's learning rate (times the group's ``lr_scale``) and weight decay (groups with
    ``weight_decay_on``; checkpoints older than these keys have two groups, of which the first is regularised)."""
    for index, group in enumerate(optimizer.param_groups):
        group["lr"] = values.lr * group.get("lr_scale", 1.0)
        if group.get("weight_decay_on", index == 0):
            group["weight_decay"] = values.weight_decay


def optimiser_step(modules: StepModules, clip_grad: float, loss: Tensor, values: StepValues, lap: Lap) -> None:
    """Backward, optional clipping, last-layer freezing, optimiser step (through the scaler)."""
    optimizer, scaler = modules.optimizer, modules.scaler
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    lap("student_backbone_backward")
    if clip_grad > 0:
        scaler.unscale_(optimizer)
        nn.utils.clip_grad_norm_(modules.student.parameters(), clip_grad)
    if values.freeze_last_layer:
        for name, param in modules.student.head.named_parameters():
            if name.startswith("last_layer"):
                param.grad = None
    scaler.step(optimizer)
    scaler.update()
    lap("optimiser")


# --------------------------------------------------------------------------------------------------------------
# The step
# --------------------------------------------------------------------------------------------------------------


def train_step(
    modules: StepModules,
    settings: StepSettings,
    batch: Batch,
    values: StepValues,
    *,
    lap: Lap | None = None,
    inspect: bool = False,
) -> StepOutput:
    """One optimisation step on one batch.

    Args:
        modules: the networks, loss, bank, optimiser and generators; updated in place.
        settings: the step's fixed settings.
        batch: images (B,V,3,S,S) and positions (B,V,N,2).
        values: this step's schedule values.
        lap: called with each phase's name (:data:`PHASES`) when it ends (for timing or inspection).
        inspect: also return the loss terms and the teacher side (objects, assignment, matches, targets).

    Returns:
        The logged numbers (and the intermediates when asked).

    Raises:
        NonFiniteLossError: a loss term is NaN or infinite (nothing was updated).
    """
    lap = lap or _no_lap
    set_optimizer_values(modules.optimizer, values)
    images = batch.images.to(settings.device, non_blocking=True).transpose(0, 1).flatten(0, 1)  # (2B,3,S,S)
    positions = batch.positions.to(settings.device, non_blocking=True)  # (B,V,N,2)
    teacher = teacher_side(modules, settings, (images, positions), values, lap)
    with settings.autocast():
        pooling = (teacher.assignment, teacher.valid)
        terms = modules.student_step(images, pooling, teacher.targets, settings.compute_dtype, lap)
    loss = weighted_loss(terms, settings.loss_weights)
    terms["loss"] = loss
    if not torch.isfinite(loss):
        details = ", ".join(f"{k}={float(v.detach()):.4g}" for k, v in terms.items() if v.numel() == 1)
        raise NonFiniteLossError(f"non-finite loss ({details})")
    optimiser_step(modules, settings.clip_grad, loss, values, lap)
    ema_update(modules.teacher, modules.student, values.momentum)
    lap("ema")
    if settings.loss_weights.objects_on:
        objects = distributed.all_gather_ragged(teacher.objects)
        pushed = modules.bank.push(objects, distributed.all_gather_ragged(teacher.objects_per_image))
        modules.bank_keys.update(modules.bank, pushed)
        lap("bank_push")
    log = step_log(terms, teacher, values)
    if not inspect:
        return StepOutput(log)
    return StepOutput(log, {key: value.detach() for key, value in terms.items()}, teacher)


def step_log(terms: dict[str, Tensor], teacher: TeacherOutput, values: StepValues) -> dict[str, float]:
    """The authors' log keys for one step: d_loss, s_loss, nn_loss, r_cnt, bootstrap_centroid_ratio, lr, wd."""
    n = max(teacher.objects.shape[0], 1)
    return {
        "loss": float(terms["loss"].detach()),
        "d_loss": float(terms["global"].detach()),
        "s_loss": float(terms["object"].detach()),
        "nn_loss": float(terms["cross_image"].detach()),
        "r_cnt": float(teacher.objects_per_image.float().mean()),
        "bootstrap_centroid_ratio": float(teacher.matches.cycle_mask.float().sum()) / (2 * n),
        "lr": values.lr,
        "wd": values.weight_decay,
    }
