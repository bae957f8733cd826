"""Typed training configuration: defaults, shipped presets, the authors' args JSON, CLI overrides.

Order of precedence (lowest first): dataclass defaults -> ``--preset NAME`` (YAML deltas in ``cribo/configs``; a
preset whose YAML says ``preset: BASE`` applies BASE first) -> ``--config FILE`` (YAML, same shape) ->
``--args-json FILE`` (the JSON published with the authors' checkpoints) -> individual flags (``--arch vit_tiny``)
or ``--set section.field=value``.

Field names are the flags of the authors' ``main_cribo.py`` wherever the concept is the same (DESIGN.md §4), and
every field name is unique across sections, so ``--<field>`` needs no section prefix. Defaults are the authors'
parser defaults unless a comment says otherwise.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml

from cribo.options import coerce

logger = logging.getLogger(__name__)

Semantics = Literal["paper", "authors"]
Precision = Literal["auto", "fp32", "bf16", "fp16"]


@dataclass(frozen=True)
class ModelConfig:
    """Backbone and projection head."""

    arch: str = "vit_small"  # vit_tiny | vit_small | vit_base | any timm ViT name
    patch_size: int = 16
    depth: int = 0  # 0 = the architecture's own depth; >0 builds a shallower ViT (tiny CPU runs)
    out_dim: int = 65536  # global ([CLS]) head output (authors' preset value)
    out_dim_c: int = 65536  # object head output (authors' preset value)
    head_hidden_dim: int = 2048  # projection MLP width (authors' DINOHead)
    head_bottleneck_dim: int = 256  # L2-normalised bottleneck before the last layers (authors' DINOHead)
    norm_last_layer: bool = False  # freeze the weight-norm gain of the student's last layers
    use_bn_in_head: bool = False
    drop_path_rate: float = 0.1  # stochastic depth (authors' default)
    # Start student and teacher from these weights instead of a random init (post-training): any file `cribo eval`
    # reads (a cribo or the authors' checkpoint: its teacher; a DINO-style state dict; a .safetensors export) or
    # random:<arch>@<seed> / timm:<name>@<seed>. Heads (and centres) are loaded where the file has them.
    init: str = ""
    frozen_blocks: int = 0  # freeze the student's patch embedding and first N blocks (post-training; 0 = none)


@dataclass(frozen=True)
class DataConfig:
    """Pretraining images and the two-view augmentation."""

    data_path: str = ""  # folder of images (recursive); "" = the built-in synthetic scenes
    image_size: int = 224  # side of each global view (paper: 224)
    global_crops_scale: tuple[float, float] = (0.25, 1.0)  # random-resized-crop area range (authors)
    num_workers: int = 2
    scenes_num_images: int = 2048  # size of the built-in scenes' training split
    scenes_image_size: int = 128  # side of a built-in scene image in pixels


@dataclass(frozen=True)
class MethodConfig:
    """Joint-space clustering and cross-image matching."""

    n_tokens: int = 32  # clusters per image pair (K); COCO preset 64
    pos_alpha: tuple[float, float] = (1.0, 1.0)  # spatial weight schedule (start, end) — see `semantics`
    sinkhorn_lambda: float = 20.0
    sinkhorn_iterations: int = 5
    n_iter: int = 5  # clustering rounds
    update_c: bool = True  # update cluster marginals from hard counts
    queue_size: int = 25000  # memory bank capacity in images
    bank_chunk_size: int = 8192  # bank rows scored at once (larger chunks page-fault fresh buffers on CPU)
    semantics: Semantics = "paper"  # "authors" reproduces the quirks of the official code (reference/README.md)


@dataclass(frozen=True)
class LossConfig:
    """Temperatures and centring."""

    warmup_teacher_temp: float = 0.04
    teacher_temp: float = 0.07
    warmup_teacher_temp_epochs: int = 30
    warmup_teacher_temp_c: float = 0.04
    teacher_temp_c: float = 0.07
    student_temp: float = 0.1  # image-level; the authors' code ignores it and uses 0.1 (quirk 4)
    student_temp_c: float = 0.1
    center_momentum: float = 0.9
    weight_global: float = 1.0  # weights of the three terms in the total (paper: all 1); ablations set 0
    weight_object: float = 1.0
    weight_cross_image: float = 1.0


@dataclass(frozen=True)
class OptimConfig:
    """Optimiser and schedules."""

    epochs: int = 300
    batch_size_per_gpu: int = 128
    lr: float = 5e-4  # per 256 images; scaled linearly with the total batch
    min_lr: float = 1e-5
    warmup_epochs: int = 10
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    momentum_teacher: float = 0.996
    clip_grad: float = 0.0  # max gradient norm; 0 disables clipping
    backbone_lr_scale: float = 1.0  # the backbone's lr is lr x this (heads: lr); post-training uses < 1
    freeze_last_layer: int = 1  # epochs during which the last layers get no update
    optimizer: Literal["adamw"] = "adamw"


@dataclass(frozen=True)
class RunConfig:
    """Where and how the run executes."""

    output_dir: str = "runs/cribo"
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: Precision = "auto"  # auto = bf16 on CUDA when supported, fp32 on CPU
    saveckp_freq: int = 50  # keep a snapshot checkpointNNNN.pth every N epochs (0 = never)
    checkpoint_every: int = 500  # rewrite checkpoint.pth every N steps (and at every epoch end)
    log_every: int = 10  # a JSON line in log.txt every N steps
    max_steps: int = 0  # stop after this many global steps (0 = run all epochs); for smoke tests
    threads: int = 0  # torch CPU threads (0 = torch's default)
    keep_freed_memory: bool = True  # CPU: glibc keeps freed memory for reuse (no page faults per step; see runtime.py)


@dataclass(frozen=True)
class TrainConfig:
    """Everything `cribo train` needs."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)


SECTIONS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(TrainConfig))


def _section_types() -> dict[str, type]:
    hints = typing.get_type_hints(TrainConfig)
    return {name: hints[name] for name in SECTIONS}


def field_index() -> dict[str, tuple[str, Any]]:
    """Map every field name to ``(section, type)``; names are unique across sections."""
    index: dict[str, tuple[str, Any]] = {}
    for section, cls in _section_types().items():
        for name, hint in typing.get_type_hints(cls).items():
            if name in index:
                raise RuntimeError(f"config field {name!r} is defined in two sections")
            index[name] = (section, hint)
    return index


def to_dict(config: TrainConfig) -> dict[str, dict[str, Any]]:
    """Plain nested dict (tuples become lists) for YAML/JSON/checkpoints."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


def apply_overrides(config: TrainConfig, overrides: dict[str, Any], source: str) -> TrainConfig:
    """Return ``config`` with ``overrides`` applied.

    Args:
        overrides: either nested ``{section: {field: value}}`` or flat ``{field: value}`` / ``{"section.field": v}``.
        source: where the values come from, for error messages (a file name or "command line").

    Raises:
        ValueError: an unknown section or field (listing valid ones), or a value of the wrong type.
    """
    index = field_index()
    flat: dict[str, Any] = {}
    for key, value in overrides.items():
        if key in SECTIONS and isinstance(value, dict):
            for name, inner in value.items():
                if name not in index or index[name][0] != key:
                    valid = sorted(n for n, (s, _) in index.items() if s == key)
                    raise ValueError(f"{source}: unknown field {key}.{name}; valid fields of {key!r}: {valid}")
                flat[name] = inner
            continue
        name = key.split(".", 1)[1] if "." in key else key
        if name not in index or ("." in key and index[name][0] != key.split(".", 1)[0]):
            raise ValueError(f"{source}: unknown config key {key!r}; valid keys: {sorted(index)}")
        flat[name] = value
    sections = {s: getattr(config, s) for s in SECTIONS}
    for name, value in flat.items():
        section, hint = index[name]
        coerced = coerce(value, hint, f"{source}: {section}.{name}")
        sections[section] = dataclasses.replace(sections[section], **{name: coerced})
    return TrainConfig(**sections)


def preset_names() -> list[str]:
    """The shipped presets (``cribo/configs/*.yaml``)."""
    folder = resources.files("cribo") / "configs"
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def load_yaml(path: Path | str, flag: str = "--config") -> dict[str, Any]:
    """Read a YAML mapping, with an error naming ``flag`` and the file when it is missing, unreadable, not YAML or
    not a mapping."""
    if not Path(path).exists():
        raise ValueError(f"{flag} {path}: no such file; pass the path of a YAML config file")
    if not Path(path).is_file():  # a folder, or a FIFO or device that reading would block on
        raise ValueError(f"{flag} {path}: not a regular file; pass the path of a YAML config file")
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as err:
        reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
        raise ValueError(f"{flag} {path}: cannot read the file ({reason})") from err
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        raise ValueError(f"{flag} {path}: not valid YAML ({_yaml_problem(err)})") from err
    if not isinstance(data, dict):
        raise ValueError(f"{flag} {path}: expected a mapping of config sections, got {type(data).__name__}")
    return data


def _yaml_problem(error: yaml.YAMLError) -> str:
    """Where and what: 'line 3, column 5: mapping values are not allowed here'."""
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return f"{where}{problem}"


def load_preset(name: str) -> dict[str, Any]:
    """The YAML deltas of a shipped preset (its ``preset:`` key, if any, names the preset it builds on)."""
    names = preset_names()
    if name not in names:
        raise ValueError(f"unknown preset {name!r}; shipped presets: {names}")
    resource = resources.files("cribo") / "configs" / f"{name}.yaml"
    data = yaml.safe_load(resource.read_text()) or {}
    return data


def preset_layers(name: str) -> list[tuple[str, dict[str, Any]]]:
    """``(name, deltas)`` of a preset and of the presets it builds on (``preset: BASE``), the base first."""
    layers: list[tuple[str, dict[str, Any]]] = []
    while True:
        if any(name == seen for seen, _ in layers):
            raise ValueError(f"preset {name!r} builds on itself ({' -> '.join(n for n, _ in reversed(layers))})")
        deltas = dict(load_preset(name))
        base = deltas.pop("preset", None)
        layers.append((name, deltas))
        if base is None:
            return layers[::-1]
        name = str(base)


# The authors' args JSON: keys that map 1:1 onto our fields are applied; these are known but have no effect.
AUTHORS_INERT_KEYS: dict[str, str] = {
    "student_temp": "the official loss fixes the image-level student temperature at 0.1 (quirk 4)",
    "same_teacher_augmentations": "parsed but never used by the official code",
    "which_features": "only 'last' is used by the published runs",
    "local_crops_number": "no local crops in any published run",
    "local_crops_scale": "no local crops in any published run",
    "normalized_matching": "cribo always matches L2-normalised objects (the authors' default)",
    "use_fp16": "mapped to precision=fp16 (mixed precision on CUDA only)",
    "dataset_type": "the data source is --data_path",
    "imagenet1k_path": "use --data_path",
    "coco_path": "use --data_path",
    "untar_path": "not needed",
    "image_queries": "not used in pretraining",
    "labels_path": "not used in pretraining",
    "resnet_dilate": "ResNet backbones are not supported",
    "dist_url": "the launcher's environment is read instead",
    "local_rank": "read from the launcher's environment",
    "rank": "read from the launcher's environment",
    "world_size": "read from the launcher's environment",
    "gpu": "read from the launcher's environment",
}


def from_authors_args(args: dict[str, Any]) -> tuple[dict[str, Any], list[str], list[str]]:
    """Translate the authors' args JSON into our overrides.

    Returns:
        ``(overrides, inert, unknown)``: the flat overrides to apply, the keys that are known but have no effect
        (each with the reason), and keys this version does not know.
    """
    index = field_index()
    overrides: dict[str, Any] = {}
    inert: list[str] = []
    unknown: list[str] = []
    for key, value in args.items():
        if key == "use_fp16":
            overrides["precision"] = "fp16" if value else "fp32"
            inert.append(f"use_fp16: {AUTHORS_INERT_KEYS[key]}")
        elif key in AUTHORS_INERT_KEYS:
            inert.append(f"{key}={value!r}: {AUTHORS_INERT_KEYS[key]}")
        elif key == "output_dir":
            continue  # a path on the authors' machines
        elif key == "start_checkpoint_path":
            if value:
                overrides["init"] = value
                inert.append(f"{key}={value!r}: used as --init (weights, heads, centres; not the optimiser state)")
        elif key in index:
            overrides[key] = value
        else:
            unknown.append(key)
    return overrides, inert, unknown


def load_args_json(path: Path | str) -> dict[str, Any]:
    """Read an authors' args JSON (a flat mapping); errors name the file."""
    if not Path(path).is_file():  # missing, a folder, or a FIFO or device that reading would block on
        raise ValueError(f"--args-json {path}: no such file (or not a regular file)")
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"--args-json {path}: cannot read a JSON mapping ({err})") from err
    if not isinstance(data, dict):
        raise ValueError(f"--args-json {path}: expected a JSON object of the authors' arguments")
    return data


def resolve(
    preset: str | None = None,
    config_file: str | None = None,
    args_json: str | None = None,
    overrides: dict[str, Any] | None = None,
) -> TrainConfig:
    """Build the final configuration from its layers (see the module docstring)."""
    config = TrainConfig()
    for name, deltas in preset_layers(preset) if preset else []:
        config = apply_overrides(config, deltas, f"preset {name!r}")
    if config_file:
        config = apply_overrides(config, load_yaml(config_file), f"--config {config_file}")
    if args_json:
        translated, inert, unknown = from_authors_args(load_args_json(args_json))
        for line in inert:
            logger.warning("--args-json %s: inert key %s", args_json, line)
        if unknown:
            logger.warning("--args-json %s: unknown keys ignored: %s", args_json, ", ".join(sorted(unknown)))
        config = apply_overrides(config, translated, str(args_json))
    if overrides:
        config = apply_overrides(config, overrides, "command line")
    validate(config)
    return config


def validate(config: TrainConfig) -> None:
    """Cross-field checks, with errors naming the flag and the valid range."""
    if config.model.patch_size <= 0:  # checked first: the checks below divide by it
        raise ValueError(f"--patch_size must be positive, got {config.model.patch_size}")
    run = config.run
    checks = [
        (
            config.data.image_size >= config.model.patch_size,
            f"--image_size must be a positive multiple of --patch_size {config.model.patch_size}, got "
            f"{config.data.image_size}",
        ),
        (config.data.image_size % config.model.patch_size == 0, "--image_size must be a multiple of --patch_size"),
        (config.method.n_tokens >= 1, "--n_tokens must be at least 1"),
        (
            config.method.n_tokens <= 2 * (config.data.image_size // config.model.patch_size) ** 2,
            "--n_tokens must not exceed the tokens of two views (2 * (image_size / patch_size)^2)",
        ),
        (config.method.queue_size >= 1, "--queue_size must be at least 1"),
        (config.optim.batch_size_per_gpu >= 1, "--batch_size_per_gpu must be at least 1"),
        (config.optim.epochs >= 1, "--epochs must be at least 1"),
        (config.optim.lr >= 0, f"--lr must not be negative, got {config.optim.lr}"),
        (config.optim.min_lr >= 0, f"--min_lr must not be negative, got {config.optim.min_lr}"),
        (
            0.0 < config.data.global_crops_scale[0] <= config.data.global_crops_scale[1] <= 1.0,
            "--global_crops_scale must satisfy 0 < min <= max <= 1",
        ),
        (0.0 <= config.optim.momentum_teacher <= 1.0, "--momentum_teacher must lie in [0, 1]"),
        (config.model.frozen_blocks >= 0, "--frozen_blocks must be 0 (none) or a positive number of blocks"),
        (config.optim.backbone_lr_scale > 0, "--backbone_lr_scale must be positive"),
        (config.model.depth >= 0, "--depth must be 0 (the architecture's own depth) or a positive number of blocks"),
        (min(config.model.out_dim, config.model.out_dim_c) >= 1, "--out_dim and --out_dim_c must be at least 1"),
        (config.data.num_workers >= 0, "--num_workers must be 0 (load in the main process) or more"),
        (run.log_every >= 1, "--log_every must be at least 1 (a log line every N steps)"),
        (
            min(run.checkpoint_every, run.saveckp_freq, run.max_steps) >= 0,
            "--checkpoint_every, --saveckp_freq and --max_steps must be 0 (off) or positive",
        ),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)


def save(config: TrainConfig, path: Path) -> None:
    """Write the resolved configuration as YAML (atomically)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")  # the temp-file name cribo.checkpoint cleans up
    try:
        tmp.write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def from_dict(data: dict[str, Any]) -> TrainConfig:
    """Inverse of :func:`to_dict` (used when resuming or evaluating a checkpoint)."""
    return apply_overrides(TrainConfig(), data, "saved configuration")
