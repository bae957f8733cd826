"""Weights in and out: loading backbones and whole CrIBo networks from any supported file, and exporting them.

Reads a cribo ``checkpoint.pth``, the authors' CrIBo checkpoint (DDP-prefixed student, teacher, ``args``),
DINO-style state dicts (``module.``/``backbone.`` prefixes, nested under ``teacher``/``student``/``model``/
``state_dict``), our ``.safetensors`` exports (with their arch in the header and a JSON sidecar), and builds
seeded random backbones for ``random:<arch>`` / ``timm:<name>``. Files are read with the safe loader; full
unpickling needs an explicit ``allow_pickle``. Every backbone tensor is loaded or the call fails, naming the keys.

Axis letters: D embedding dim.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from cribo.models import DEFAULT_PATCH_SIZE, EMBED_DIM_TO_ARCH, SHORT_ARCHS, create_backbone

logger = logging.getLogger(__name__)

RANDOM_INIT_SEED = 0  # seed of the "random:<arch>" / "timm:<name>" baselines
# Wrappers around a state dict: DDP ("module."), torch.compile ("_orig_mod.").
WRAPPER_PREFIXES: tuple[str, ...] = ("module.", "_orig_mod.")
BACKBONE_PREFIX = "backbone."
HEAD_PREFIX = "head."
# Keys under which checkpoints nest a state dict (DINO, timm, Lightning...), besides "teacher"/"student".
STATE_DICT_WRAPPERS: tuple[str, ...] = ("model", "state_dict")
MAX_NESTING = 4
SIDECAR_SUFFIX = ".json"
EXPORT_FORMAT = "cribo-backbone"

Source = Literal["cribo", "authors_cribo", "dino_state_dict", "safetensors", "random"]
Which = Literal["teacher", "student"]


def _backbone_to_load(arch: str, patch_size: int, depth: int | None = None) -> VisionTransformer:
    """Backbone on the meta device, whose tensors ``load_state_dict(assign=True)`` then replaces.

    Skips the (slow) random init and a copy of every weight. Models with non-persistent buffers, which loading
    would not replace, are built normally.
    """
    with torch.device("meta"):
        model = create_backbone(arch, patch_size, depth=depth)
    persistent = set(model.state_dict())
    if any(name not in persistent for name, _ in model.named_buffers()):
        return create_backbone(arch, patch_size, depth=depth)
    return model


# ----------------------------------------------------------------------------------------------------------------
# State dicts


def strip_wrapper_prefixes(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Remove leading ``module.`` (DDP) and ``_orig_mod.`` (torch.compile) from every key."""
    stripped: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        name = key
        while name.startswith(WRAPPER_PREFIXES):
            name = name.split(".", 1)[1]
        stripped[name] = value
    return stripped


def _list_keys(keys: list[str], limit: int = 12) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


def check_state_dict(expected: Mapping[str, Tensor], given: Mapping[str, Tensor], what: str) -> None:
    """Raise ``ValueError`` listing missing keys, unexpected keys and shape mismatches of ``given``."""
    missing = [key for key in expected if key not in given]
    unexpected = [key for key in given if key not in expected]
    mismatched = [
        f"{key} {tuple(given[key].shape)} != {tuple(value.shape)}"
        for key, value in expected.items()
        if key in given and tuple(given[key].shape) != tuple(value.shape)
    ]
    problems = [
        f"{label}: {_list_keys(keys)}"
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", mismatched))
        if keys
    ]
    if problems:
        raise ValueError(f"{what} do not fit the model; " + "; ".join(problems))


def load_network_state(network: nn.Module, state_dict: Mapping[str, Tensor]) -> None:
    """Load a full teacher or student state dict (``backbone.*`` + ``head.*``, authors' or ours) into a network.

    Args:
        network: usually a :class:`CrIBoNetwork`.
        state_dict: keys possibly prefixed by ``module.`` (DDP) or ``_orig_mod.``; every tensor must fit.
    """
    stripped = strip_wrapper_prefixes(state_dict)
    check_state_dict(network.state_dict(), stripped, "network state dict entries")
    network.load_state_dict(stripped, strict=True)


def split_backbone_state(state_dict: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], list[str]]:
    """Separate backbone tensors from the rest (heads).

    With ``backbone.``-prefixed keys (after stripping ``module.``), those are the backbone; otherwise every
    key except ``head.*`` is. Returns ``(backbone_state, skipped_keys)``.
    """
    stripped = strip_wrapper_prefixes(state_dict)
    if any(key.startswith(BACKBONE_PREFIX) for key in stripped):
        backbone = {k[len(BACKBONE_PREFIX) :]: v for k, v in stripped.items() if k.startswith(BACKBONE_PREFIX)}
        skipped = [key for key in stripped if not key.startswith(BACKBONE_PREFIX)]
    else:
        backbone = {k: v for k, v in stripped.items() if not k.startswith(HEAD_PREFIX)}
        skipped = [key for key in stripped if key.startswith(HEAD_PREFIX)]
    return backbone, skipped


# ----------------------------------------------------------------------------------------------------------------
# Loading and exporting backbones


@dataclass(frozen=True)
class BackboneInfo:
    """Where a loaded backbone came from.

    Attributes:
        source: kind of spec that was read.
        arch: arch name given to :func:`create_backbone` (short name or timm name).
        patch_size: patch side in pixels.
        embed_dim: D.
        path: file read (None for random init).
        sha256: hex SHA-256 of that file (None for random init).
        which: ``teacher``/``student`` entry used for checkpoints holding both, else None.
        loaded_keys: backbone tensors loaded (all of the model's).
        skipped_keys: other entries of the state dict (heads), not loaded.
    """

    source: Source
    arch: str
    patch_size: int
    embed_dim: int
    path: str | None = None
    sha256: str | None = None
    which: str | None = None
    loaded_keys: tuple[str, ...] = ()
    skipped_keys: tuple[str, ...] = ()


@dataclass
class _StateSource:
    """A state dict found in a file, with what the file says about its architecture."""

    state: Mapping[str, Tensor]
    source: Source
    arch: str | None = None
    patch_size: int | None = None
    which: str | None = None


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _torch_load(path: Path, allow_pickle: bool) -> Any:
    """``torch.load`` with the safe loader (argparse.Namespace allowed); full unpickling only if allowed."""
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if not allow_pickle:
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ValueError(
                f"{path} cannot be read with the safe loader (torch.load(weights_only=True)): {reason}. "
                "Pass allow_pickle=True (CLI flag --allow-pickle) only for files you trust: unpickling can "
                "run arbitrary code."
            ) from err
    logger.warning("loading %s with full unpickling (allow_pickle=True)", path)
    return torch.load(path, map_location="cpu", weights_only=False)


def _find_setting(config: Any, key: str) -> Any:
    """Value of ``key`` in a (possibly nested) config dict or namespace, depth first; None if absent."""
    if isinstance(config, argparse.Namespace):
        config = vars(config)
    if not isinstance(config, Mapping):
        return None
    if key in config:
        return config[key]
    for value in config.values():
        found = _find_setting(value, key)
        if found is not None:
            return found
    return None


def _is_state_dict(value: Any) -> bool:
    return isinstance(value, Mapping) and len(value) > 0 and all(isinstance(v, Tensor) for v in value.values())


def _unwrap_state_dict(obj: Any, which: Which, path: Path) -> Mapping[str, Tensor]:
    """Descend through ``which``/``model``/``state_dict`` wrappers until a mapping of tensors."""
    current = obj
    for _ in range(MAX_NESTING):
        if _is_state_dict(current):
            return current
        if not isinstance(current, Mapping):
            break
        keys = [key for key in (which, *STATE_DICT_WRAPPERS) if isinstance(current.get(key), Mapping)]
        if not keys:
            raise ValueError(
                f"{path}: no state dict found under keys {sorted(map(str, current))}; expected a mapping of "
                f"tensors or one nested under {[which, *STATE_DICT_WRAPPERS]} (which={which!r})"
            )
        current = current[keys[0]]
    raise ValueError(f"{path}: does not hold a state dict (found {type(current).__name__})")


def _parse_checkpoint(obj: Any, which: Which, path: Path) -> _StateSource:
    """Recognise a cribo checkpoint, a teacher/student checkpoint with ``args`` (authors, DINO) or a state dict."""
    if isinstance(obj, Mapping) and ("teacher" in obj or "student" in obj) and ("config" in obj or "args" in obj):
        if not _is_state_dict(obj.get(which)):
            raise ValueError(f"{path}: no {which!r} state dict; entries: {sorted(map(str, obj))} (argument which)")
        state = obj[which]
        settings = obj["config"] if "config" in obj else obj["args"]
        patch_size = _find_setting(settings, "patch_size")
        source: Source
        if "config" in obj:
            source = "cribo"
        else:
            is_cribo = any("last_layer_c" in key for key in state)
            source = "authors_cribo" if is_cribo else "dino_state_dict"
        return _StateSource(
            state=state,
            source=source,
            arch=_find_setting(settings, "arch"),
            patch_size=int(patch_size) if patch_size is not None else None,
            which=which,
        )
    return _StateSource(state=_unwrap_state_dict(obj, which, path), source="dino_state_dict")


def _read_safetensors(path: Path) -> _StateSource:
    """Tensors plus arch/patch size from the file's metadata or its JSON sidecar (see export_backbone)."""
    with safe_open(str(path), framework="pt") as handle:
        metadata: dict[str, Any] = dict(handle.metadata() or {})
    sidecar = path.with_suffix(SIDECAR_SUFFIX)
    sidecar_facts = json.loads(sidecar.read_text()) if sidecar.is_file() else {}
    if isinstance(sidecar_facts, dict):  # a foreign JSON next to the file may be anything
        metadata = {**sidecar_facts, **metadata}
    patch_size = metadata.get("patch_size")
    return _StateSource(
        state=load_file(str(path)),
        source="safetensors",
        arch=metadata.get("arch"),
        patch_size=int(patch_size) if patch_size is not None else None,
    )


def _resolve_architecture(
    backbone_state: Mapping[str, Tensor], arch: str | None, patch_size: int | None, path: Path
) -> tuple[str, int]:
    """Arch and patch size: given ones first, else inferred from ``patch_embed.proj.weight`` (D, 3, p, p)."""
    proj = backbone_state.get("patch_embed.proj.weight")
    if patch_size is None:
        patch_size = int(proj.shape[-1]) if proj is not None else DEFAULT_PATCH_SIZE
    if arch is None:
        if proj is None:
            raise ValueError(f"{path}: no patch_embed.proj.weight to infer the arch from; pass arch=")
        embed_dim = int(proj.shape[0])
        if embed_dim not in EMBED_DIM_TO_ARCH:
            raise ValueError(
                f"{path}: cannot infer the arch from embed dim {embed_dim} (known: {EMBED_DIM_TO_ARCH}); "
                f"pass arch= (one of {sorted(SHORT_ARCHS)} or a timm ViT name)"
            )
        arch = EMBED_DIM_TO_ARCH[embed_dim]
    return arch, patch_size


def _random_backbone(spec: str, patch_size: int | None) -> tuple[VisionTransformer, BackboneInfo]:
    """``random:<arch>`` / ``timm:<name>``: seeded random init, global RNG untouched."""
    name = spec.split(":", 1)[1]
    if not name:
        raise ValueError(f"spec {spec!r} names no arch: use 'random:<arch>' ({sorted(SHORT_ARCHS)}) or 'timm:<name>'")
    patch = patch_size if patch_size is not None else DEFAULT_PATCH_SIZE
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_INIT_SEED)
        backbone = create_backbone(name, patch)
    info = BackboneInfo(
        source="random", arch=name, patch_size=backbone.patch_embed.patch_size[0], embed_dim=backbone.embed_dim
    )
    return backbone.eval(), info


def load_backbone(
    spec: str | Path,
    *,
    which: Which = "teacher",
    arch: str | None = None,
    patch_size: int | None = None,
    allow_pickle: bool = False,
) -> tuple[VisionTransformer, BackboneInfo]:
    """Load a backbone from any supported checkpoint, or build a seeded random one.

    Args:
        spec: a cribo ``checkpoint.pth`` (``teacher``/``student``/``config``), the authors' CrIBo checkpoint
            (``teacher``/``student``/``args``), a DINO-style state dict (possibly nested under
            ``teacher``/``student``/``model``/``state_dict``, keys possibly prefixed ``module.``/``backbone.``),
            a ``.safetensors`` file, or ``random:<arch>`` / ``timm:<name>`` for random init (seed 0).
        which: entry of checkpoints holding both networks.
        arch: overrides the file's arch; needed when it cannot be inferred from the weights.
        patch_size: overrides the file's patch size.
        allow_pickle: allow full unpickling when the safe loader fails (trusted files only).

    Returns:
        ``(backbone, info)``; the backbone is on CPU in eval mode and every one of its tensors was loaded.
    """
    if which not in ("teacher", "student"):
        raise ValueError(f"which must be 'teacher' or 'student', got {which!r}")
    if isinstance(spec, str) and spec.startswith(("random:", "timm:")):
        return _random_backbone(spec, patch_size)
    path = Path(spec)
    if not path.is_file():
        raise ValueError(
            f"spec {str(spec)!r} is not a file; expected a checkpoint, a .safetensors file, 'random:<arch>' "
            "or 'timm:<name>'"
        )
    found = _read_safetensors(path) if path.suffix == ".safetensors" else None
    if found is None:
        found = _parse_checkpoint(_torch_load(path, allow_pickle), which, path)
    backbone_state, skipped = split_backbone_state(found.state)
    arch_name, patch = _resolve_architecture(backbone_state, arch or found.arch, patch_size or found.patch_size, path)
    backbone = _backbone_from_state(backbone_state, arch_name, patch, path)
    info = BackboneInfo(
        source=found.source,
        arch=arch_name,
        patch_size=patch,
        embed_dim=backbone.embed_dim,
        path=str(path),
        sha256=file_sha256(path),
        which=found.which,
        loaded_keys=tuple(backbone_state),
        skipped_keys=tuple(skipped),
    )
    logger.info(
        "loaded %s backbone %s/%d from %s (%d tensors)", info.source, arch_name, patch, path, len(backbone_state)
    )
    return backbone.eval(), info


def _backbone_from_state(state: Mapping[str, Tensor], arch: str, patch_size: int, path: Path) -> VisionTransformer:
    """A ViT of ``arch``/``patch_size`` (as deep as ``state``) holding exactly the tensors of ``state``, checked."""
    backbone = _backbone_to_load(arch, patch_size)
    shallow = depth_of_state(state)
    if shallow is not None and shallow < len(backbone.blocks):  # a shallower ViT (e.g. the tiny-cpu preset)
        backbone = _backbone_to_load(arch, patch_size, shallow)
    expected = backbone.state_dict()
    check_state_dict(expected, state, f"backbone weights in {path}")
    # The file's tensors are ours alone: the model takes them over (in its own dtype) instead of copying them.
    converted = {key: value.to(expected[key].dtype).contiguous() for key, value in state.items()}
    backbone.load_state_dict(converted, strict=True, assign=True)
    return backbone


def depth_of_state(state: Mapping[str, Tensor]) -> int | None:
    """Number of transformer blocks in a backbone state dict (``blocks.<i>.`` keys); None if it has none."""
    indices = {int(match.group(1)) for key in state if (match := re.match(r"blocks\.(\d+)\.", key))}
    return max(indices) + 1 if indices else None


def arch_of(backbone: VisionTransformer) -> str:
    """Name that rebuilds ``backbone`` with :func:`create_backbone`: a short name for the authors' ViTs."""
    config: Mapping[str, Any] = getattr(backbone, "pretrained_cfg", None) or {}
    name = str(config.get("architecture", ""))
    for short in SHORT_ARCHS:
        if re.fullmatch(rf"{short}_patch\d+_224", name):
            return short
    if not name:
        raise ValueError("backbone has no timm architecture name; pass arch= to export_backbone")
    return name


def export_backbone(backbone: VisionTransformer, path: str | Path, *, arch: str | None = None) -> Path:
    """Write the backbone weights to ``path`` (``.safetensors``) plus a JSON sidecar with arch and patch size.

    The same facts go into the safetensors header metadata, so the file alone is enough for
    :func:`load_backbone`. Returns the path written.
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"path must end with .safetensors, got {path}")
    facts: dict[str, Any] = {
        "format": EXPORT_FORMAT,
        "arch": arch or arch_of(backbone),
        "patch_size": int(backbone.patch_embed.patch_size[0]),
        "embed_dim": int(backbone.embed_dim),
    }
    tensors = {key: value.detach().cpu().contiguous() for key, value in backbone.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={key: str(value) for key, value in facts.items()})
    path.with_suffix(SIDECAR_SUFFIX).write_text(json.dumps(facts, indent=2) + "\n")
    return path
