"""Typed command options: one dataclass per command, flags derived from its fields, values coerced to their types.

One mechanism for ``cribo eval ...`` and ``cribo viz ...``. An options class is a dataclass whose fields are
declared with :func:`option` (default and help text), :func:`required_option` or :func:`positional_option`:

- :func:`add_option_arguments` gives each field one flag: ``input_size`` -> ``--input-size``; ``bool`` ->
  ``--flag/--no-flag``; a ``Literal`` -> its choices; ``tuple[T, ...]`` -> one or more values; ``X | None`` -> X
  with default None. The help ends with the default in brackets. The underscore spelling (``--patch_size``, the
  authors' flags) is accepted too for the fields marked ``underscore=True``, or every field of a class whose
  ``underscore_flags`` is True.
- :func:`options_from_args` fills the dataclass from the parsed flags through :func:`coerce`, the one value
  coercion (``cribo.config`` uses it for YAML, JSON and ``--set`` values too).
- :func:`add_command` registers a sub-command whose ``func`` builds the options and runs the command.

:class:`BackboneOptions` holds the fields of every command that loads a backbone (which network, on which device,
at which input size); :func:`resolve_input_size` and :func:`backbone_from_options` give them their meaning.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any, ClassVar, Literal, TypedDict, TypeVar, Union, get_args, get_origin

if TYPE_CHECKING:
    from timm.models.vision_transformer import VisionTransformer

    from cribo.hub import BackboneInfo

    SubParsers = argparse._SubParsersAction[argparse.ArgumentParser]

OptionKind = Literal["flag", "required", "positional"]
DefaultT = TypeVar("DefaultT")
METADATA_KEY = "cribo_option"  # where a field's OptionSpec sits in its metadata


@dataclass(frozen=True)
class OptionSpec:
    """How a field appears on the command line.

    Attributes:
        help: help text (the default is appended in brackets for ordinary flags).
        kind: ``flag`` (``--name VALUE``, has a default), ``required`` (``--name VALUE`` must be given) or
            ``positional``.
        metavar: the value's name in the usage line (default: the field name in capitals).
        parse: converts one command-line word to a value (default: the field's type).
        underscore: also accept ``--field_name`` (the authors' spelling).
    """

    help: str
    kind: OptionKind = "flag"
    metavar: str | None = None
    parse: Callable[[str], object] | None = None
    underscore: bool = False


def option(
    default: DefaultT,
    help_text: str,
    *,
    metavar: str | None = None,
    parse: Callable[[str], object] | None = None,
    underscore: bool = False,
) -> DefaultT:
    """A dataclass field that is an optional flag with ``default`` (see :class:`OptionSpec`)."""
    spec = OptionSpec(help_text, "flag", metavar, parse, underscore)
    return field(default=default, metadata={METADATA_KEY: spec})


def required_option(help_text: str, *, metavar: str | None = None) -> str:
    """A string field whose flag must be given on the command line (``""`` when built in Python)."""
    return field(default="", metadata={METADATA_KEY: OptionSpec(help_text, "required", metavar)})


def positional_option(help_text: str) -> str:
    """A string field given as a positional argument (``""`` when built in Python)."""
    return field(default="", metadata={METADATA_KEY: OptionSpec(help_text, "positional")})


@dataclass
class Options:
    """Base of the option dataclasses."""

    # True: every multi-word flag of the class also accepts its underscore spelling, not only the marked ones.
    underscore_flags: ClassVar[bool] = False


@dataclass
class BackboneOptions(Options):
    """Fields of every command that loads a backbone: which network, on which device, at which input size."""

    backbone: str = required_option(
        "checkpoint / state dict / .safetensors file, or random:<arch>[@<seed>] / timm:<name>[@<seed>]", metavar="SPEC"
    )
    which: Literal["teacher", "student"] = option("teacher", "network of checkpoints that hold both")
    arch: str | None = option(None, "architecture when the file does not say (vit_small, vit_base, timm name)")
    patch_size: int | None = option(None, "patch size when the file does not say", underscore=True)
    allow_pickle: bool = option(False, "allow unpickling a checkpoint the safe loader refuses (trusted files only)")
    input_size: int | None = option(None, "network input side (a multiple of the patch size)")
    device: str = option("auto", "torch device (auto: the accelerator if present, else cpu)")

    def default_input_size(self) -> int:
        """The network input side used when ``input_size`` is None (before rounding to the patch size)."""
        raise NotImplementedError(f"{type(self).__name__} does not define a default input size")


def resolve_input_size(options: BackboneOptions, patch_size: int) -> int:
    """``options.input_size`` (checked), else the command's default side rounded down to a multiple of the patch.

    Raises:
        ValueError: ``input_size`` is not a positive multiple of ``patch_size``.
    """
    if options.input_size is None:
        return max(patch_size, options.default_input_size() // patch_size * patch_size)
    if options.input_size < patch_size or options.input_size % patch_size:
        raise ValueError(
            f"--input-size must be a positive multiple of the patch size {patch_size}, got {options.input_size}"
        )
    return options.input_size


def backbone_from_options(options: BackboneOptions) -> tuple[VisionTransformer, BackboneInfo]:
    """The backbone named by ``--backbone`` (on CPU, in eval mode) and where it came from.

    Raises:
        ValueError: the spec cannot be loaded; the message names ``--backbone`` and what is valid.
    """
    from cribo.hub import load_backbone

    try:
        return load_backbone(
            options.backbone,
            which=options.which,
            arch=options.arch,
            patch_size=options.patch_size,
            allow_pickle=options.allow_pickle,
        )
    except ValueError as err:
        raise ValueError(f"--backbone {options.backbone!r}: {err}") from err


# ----------------------------------------------------------------------------------------------------------------
# Values


def _optional_inner(hint: object) -> object | None:
    """``X`` for ``X | None`` (``Optional[X]``), else None."""
    if get_origin(hint) in (Union, types.UnionType):
        members = [arg for arg in get_args(hint) if arg is not type(None)]
        if len(members) == 1 and len(get_args(hint)) == 2:
            return members[0]
    return None


def _coerce_tuple(value: object, hint: object, where: str) -> tuple[object, ...]:
    items = value.split(",") if isinstance(value, str) else value
    element_types = get_args(hint)
    if len(element_types) == 2 and element_types[1] is Ellipsis:  # tuple[T, ...]: any number of values
        if not isinstance(items, (list, tuple)):
            raise ValueError(f"{where}: expected a list of values, got {value!r}")
        return tuple(coerce(item, element_types[0], where) for item in items)
    if not isinstance(items, (list, tuple)) or len(items) != len(element_types):
        raise ValueError(f"{where}: expected {len(element_types)} values, got {value!r}")
    return tuple(coerce(item, element_type, where) for item, element_type in zip(items, element_types))


def _coerce_bool(value: object, where: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
        return value.lower() in ("true", "1", "yes")
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise ValueError(f"{where}: expected true/false, got {value!r}")


def coerce(value: object, hint: object, where: str) -> Any:
    """Convert a YAML / JSON / command-line value to the declared type ``hint``.

    Strings are parsed (``"3"`` -> 3, ``"yes"`` -> True, ``"0.25,1"`` -> a tuple); a ``Literal`` must be one of
    its values; ``X | None`` keeps None and coerces anything else to X; other unions are left as they are.

    Args:
        value: the value as read.
        hint: the field's type (``int``, ``Literal[...]``, ``tuple[float, float]``, ``tuple[int, ...]``, ...).
        where: what the value is, for the error (``"--k"``, ``"preset 'x': optim.epochs"``).

    Raises:
        ValueError: naming ``where``, the value, and what was expected (the valid choices of a ``Literal``).
    """
    origin = get_origin(hint)
    if origin is Literal:
        choices = get_args(hint)
        if value not in choices:
            raise ValueError(f"{where}: {value!r} is not one of {list(choices)}")
        return value
    if origin is tuple:
        return _coerce_tuple(value, hint, where)
    if origin in (Union, types.UnionType):
        inner = _optional_inner(hint)
        return value if value is None or inner is None else coerce(value, inner, where)
    if hint is bool:
        return _coerce_bool(value, where)
    try:
        if hint is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)  # type: ignore[call-overload]
        if hint is float:
            return float(value)  # type: ignore[arg-type]
        if hint is str:
            return str(value)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: expected {getattr(hint, '__name__', hint)}, got {value!r}") from None
    return value


# ----------------------------------------------------------------------------------------------------------------
# Flags


class FlagArguments(TypedDict, total=False):
    """Keyword arguments of ``ArgumentParser.add_argument`` derived from a field's type."""

    action: type[argparse.Action]
    choices: list[object]
    type: Callable[[str], object]
    nargs: str
    metavar: str


OptionsT = TypeVar("OptionsT", bound=Options)
ResultT = TypeVar("ResultT")


def flag_name(name: str) -> str:
    """``input_size`` -> ``--input-size``."""
    return f"--{name.replace('_', '-')}"


def option_spec(item: dataclasses.Field[object]) -> OptionSpec:
    """The :class:`OptionSpec` of a dataclass field declared with :func:`option` and friends."""
    spec = item.metadata.get(METADATA_KEY)
    if not isinstance(spec, OptionSpec):
        raise TypeError(f"field {item.name!r} is not declared with cribo.options.option()")
    return spec


def _flag_arguments(name: str, hint: object, spec: OptionSpec) -> FlagArguments:
    """``add_argument`` keywords for a field of type ``hint``."""
    inner = _optional_inner(hint)
    hint = hint if inner is None else inner
    origin, args = get_origin(hint), get_args(hint)
    arguments: FlagArguments
    if hint is bool:
        arguments = {"action": argparse.BooleanOptionalAction}
    elif origin is Literal:
        arguments = {"choices": list(args), "type": type(args[0])}
    elif origin is tuple:
        arguments = {"nargs": "+", "type": spec.parse or args[0]}
    elif hint in (int, float, str):
        arguments = {"type": spec.parse or typing.cast(Callable[[str], object], hint)}
    else:
        raise TypeError(f"no flag mapping for field {name!r} of type {hint!r}")
    if spec.metavar is not None:
        arguments["metavar"] = spec.metavar
    return arguments


def _shown_default(default: object) -> str:
    return " ".join(map(str, default)) if isinstance(default, tuple) else str(default)


def add_option_arguments(parser: argparse.ArgumentParser, options_type: type[Options]) -> None:
    """One argument per dataclass field of ``options_type``, in field order (see the module docstring)."""
    hints = typing.get_type_hints(options_type)
    for item in dataclasses.fields(options_type):
        spec, hint = option_spec(item), hints[item.name]
        arguments = _flag_arguments(item.name, hint, spec)
        if spec.kind == "positional":
            parser.add_argument(item.name, help=spec.help, **arguments)
            continue
        flags = [flag_name(item.name)]
        if "_" in item.name and hint is not bool and (spec.underscore or options_type.underscore_flags):
            flags.append(f"--{item.name}")  # the authors' underscore spelling (e.g. --patch_size) also works
        if spec.kind == "required":
            parser.add_argument(*flags, dest=item.name, required=True, help=spec.help, **arguments)
        else:
            help_text = f"{spec.help} [{_shown_default(item.default)}]"
            parser.add_argument(*flags, dest=item.name, default=item.default, help=help_text, **arguments)


def options_from_args(args: argparse.Namespace, options_type: type[OptionsT]) -> OptionsT:
    """The ``options_type`` dataclass filled from parsed arguments, each value coerced to its field's type."""
    hints = typing.get_type_hints(options_type)
    values = {
        item.name: coerce(getattr(args, item.name), hints[item.name], flag_name(item.name))
        for item in dataclasses.fields(options_type)
    }
    return options_type(**values)


def _run_with_options(
    options_type: type[OptionsT], run: Callable[[OptionsT], ResultT], args: argparse.Namespace
) -> ResultT:
    return run(options_from_args(args, options_type))


def add_command(
    commands: SubParsers,
    name: str,
    options_type: type[OptionsT],
    run: Callable[[OptionsT], ResultT],
    help_text: str,
    description: str | None = None,
) -> argparse.ArgumentParser:
    """Add sub-command ``name`` with one flag per field of ``options_type``; its ``func(args)`` returns
    ``run(options)``."""
    parser = commands.add_parser(name, help=help_text, description=description)
    add_option_arguments(parser, options_type)
    parser.set_defaults(func=partial(_run_with_options, options_type, run))
    return parser
