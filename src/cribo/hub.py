"""Weights in and out: loading backbones and whole CrIBo networks from any supported file, and exporting them.

Reads a cribo ``checkpoint.pth``, the authors' CrIBo checkpoint (DDP-prefixed student, teacher, ``args``),
DINO-style state dicts (``module.``/``backbone.`` prefixes, nested under ``teacher``/``student``/``model``/
``state_dict``), our ``.safetensors`` exports (with their arch in the header and a JSON sidecar), and builds
seeded random backbones for ``random:<arch>`` / ``timm:<name>``. Files are read with the safe loader; full
unpickling needs an explicit ``allow_pickle``, which is offered only for a well-formed pickle the safe loader
refuses: an empty, truncated, zero-filled or foreign file is reported as such (:func:`damaged_file_reason`), whatever
``allow_pickle`` says. Every backbone tensor is loaded or the call fails, naming the keys. Exports are written
atomically.

Axis letters: D embedding dim.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import hashlib
import json
import logging
import math
import pickletools
import re
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Literal

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from safetensors.torch import save as save_safetensors
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from cribo.files import DiskFullError, atomic_write_bytes
from cribo.models import (
    DEFAULT_PATCH_SIZE,
    EMBED_DIM_TO_ARCH,
    SHORT_ARCHS,
    CrIBoNetwork,
    ProjectionHead,
    create_backbone,
    interpolate_position_embedding,
)
from cribo.teacher import freeze

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
        seed: the seed of a random init (None for a file).
        position_grid: the file's position-embedding grid when it was resampled to the model's (else None).
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
    seed: int | None = None
    position_grid: tuple[int, int] | None = None


@dataclass
class _StateSource:
    """A state dict found in a file, with what the file says about its architecture."""

    state: Mapping[str, Tensor]
    source: Source
    arch: str | None = None
    patch_size: int | None = None
    which: str | None = None
    centers: Mapping[str, Tensor] | None = None  # the loss centres {"center", "center_c"} of a CrIBo checkpoint
    settings: Any = None  # the checkpoint's configuration (cribo config dict or the authors' args)


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class WeightsFileError(ValueError):
    """A file that cannot be a checkpoint or weights file: empty, truncated, damaged or of another format.

    Attributes:
        problem: what is wrong with it, as the end of a sentence that starts "it" ("is empty (0 bytes)").
    """

    def __init__(self, message: str, problem: str = "") -> None:
        super().__init__(message)
        self.problem = problem


class PickleRefusedError(ValueError):
    """A well-formed pickle that the safe loader refuses (it holds Python objects other than tensors)."""


ZIP_MAGIC = b"PK\x03\x04"  # torch.save's default (zip) format
PICKLE_PROTO = 0x80  # the PROTO opcode that starts every pickle of protocol >= 2 (torch's legacy format too)
SNIFF_BYTES = 64  # bytes shown when telling what kind of file it is


def _complete_pickle(stream: IO[bytes]) -> bool:
    """Whether ``stream`` holds a whole pickle up to its STOP opcode (parsed, never executed)."""
    try:
        return any(opcode.name == "STOP" for opcode, _, _ in pickletools.genops(stream))
    except Exception:  # genops raises several types (ValueError, UnicodeDecodeError, struct.error) on garbage
        return False


def _zip_problem(path: Path) -> str | None:
    """Why a zip-format file is not a readable PyTorch file (None when it is one)."""
    try:
        with zipfile.ZipFile(path) as archive:
            pickles = [name for name in archive.namelist() if name.endswith("data.pkl")]
            if not pickles:
                return "is a zip archive without a PyTorch data.pkl"
            damaged = archive.testzip()  # checks every entry's CRC (only reached when loading already failed)
            if damaged is not None:
                return f"is damaged (entry {damaged} fails its checksum)"
            with archive.open(pickles[0]) as stream:
                return None if _complete_pickle(stream) else "is damaged (its data.pkl is incomplete)"
    except (zipfile.BadZipFile, OSError, EOFError, ValueError):
        return "is truncated or damaged (its zip directory is missing or unreadable)"


def damaged_file_reason(path: Path) -> str | None:
    """Why ``path`` cannot be a PyTorch file (``torch.save``'s zip or legacy format), or None when it looks like one.

    Reads the file's structure only (zip directory, pickle opcodes); nothing is unpickled.
    """
    size = path.stat().st_size
    if size == 0:
        return "is empty (0 bytes)"
    with path.open("rb") as handle:
        head = handle.read(SNIFF_BYTES)
        if head.startswith(ZIP_MAGIC):
            return _zip_problem(path)
        if head[0] == PICKLE_PROTO:
            handle.seek(0)
            return None if _complete_pickle(handle) else "is a truncated or damaged pickle"
    if not head.strip(b"\0"):
        return "starts with zero bytes where a PyTorch header belongs (zero-filled?)"
    if len(head) >= 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < size:
        return "is a safetensors file: give it the .safetensors suffix"
    if all(32 <= byte < 127 or byte in b"\t\r\n" for byte in head):
        return f"is a text file (it starts with {head[:32].decode()!r}; a failed download?)"
    return f"is not a PyTorch file (it starts with bytes {head[:8].hex(' ')})"


def _refusal_detail(error: Exception) -> str:
    """The useful part of the safe loader's refusal (which global or opcode), without torch's advice."""
    text = str(error)
    marker = "WeightsUnpickler error:"
    if marker in text:
        lines = [line.strip() for line in text.split(marker, 1)[1].splitlines() if line.strip()]
        if lines:
            return lines[0].split(" Please use", 1)[0].rstrip(".")
    return type(error).__name__


def read_torch_file(path: Path, allow_pickle: bool = False, mmap: bool = False) -> Any:
    """``torch.load`` with the safe loader (argparse.Namespace allowed); full unpickling only if allowed. ``mmap``
    maps the tensors' bytes instead of reading them (zip-format files only).

    Raises:
        WeightsFileError: the file is empty, truncated, damaged or not a PyTorch file (whatever ``allow_pickle``).
        PickleRefusedError: a well-formed pickle the safe loader refuses and ``allow_pickle`` is False.
    """
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except MemoryError:
        raise
    except Exception as err:  # torch raises RuntimeError, EOFError, IndexError, KeyError... for damaged files
        refusal = err
    problem = damaged_file_reason(path)
    if problem is not None:
        raise WeightsFileError(
            f"{path} is not a valid checkpoint or weights file: it {problem}; re-download or copy it again, or "
            "point at another file",
            problem,
        ) from refusal
    if not allow_pickle:
        raise PickleRefusedError(
            f"{path} holds pickled Python objects that the safe loader refuses ({_refusal_detail(refusal)}); pass "
            "--allow-pickle (allow_pickle=True) only if you trust the file: unpickling can run arbitrary code"
        ) from refusal
    logger.warning("loading %s with full unpickling (allow_pickle=True)", path)
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except MemoryError:
        raise
    except Exception as err:  # anything the file's pickled code raises
        raise WeightsFileError(
            f"{path} could not be loaded even with full unpickling ({type(err).__name__}: {err}); it may not be a "
            "PyTorch file"
        ) from err


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
            centers=_checkpoint_centers(obj),
            settings=settings,
        )
    return _StateSource(state=_unwrap_state_dict(obj, which, path), source="dino_state_dict")


def _checkpoint_centers(obj: Mapping[str, Any]) -> dict[str, Tensor] | None:
    """The loss centres of a cribo (``criterion``) or authors' (``dino_loss``) checkpoint, if it has them."""
    criterion = obj.get("criterion")
    if isinstance(criterion, Mapping) and {"center.center", "center_c.center"} <= set(criterion):
        return {"center": criterion["center.center"], "center_c": criterion["center_c.center"]}
    authors = obj.get("dino_loss")
    if isinstance(authors, Mapping) and {"center", "center_c"} <= set(authors):
        return {"center": authors["center"], "center_c": authors["center_c"]}
    return None


def _safetensors_problem(path: Path, error: Exception) -> str:
    """What is wrong with a file named .safetensors that safetensors cannot read, and what to do."""
    if path.stat().st_size == 0:
        return "it is empty (0 bytes); export it again or point at another file"
    with path.open("rb") as handle:
        head = handle.read(len(ZIP_MAGIC))
    if head.startswith(ZIP_MAGIC) or head[:1] == bytes([PICKLE_PROTO]):
        return "it holds a PyTorch (pickle) checkpoint; give it the .pth suffix to read it with the PyTorch loader"
    reason = str(error).removeprefix("Error while deserializing header: ")
    return f"it is truncated or damaged ({reason}); export or download it again, or point at another file"


def _sidecar_facts(path: Path) -> dict[str, Any]:
    """The JSON sidecar of a safetensors export (arch, patch size), or {} when there is none."""
    sidecar = path.with_suffix(SIDECAR_SUFFIX)
    if not sidecar.is_file():
        return {}
    try:
        facts = json.loads(sidecar.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{sidecar} (sidecar of {path.name}) cannot be read: {err}; fix or remove it") from err
    return facts if isinstance(facts, dict) else {}  # a foreign JSON next to the file may be anything


def _read_safetensors(path: Path) -> _StateSource:
    """Tensors plus arch/patch size from the file's metadata or its JSON sidecar (see export_backbone)."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata: dict[str, Any] = dict(handle.metadata() or {})
        tensors = load_file(str(path))
    except SafetensorError as err:
        raise WeightsFileError(f"{path} is not a valid safetensors file: {_safetensors_problem(path, err)}") from err
    metadata = {**_sidecar_facts(path), **metadata}
    patch_size = metadata.get("patch_size")
    return _StateSource(
        state=tensors,
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


def parse_random_spec(spec: str) -> tuple[str, int]:
    """``random:<arch>[@<seed>]`` / ``timm:<name>[@<seed>]`` -> ``(arch, seed)``; the seed defaults to 0."""
    name = spec.split(":", 1)[1]
    seed = RANDOM_INIT_SEED
    if "@" in name:
        name, seed_text = name.rsplit("@", 1)
        if not seed_text.isdigit():
            raise ValueError(f"spec {spec!r}: the seed after '@' must be a non-negative integer, got {seed_text!r}")
        seed = int(seed_text)
    if not name:
        raise ValueError(
            f"spec {spec!r} names no arch: use 'random:<arch>[@<seed>]' ({sorted(SHORT_ARCHS)}) or "
            "'timm:<name>[@<seed>]'"
        )
    return name, seed


def _random_backbone(spec: str, patch_size: int | None) -> tuple[VisionTransformer, BackboneInfo]:
    """``random:<arch>[@<seed>]`` / ``timm:<name>[@<seed>]``: seeded random init, global RNG untouched."""
    name, seed = parse_random_spec(spec)
    patch = patch_size if patch_size is not None else DEFAULT_PATCH_SIZE
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        backbone = create_backbone(name, patch)
    info = BackboneInfo(
        source="random",
        arch=name,
        patch_size=backbone.patch_embed.patch_size[0],
        embed_dim=backbone.embed_dim,
        seed=seed,
    )
    return backbone.eval(), info


@dataclass(frozen=True)
class Weights:
    """The tensors of one weights file, split into backbone, head and loss centres, before any model is built.

    Attributes:
        backbone: backbone tensors under timm's names.
        head: ``head.*`` tensors without the prefix (empty when the file has none).
        centers: ``{"center", "center_c"}`` loss centres of a CrIBo checkpoint, else empty.
        source: kind of file.
        arch: the file's arch (given, read from the file, or inferred from the widths).
        patch_size: its patch size.
        path: the file (None for a random init).
        which: ``teacher``/``student`` entry read from a checkpoint holding both, else None.
        skipped_keys: state-dict entries that are neither backbone nor head.
        settings: the checkpoint's configuration (a cribo config dict or the authors' args), if any.
    """

    backbone: dict[str, Tensor]
    head: dict[str, Tensor]
    centers: dict[str, Tensor]
    source: Source
    arch: str
    patch_size: int
    path: Path | None
    which: str | None = None
    skipped_keys: tuple[str, ...] = ()
    settings: Any = None


def read_weights(
    path: str | Path,
    *,
    which: Which = "teacher",
    arch: str | None = None,
    patch_size: int | None = None,
    allow_pickle: bool = False,
) -> Weights:
    """Read a weights file of any supported layout (see :func:`load_backbone`) with the safe loader.

    Raises:
        ValueError: the file is missing or holds no state dict, or its arch cannot be told (pass ``arch``).
    """
    if which not in ("teacher", "student"):
        raise ValueError(f"which must be 'teacher' or 'student', got {which!r}")
    path = Path(path)
    if not path.is_file():
        raise ValueError(
            f"spec {str(path)!r} is not a file; expected a checkpoint, a .safetensors file, "
            "'random:<arch>[@<seed>]' or 'timm:<name>[@<seed>]'"
        )
    found = _read_safetensors(path) if path.suffix == ".safetensors" else None
    if found is None:
        found = _parse_checkpoint(read_torch_file(path, allow_pickle), which, path)
    backbone_state, skipped = split_backbone_state(found.state)
    arch_name, patch = _resolve_architecture(backbone_state, arch or found.arch, patch_size or found.patch_size, path)
    stripped = strip_wrapper_prefixes(found.state)
    head = {key[len(HEAD_PREFIX) :]: value for key, value in stripped.items() if key.startswith(HEAD_PREFIX)}
    others = tuple(key for key in skipped if not key.startswith(HEAD_PREFIX))
    return Weights(
        backbone=backbone_state,
        head=head,
        centers=dict(found.centers or {}),
        source=found.source,
        arch=arch_name,
        patch_size=patch,
        path=path,
        which=found.which,
        skipped_keys=others,
        settings=found.settings,
    )


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
            a ``.safetensors`` file, or ``random:<arch>[@<seed>]`` / ``timm:<name>[@<seed>]`` for a random init
            (seed 0 unless given). A position embedding learned for another grid is resampled to the model's.
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
    weights = read_weights(spec, which=which, arch=arch, patch_size=patch_size, allow_pickle=allow_pickle)
    assert weights.path is not None
    backbone, grid = _backbone_from_state(weights.backbone, weights.arch, weights.patch_size, weights.path)
    info = BackboneInfo(
        source=weights.source,
        arch=weights.arch,
        patch_size=weights.patch_size,
        embed_dim=backbone.embed_dim,
        path=str(weights.path),
        sha256=file_sha256(weights.path),
        which=weights.which,
        loaded_keys=tuple(weights.backbone),
        skipped_keys=tuple(f"{HEAD_PREFIX}{key}" for key in weights.head) + weights.skipped_keys,
        position_grid=grid,
    )
    logger.info(
        "loaded %s backbone %s/%d from %s (%d tensors)",
        info.source,
        info.arch,
        info.patch_size,
        weights.path,
        len(weights.backbone),
    )
    return backbone.eval(), info


def _backbone_from_state(
    state: Mapping[str, Tensor], arch: str, patch_size: int, path: Path
) -> tuple[VisionTransformer, tuple[int, int] | None]:
    """A ViT of ``arch``/``patch_size`` (as deep as ``state``) holding exactly the tensors of ``state``, checked.

    Returns the backbone and the file's position grid when it was resampled to the model's (else None).
    """
    backbone = _backbone_to_load(arch, patch_size)
    shallow = depth_of_state(state)
    if shallow is not None and shallow < len(backbone.blocks):  # a shallower ViT (e.g. the tiny-cpu preset)
        backbone = _backbone_to_load(arch, patch_size, shallow)
    expected = backbone.state_dict()
    state, grid = fit_position_embedding(state, tuple(backbone.patch_embed.grid_size))
    check_state_dict(expected, state, f"backbone weights in {path}")
    # The file's tensors are ours alone: the model takes them over (in its own dtype) instead of copying them.
    converted = {key: value.to(expected[key].dtype).contiguous() for key, value in state.items()}
    backbone.load_state_dict(converted, strict=True, assign=True)
    return backbone, grid


def fit_position_embedding(
    state: Mapping[str, Tensor], grid: tuple[int, int]
) -> tuple[dict[str, Tensor], tuple[int, int] | None]:
    """Resample a backbone state's ``pos_embed`` learned for another square grid to ``grid`` (the authors' bicubic
    scheme, :func:`cribo.models.interpolate_position_embedding`), the [CLS] entry kept.

    Returns the state (unchanged when the grids agree or it has no square ``pos_embed`` + [CLS]) and the file's grid
    when it was resampled, else None.
    """
    pos_embed = state.get("pos_embed")
    expected_tokens = 1 + grid[0] * grid[1]
    if pos_embed is None or pos_embed.ndim != 3 or pos_embed.shape[1] == expected_tokens:
        return dict(state), None
    side = math.isqrt(pos_embed.shape[1] - 1)
    if side * side != pos_embed.shape[1] - 1:
        return dict(state), None  # not [CLS] + a square grid: check_state_dict names the mismatch
    resampled = interpolate_position_embedding(pos_embed.float(), grid, (side, side)).to(pos_embed.dtype)
    return {**state, "pos_embed": resampled}, (side, side)


# ----------------------------------------------------------------------------------------------------------------
# Whole CrIBo networks: the full checkpoint, and the initialisation of a training run


def head_from_state(state: Mapping[str, Tensor], in_dim: int, norm_last_layer: bool = True) -> ProjectionHead:
    """A :class:`~cribo.models.ProjectionHead` shaped like the ``head.*`` tensors ``state`` (prefix removed) holds.

    Widths, number of MLP layers and batch norm are read from the tensors' names and shapes.
    """
    linear = sorted(
        (int(match.group(1)), value)
        for key, value in state.items()
        if (match := re.fullmatch(r"mlp\.(\d+)\.weight", key)) and value.ndim == 2
    )
    layers = [value for _, value in linear] or ([state["mlp.weight"]] if "mlp.weight" in state else [])
    missing = [key for key in ("last_layer.weight_v", "last_layer_c.weight_v") if key not in state]
    if not layers or missing:
        raise ValueError(f"head tensors do not describe a CrIBo head: no MLP weights or missing {missing}")
    return ProjectionHead(
        in_dim,
        int(state["last_layer.weight_v"].shape[0]),
        int(state["last_layer_c.weight_v"].shape[0]),
        hidden_dim=int(layers[0].shape[0]) if len(layers) > 1 else int(layers[-1].shape[0]),
        bottleneck_dim=int(layers[-1].shape[0]),
        num_layers=len(layers),
        use_bn=any(key.endswith(".running_mean") for key in state),
        norm_last_layer=norm_last_layer,
    )


@dataclass
class CriboCheckpoint:
    """A full CrIBo checkpoint (ours or the authors'): both networks with their heads, and the loss centres.

    Attributes:
        student: the student network (backbone + head), on CPU.
        teacher: the teacher network, on CPU, frozen and in eval mode.
        centers: ``{"center": (1, C), "center_c": (1, Cc)}`` the loss centres.
        source: ``cribo`` or ``authors_cribo``.
        arch: the backbones' arch.
        patch_size: their patch size.
        path: the file.
        sha256: its SHA-256.
        settings: the checkpoint's configuration (our config dict, or the authors' ``argparse.Namespace``).
    """

    student: CrIBoNetwork
    teacher: CrIBoNetwork
    centers: dict[str, Tensor]
    source: Source
    arch: str
    patch_size: int
    path: Path
    sha256: str
    settings: Any


def load_cribo_checkpoint(path: str | Path, *, allow_pickle: bool = False) -> CriboCheckpoint:
    """Load a cribo ``checkpoint.pth`` or the authors' CrIBo checkpoint into student, teacher, heads and centres.

    The same rules as :func:`load_backbone`: the safe loader first (``allow_pickle`` only for trusted files), every
    tensor of both networks loaded or a ValueError naming the keys.

    Raises:
        ValueError: the file is not a CrIBo training checkpoint (a backbone alone: use :func:`load_backbone`).
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path} is not a file; expected a cribo checkpoint.pth or the authors' CrIBo checkpoint")
    obj = read_torch_file(path, allow_pickle)
    networks: dict[str, CrIBoNetwork] = {}
    found: _StateSource | None = None
    for which in ("student", "teacher"):
        found = _parse_checkpoint(obj, which, path)
        if found.source not in ("cribo", "authors_cribo") or found.centers is None:
            raise ValueError(
                f"{path} is not a CrIBo training checkpoint (student and teacher with object heads, loss centres); "
                "for the backbone of another file use load_backbone"
            )
        networks[which] = _network_from_state(found, path, norm_last_layer=which == "teacher")
    assert found is not None and found.centers is not None
    arch, patch_size = _resolve_architecture(split_backbone_state(found.state)[0], found.arch, found.patch_size, path)
    teacher = networks["teacher"]
    freeze(teacher)
    return CriboCheckpoint(
        student=networks["student"],
        teacher=teacher,
        centers={key: value.clone() for key, value in found.centers.items()},
        source=found.source,
        arch=arch,
        patch_size=patch_size,
        path=path,
        sha256=file_sha256(path),
        settings=found.settings,
    )


def _network_from_state(found: _StateSource, path: Path, norm_last_layer: bool) -> CrIBoNetwork:
    """Backbone and head of one network of a CrIBo checkpoint, every tensor checked."""
    backbone_state, _ = split_backbone_state(found.state)
    arch, patch_size = _resolve_architecture(backbone_state, found.arch, found.patch_size, path)
    backbone, _ = _backbone_from_state(backbone_state, arch, patch_size, path)
    stripped = strip_wrapper_prefixes(found.state)
    head_state = {k[len(HEAD_PREFIX) :]: v for k, v in stripped.items() if k.startswith(HEAD_PREFIX)}
    if not norm_last_layer:
        setting = _find_setting(found.settings, "norm_last_layer")
        norm_last_layer = bool(setting) if setting is not None else False
    head = head_from_state(head_state, backbone.embed_dim, norm_last_layer)
    check_state_dict(head.state_dict(), head_state, f"head weights in {path}")
    head.load_state_dict(head_state, strict=True)
    return CrIBoNetwork(backbone, head)


@dataclass(frozen=True)
class InitReport:
    """What ``--init`` loaded into a training run and what starts fresh (logged, and saved as ``init.json``)."""

    spec: str
    source: str
    sha256: str | None
    arch: str
    patch_size: int
    backbone_tensors: int
    position_grid: tuple[int, int] | None  # the file's grid, when its position embedding was resampled
    head_loaded: tuple[str, ...]
    head_fresh: tuple[str, ...]
    centers_loaded: bool

    def lines(self) -> list[str]:
        """A few readable lines for the log."""
        grid = ""
        if self.position_grid is not None:
            grid = f", position embedding resampled from {self.position_grid[0]}x{self.position_grid[1]}"
        lines = [
            f"init: {self.spec} ({self.source}, {self.arch}/{self.patch_size}): all {self.backbone_tensors} backbone "
            f"tensors loaded into student and teacher{grid}"
        ]
        if self.head_loaded and not self.head_fresh:
            lines.append(f"init: head loaded ({len(self.head_loaded)} tensors)")
        elif self.head_loaded:
            fresh = _list_keys(list(self.head_fresh))
            lines.append(f"init: head partly loaded ({len(self.head_loaded)} tensors); fresh: {fresh}")
        else:
            lines.append("init: the projection head starts fresh (the file has no head of this run's shape)")
        lines.append(f"init: loss centres {'loaded' if self.centers_loaded else 'start at zero'}")
        return lines

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields."""
        return {
            **dataclasses.asdict(self),
            "position_grid": list(self.position_grid) if self.position_grid else None,
            "head_loaded": list(self.head_loaded),
            "head_fresh": list(self.head_fresh),
        }


def read_init_weights(spec: str, patch_size: int, *, allow_pickle: bool = False) -> Weights:
    """The weights of ``--init SPEC``: any file :func:`load_backbone` reads (its ``teacher`` entry), or a seeded random
    ``random:<arch>[@<seed>]`` / ``timm:<name>[@<seed>]`` backbone of patch ``patch_size``."""
    if spec.startswith(("random:", "timm:")):
        backbone, info = _random_backbone(spec, patch_size)
        return Weights(dict(backbone.state_dict()), {}, {}, "random", info.arch, info.patch_size, None)
    return read_weights(spec, allow_pickle=allow_pickle)


def initialize_network(network: CrIBoNetwork, weights: Weights, spec: str) -> InitReport:
    """Copy ``weights`` into ``network``: every backbone tensor (position embedding resampled to the network's grid)
    or a ValueError naming the keys and the settings to change; each head tensor whose name and shape match.

    Returns what was loaded (loss centres are the caller's: :attr:`Weights.centers`).
    """
    backbone = network.backbone
    state, grid = fit_position_embedding(weights.backbone, tuple(backbone.patch_embed.grid_size))
    try:
        check_state_dict(backbone.state_dict(), state, f"the backbone weights of --init {spec}")
    except ValueError as err:
        depth = depth_of_state(state)
        raise ValueError(
            f"{err}. The file holds a {weights.arch}/{weights.patch_size} with {depth} blocks; set --arch, "
            "--patch_size and --depth to match it"
        ) from None
    with torch.no_grad():
        backbone.load_state_dict(state, strict=True)
        own = network.head.state_dict()
        loaded = {k: v for k, v in weights.head.items() if k in own and tuple(v.shape) == tuple(own[k].shape)}
        network.head.load_state_dict({**own, **loaded}, strict=True)
    return InitReport(
        spec=spec,
        source=weights.source,
        sha256=file_sha256(weights.path) if weights.path is not None else None,
        arch=weights.arch,
        patch_size=weights.patch_size,
        backbone_tensors=len(state),
        position_grid=grid,
        head_loaded=tuple(sorted(loaded)),
        head_fresh=tuple(sorted(set(own) - set(loaded))),
        centers_loaded=False,
    )


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
    data = save_safetensors(tensors, metadata={key: str(value) for key, value in facts.items()})
    path.parent.mkdir(parents=True, exist_ok=True)
    for target, content in (
        (path, data),
        (path.with_suffix(SIDECAR_SUFFIX), (json.dumps(facts, indent=2) + "\n").encode()),
    ):
        try:
            atomic_write_bytes(target, content)
        except OSError as err:
            if err.errno != errno.ENOSPC:  # name the file, not its temp file
                raise OSError(err.errno, err.strerror or str(err), str(target)) from err
            raise DiskFullError(
                f"{target}: no space left on device; it was not written (a previous {target.name} is unchanged); "
                "free some space or write it elsewhere"
            ) from err
    return path
