"""``cribo eval nn|linear|finetune``: one sub-command per evaluation, its flags derived from its options class
(:mod:`cribo.eval.options`, through :mod:`cribo.options`). Each sub-command's ``func`` runs the evaluation,
writes the table to stdout and returns the exit code 0.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

from cribo.eval.options import EvalOptions, FinetuneEvalOptions, LinearEvalOptions, NNEvalOptions
from cribo.eval.runner import EvalReport, run_finetune, run_linear, run_nn
from cribo.options import add_command

if TYPE_CHECKING:
    import argparse

    from cribo.options import SubParsers

EvalOptionsT = TypeVar("EvalOptionsT", bound=EvalOptions)
HELP = {
    "nn": "dense nearest-neighbour retrieval (in-context segmentation) mIoU",
    "linear": "linear segmentation on the frozen backbone's patch tokens",
    "finetune": "fine-tune backbone + linear / mask-transformer decoder",
}


def _printing(run: Callable[[EvalOptionsT], EvalReport]) -> Callable[[EvalOptionsT], int]:
    """``run`` followed by writing its table to stdout; exit code 0."""

    def command(options: EvalOptionsT) -> int:
        sys.stdout.write(run(options).table + "\n")
        return 0

    return command


def _add_evaluation(
    evaluations: SubParsers, name: str, options_type: type[EvalOptionsT], run: Callable[[EvalOptionsT], EvalReport]
) -> None:
    description = f"cribo eval {name}: {HELP[name]} (see PROTOCOLS.md); results go to a JSON file."
    add_command(evaluations, name, options_type, _printing(run), HELP[name], description)


def add_eval_parser(commands: SubParsers) -> argparse.ArgumentParser:
    """Add ``eval`` with the sub-commands ``nn``, ``linear``, ``finetune`` to ``commands``."""
    parser = commands.add_parser("eval", help="evaluate a backbone: nn retrieval, linear segmentation, fine-tuning")
    evaluations = parser.add_subparsers(dest="eval_command", required=True)
    _add_evaluation(evaluations, "nn", NNEvalOptions, run_nn)
    _add_evaluation(evaluations, "linear", LinearEvalOptions, run_linear)
    _add_evaluation(evaluations, "finetune", FinetuneEvalOptions, run_finetune)
    return parser
