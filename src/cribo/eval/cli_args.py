"""Argparse builder for ``cribo eval {nn,linear,finetune}``: one flag per field of the option dataclasses.

Field ``input_size`` becomes ``--input-size`` (``--input_size`` is accepted too); booleans get
``--flag/--no-flag`` (hyphens only); ``Literal`` fields get choices; tuple fields take several values
(fractions may be written ``1/128``). The lead's ``cli.py`` calls ``add_eval_parser(commands)``; each
sub-command's ``func`` runs the evaluation, writes the table to stdout and returns the exit code.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import types
import typing
from collections.abc import Callable
from fractions import Fraction
from typing import Any

from cribo.eval.runner import (
    EvalOptions,
    EvalReport,
    FinetuneEvalOptions,
    LinearEvalOptions,
    NNEvalOptions,
    run_finetune,
    run_linear,
    run_nn,
)

Runner = Callable[[Any], EvalReport]
COMMANDS: dict[str, tuple[type[EvalOptions], Runner, str]] = {
    "nn": (NNEvalOptions, run_nn, "dense nearest-neighbour retrieval (in-context segmentation) mIoU"),
    "linear": (LinearEvalOptions, run_linear, "linear segmentation on the frozen backbone's patch tokens"),
    "finetune": (FinetuneEvalOptions, run_finetune, "fine-tune backbone + linear / mask-transformer decoder"),
}
REQUIRED = ("backbone",)


def parse_fraction(text: str) -> float:
    """``"1/128"``, ``"0.5"`` or ``"1"`` -> float in (0, 1]."""
    try:
        value = float(Fraction(text.strip()))
    except (ValueError, ZeroDivisionError) as error:
        raise argparse.ArgumentTypeError(f"{text!r} is not a fraction such as 1/128, 0.125 or 1") from error
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"fraction {text!r} must lie in (0, 1]")
    return value


def _flag_kwargs(name: str, hint: Any) -> dict[str, Any]:
    """argparse keyword arguments for a field of type ``hint``."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType) and type(None) in args:
        inner = [arg for arg in args if arg is not type(None)]
        return _flag_kwargs(name, inner[0])
    if hint is bool:
        return {"action": argparse.BooleanOptionalAction}
    if origin is typing.Literal:
        return {"choices": list(args), "type": type(args[0])}
    if origin is tuple:
        element = args[0]
        return {"nargs": "+", "type": parse_fraction if name == "fractions" else element}
    if hint in (int, float, str):
        return {"type": hint}
    raise TypeError(f"no flag mapping for field {name!r} of type {hint!r}")


def add_option_arguments(parser: argparse.ArgumentParser, options_type: type[EvalOptions]) -> None:
    """One flag per dataclass field of ``options_type`` (default and help from the field)."""
    hints = typing.get_type_hints(options_type)
    for item in dataclasses.fields(options_type):
        kwargs = _flag_kwargs(item.name, hints[item.name])
        flags = [f"--{item.name.replace('_', '-')}"]
        if "_" in item.name and hints[item.name] is not bool:
            flags.append(f"--{item.name}")  # the authors' underscore spelling (e.g. --patch_size) also works
        help_text = item.metadata.get("help", "")
        if item.name in REQUIRED:
            parser.add_argument(*flags, dest=item.name, required=True, help=help_text, **kwargs)
        else:
            default = item.default
            shown = " ".join(map(str, default)) if isinstance(default, tuple) else default
            parser.add_argument(*flags, dest=item.name, default=default, help=f"{help_text} [{shown}]", **kwargs)


def options_from_args(args: argparse.Namespace, options_type: type[EvalOptions]) -> EvalOptions:
    """The option dataclass filled from parsed flags (tuples restored from argparse's lists)."""
    values: dict[str, Any] = {}
    for item in dataclasses.fields(options_type):
        value = getattr(args, item.name)
        values[item.name] = tuple(value) if isinstance(value, list) else value
    return options_type(**values)


def command_eval(args: argparse.Namespace) -> int:
    """Run the evaluation named by ``args.eval_command``, write its table to stdout; exit code 0."""
    options_type, runner, _ = COMMANDS[args.eval_command]
    report = runner(options_from_args(args, options_type))
    sys.stdout.write(report.table + "\n")
    return 0


def add_eval_parser(commands: Any) -> argparse.ArgumentParser:
    """Add ``eval`` with the sub-commands ``nn``, ``linear``, ``finetune`` to ``commands`` (a subparsers
    action); each sets ``func=command_eval``."""
    parser = commands.add_parser("eval", help="evaluate a backbone: nn retrieval, linear segmentation, fine-tuning")
    evaluations = parser.add_subparsers(dest="eval_command", required=True)
    for name, (options_type, _, help_text) in COMMANDS.items():
        sub = evaluations.add_parser(
            name,
            help=help_text,
            description=f"cribo eval {name}: {help_text} (see PROTOCOLS.md); results go to a JSON file.",
        )
        add_option_arguments(sub, options_type)
        sub.set_defaults(func=command_eval)
    return parser


add_eval_arguments = add_eval_parser  # the name used in the issue
