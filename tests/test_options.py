"""Options dataclasses -> flags -> values: flag derivation, coercion with clear errors, the input size rule."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import ClassVar, Literal

import pytest

from cribo.options import (
    BackboneOptions,
    Options,
    add_command,
    add_option_arguments,
    backbone_from_options,
    coerce,
    option,
    options_from_args,
    positional_option,
    required_option,
    resolve_input_size,
)
from cribo.viz.options import NeighbourOptions, PcaOptions


@dataclass
class Example(Options):
    """Every kind of field the flag builder knows."""

    name: str = required_option("a required flag", metavar="NAME")
    target: str = positional_option("a positional argument")
    num_items: int = option(3, "a count")
    step_size: float = option(0.5, "a marked field (authors' spelling)", underscore=True)
    mode: Literal["fast", "exact"] = option("fast", "a choice")
    values: tuple[int, ...] = option((1, 2), "several values")
    limit: int | None = option(None, "optional")
    verbose_output: bool = option(False, "a switch")


@dataclass
class Everywhere(Options):
    underscore_flags: ClassVar[bool] = True

    num_items: int = option(3, "a count")


def parser_for(options_type: type[Options]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="test")
    add_option_arguments(parser, options_type)
    return parser


def option_strings(parser: argparse.ArgumentParser) -> set[str]:
    return {flag for action in parser._actions for flag in action.option_strings}


def test_flags_are_derived_from_the_fields() -> None:
    parser = parser_for(Example)
    flags = option_strings(parser)
    assert {"--name", "--num-items", "--step-size", "--step_size", "--mode", "--values", "--limit"} <= flags
    assert {"--verbose-output", "--no-verbose-output"} <= flags
    assert "--num_items" not in flags and "--verbose_output" not in flags  # underscore spelling only where marked
    assert "--num_items" in option_strings(parser_for(Everywhere))
    help_text = parser.format_help()
    assert "a count [3]" in help_text and "several values [1 2]" in help_text and "--name NAME" in help_text
    with pytest.raises(SystemExit):
        parser.parse_args(["target"])  # --name is required
    with pytest.raises(SystemExit):
        parser.parse_args(["target", "--name", "x", "--mode", "slow"])  # not a choice


def test_parsed_flags_fill_the_dataclass_with_typed_values() -> None:
    args = parser_for(Example).parse_args(
        ["there", "--name", "x", "--num-items", "5", "--step_size", "0.25", "--values", "4", "5", "6"]
    )
    options = options_from_args(args, Example)
    assert options == Example(name="x", target="there", num_items=5, step_size=0.25, values=(4, 5, 6))
    assert isinstance(options.values, tuple) and options.limit is None and options.verbose_output is False
    options = options_from_args(parser_for(Example).parse_args(["t", "--name", "x", "--verbose-output"]), Example)
    assert options.verbose_output is True


def test_coerce_converts_or_names_the_value_and_what_is_valid() -> None:
    assert coerce("3", int, "--k") == 3 and coerce("0.25,1", tuple[float, float], "x") == (0.25, 1.0)
    assert coerce(["1", "2", "3"], tuple[int, ...], "--seeds") == (1, 2, 3)
    assert coerce(None, int | None, "--cap") is None and coerce("7", int | None, "--cap") == 7
    assert coerce("no", bool, "--flag") is False
    with pytest.raises(ValueError, match=r"--mode: 'slow' is not one of \['fast', 'exact'\]"):
        coerce("slow", Literal["fast", "exact"], "--mode")
    with pytest.raises(ValueError, match="--k: expected int, got 'x'"):
        coerce("x", int, "--k")
    with pytest.raises(ValueError, match="--k: expected int"):
        coerce(2.5, int, "--k")
    with pytest.raises(ValueError, match="expected 2 values"):
        coerce("1,2,3", tuple[float, float], "scale")


def test_add_command_runs_the_command_on_its_options() -> None:
    parser = argparse.ArgumentParser(prog="test")
    commands = parser.add_subparsers(dest="command", required=True)
    add_command(commands, "count", Everywhere, lambda options: options.num_items * 2, "doubles --num-items")
    args = parser.parse_args(["count", "--num_items", "4"])
    assert args.func(args) == 8


def test_input_size_defaults_to_the_image_side_rounded_to_the_patch() -> None:
    assert resolve_input_size(PcaOptions(image_size=100), 16) == 96
    assert resolve_input_size(PcaOptions(image_size=10), 16) == 16  # at least one patch
    assert resolve_input_size(NeighbourOptions(input_size=64), 16) == 64
    with pytest.raises(ValueError, match="--input-size must be a positive multiple of the patch size 16, got 40"):
        resolve_input_size(PcaOptions(input_size=40), 16)
    with pytest.raises(NotImplementedError):
        resolve_input_size(BackboneOptions(), 16)


def test_a_bad_backbone_names_the_flag() -> None:
    with pytest.raises(ValueError, match=r"--backbone 'no/such/file\.pth'"):
        backbone_from_options(PcaOptions(backbone="no/such/file.pth"))
    backbone, info = backbone_from_options(PcaOptions(backbone="random:vit_tiny", patch_size=8))
    assert info.patch_size == 8 and not backbone.training
