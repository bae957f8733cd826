"""The ``cribo`` command: train, demo, eval {nn,linear,finetune}, viz, export, presets."""

from __future__ import annotations

import argparse
import logging
import sys
import traceback
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, get_args, get_origin

from cribo import distributed

if TYPE_CHECKING:
    from cribo.config import TrainConfig
    from cribo.options import SubParsers

logger = logging.getLogger("cribo")


def setup_logging(verbose: bool = False) -> None:
    """Log to stderr on rank 0 only (other ranks stay quiet unless something is wrong)."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    handler.addFilter(distributed.RankZeroFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)


# --------------------------------------------------------------------------------------------------------------
# train / demo
# --------------------------------------------------------------------------------------------------------------


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """One ``--<field>`` flag per configuration field (the authors' names), plus preset/config/args-json/set."""
    from cribo.config import field_index, preset_names

    parser.add_argument("--preset", help=f"shipped configuration: {', '.join(preset_names())}")
    parser.add_argument("--config", help="YAML file with config sections (same shape as the saved config.yaml)")
    parser.add_argument("--args-json", help="replay an args JSON published with the authors' checkpoints")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE", help="any override")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
    groups: dict[str, argparse._ArgumentGroup] = {}
    for name, (section, hint) in field_index().items():
        group = groups.setdefault(section, parser.add_argument_group(f"{section} options"))
        metavar = "|".join(map(str, get_args(hint))) if get_origin(hint) is typing.Literal else None
        nargs = len(get_args(hint)) if get_origin(hint) is tuple else None
        group.add_argument(f"--{name}", dest=f"cfg_{name}", nargs=nargs, metavar=metavar, default=None)


def collect_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The config values given on the command line (flags and ``--set``), as strings for coercion."""
    overrides: dict[str, Any] = {}
    for key, value in vars(args).items():
        if key.startswith("cfg_") and value is not None:
            overrides[key[len("cfg_") :]] = value
    for item in args.set:
        if "=" not in item:
            raise ValueError(f"--set {item!r}: expected SECTION.FIELD=VALUE")
        key, value = item.split("=", 1)
        overrides[key.strip()] = value.strip()
    return overrides


def command_train(args: argparse.Namespace) -> int:
    from cribo import config as config_lib
    from cribo.train import train

    distributed.init()
    try:
        cfg = config_lib.resolve(args.preset, args.config, args.args_json, collect_overrides(args))
        prepare_process(cfg)
        result = train(cfg, progress_bar=not args.no_progress)
    finally:
        distributed.shutdown()
    if distributed.is_main_process():
        print(summary_text(result.output_dir, result.history, result.epoch, result.step))
    return 0


def prepare_process(cfg: TrainConfig) -> None:
    """Process-wide settings a training run asks for: glibc keeps freed memory on CPU (``run.keep_freed_memory``)."""
    from cribo import runtime

    on_cpu = runtime.resolve_device(cfg.run.device).type == "cpu"
    if cfg.run.keep_freed_memory and on_cpu and runtime.keep_freed_memory():
        logger.debug("glibc malloc keeps freed memory (run.keep_freed_memory)")


def summary_text(output_dir: Path, history: list[dict[str, float]], epoch: int, step: int) -> str:
    """The end-of-run summary: where things are, and the logged terms averaged per epoch."""
    lines = [f"\nDone: epoch {epoch}, step {step}.", f"  checkpoint : {output_dir / 'checkpoint.pth'}"]
    lines += [f"  log        : {output_dir / 'log.txt'}", f"  config     : {output_dir / 'config.yaml'}"]
    columns = ("d_loss", "s_loss", "nn_loss", "r_cnt", "bootstrap_centroid_ratio", "images_per_s")
    per_epoch: dict[int, list[dict[str, float]]] = {}
    for row in history:
        per_epoch.setdefault(int(row["epoch"]), []).append(row)
    if per_epoch:
        lines.append("\n  epoch   global   object  cross-image  objects/img  cycle-consistent  images/s")
        for index, rows in sorted(per_epoch.items()):
            means = [sum(r.get(key, 0.0) for r in rows) / len(rows) for key in columns]
            lines.append(
                f"  {index:>5}{means[0]:>9.3f}{means[1]:>9.3f}{means[2]:>13.3f}{means[3]:>13.2f}"
                f"{means[4]:>18.3f}{means[5]:>10.1f}"
            )
        lines.append("  (losses: cross-entropies, lower is better; the cross-image term starts at epoch 1)")
    return "\n".join(lines)


def command_demo(args: argparse.Namespace) -> int:
    """Pretrain the tiny preset on the built-in scenes, then score the teacher against its random init."""
    from cribo import config as config_lib
    from cribo import demo

    # The run folder is the preset's own (tiny-cpu: runs/demo), so a finished run is never resumed under another
    # preset's schedule.
    overrides = collect_overrides(args)
    cfg = config_lib.resolve(args.preset or demo.DEMO_PRESET, args.config, args.args_json, overrides)
    print(
        f"cribo demo: pretraining {cfg.model.arch} (patch {cfg.model.patch_size}, depth "
        f"{cfg.model.depth or 'full'}) on the built-in synthetic scenes for {cfg.optim.epochs} epochs on "
        f"{cfg.run.device}, then scoring its dense features against its random init; output in {cfg.run.output_dir}"
    )
    prepare_process(cfg)
    print(demo.summary_text(demo.run_demo(cfg, progress_bar=not args.no_progress)))
    return 0


def command_presets(args: argparse.Namespace) -> int:
    from cribo import config as config_lib

    for name in config_lib.preset_names():
        print(name)
    return 0


# --------------------------------------------------------------------------------------------------------------
# export
# --------------------------------------------------------------------------------------------------------------


def command_export(args: argparse.Namespace) -> int:
    from cribo.hub import export_backbone, load_backbone

    backbone, info = load_backbone(args.checkpoint, which=args.which, allow_pickle=args.allow_pickle)
    path = export_backbone(backbone, Path(args.output), arch=info.arch)
    print(f"exported the {args.which} backbone of {args.checkpoint} ({info.arch}/{info.patch_size}) to {path}")
    return 0


# --------------------------------------------------------------------------------------------------------------
# entry point
# --------------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cribo", description=__doc__)
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="debug logging, and the traceback of an error (for bug reports)"
    )
    commands = parser.add_subparsers(dest="command", required=True)

    train_parser = commands.add_parser("train", help="pretrain a ViT with CrIBo (torchrun-ready, resumable)")
    add_config_arguments(train_parser)
    train_parser.set_defaults(func=command_train)

    demo_parser = commands.add_parser("demo", help="pretrain the tiny-cpu preset on the built-in scenes")
    add_config_arguments(demo_parser)
    demo_parser.set_defaults(func=command_demo)

    presets_parser = commands.add_parser("presets", help="list the shipped presets")
    presets_parser.set_defaults(func=command_presets)

    export_parser = commands.add_parser("export", help="write a checkpoint's backbone as safetensors (+ JSON)")
    export_parser.add_argument("checkpoint", help="cribo or authors' checkpoint, or a DINO state dict")
    export_parser.add_argument("output", help="destination .safetensors file")
    export_parser.add_argument("--which", choices=["teacher", "student"], default="teacher")
    export_parser.add_argument("--allow-pickle", action="store_true", help="trust a pickled checkpoint")
    export_parser.set_defaults(func=command_export)

    add_optional_commands(commands)
    return parser


def add_optional_commands(commands: SubParsers) -> None:
    """`eval` and `viz` sub-commands (flags derived from their options dataclasses by `cribo.options`)."""
    from cribo.eval.commands import add_eval_parser
    from cribo.viz.commands import add_viz_parser

    add_eval_parser(commands)
    add_viz_parser(commands)


def main(argv: Sequence[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    try:
        result = args.func(args)
        if isinstance(result, Path):  # commands that write one file (viz) return its path
            print(f"wrote {result}")
            result = 0
        code = result
    except KeyboardInterrupt:
        print(f"cribo {args.command}: interrupted; checkpoint.pth holds the last saved state", file=sys.stderr)
        code = 130
    except (ValueError, OSError, RuntimeError) as err:
        code = error_exit_code(err)
        if code is None:  # not a user error: a bug, shown in full
            raise
        if args.verbose:
            traceback.print_exc()
        print(f"cribo {args.command}: error: {error_line(err)}", file=sys.stderr)
    sys.exit(code)


def error_exit_code(error: BaseException) -> int | None:
    """The exit code of an error the user can fix, else None (a bug: shown with its traceback).

    2: bad input: a ValueError (flag, file content, settings) or an OSError (a missing, unreadable or unwritable
    file; no space left); 3: the loss became non-finite.
    """
    if type(error).__name__ == "NonFiniteLossError":  # by name: cribo.step is not imported before a command runs
        return 3
    if isinstance(error, (ValueError, OSError)):
        return 2
    return None


def error_line(error: BaseException) -> str:
    """One line for the user: ``path: reason`` for a system error, the message itself otherwise."""
    if isinstance(error, OSError) and error.strerror:
        reason = error.strerror[:1].lower() + error.strerror[1:]  # "No such file..." -> "no such file..."
        return f"{error.filename}: {reason}" if error.filename is not None else reason
    text = " ".join(str(error).split())
    return text or type(error).__name__
