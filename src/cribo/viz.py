"""Pictures of what was learned: training curves (more views are registered by ``add_viz_parser``)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

CURVE_KEYS: tuple[tuple[str, str], ...] = (
    ("d_loss", "global cross-view loss"),
    ("s_loss", "object cross-view loss"),
    ("nn_loss", "cross-image loss"),
    ("bootstrap_centroid_ratio", "cycle-consistent fraction"),
    ("r_cnt", "objects per image"),
    ("images_per_s", "images / s"),
)


def plot_training_curves(history: list[dict[str, float]], path: Path) -> Path:
    """Plot the logged terms against the step into a PNG (one panel per term)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(12, 6.5), constrained_layout=True)
    steps = [row["step"] for row in history]
    for ax, (key, title) in zip(axes.flat, CURVE_KEYS):
        values = [row.get(key, float("nan")) for row in history]
        ax.plot(steps, values, marker="." if len(steps) < 60 else None)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.suptitle("cribo training curves")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def load_history(run_dir: Path) -> list[dict[str, float]]:
    """Read log.txt (JSON lines) of a run directory."""
    import json

    log = Path(run_dir) / "log.txt"
    if not log.is_file():
        raise ValueError(f"{log} not found: pass a run directory written by `cribo train`")
    return [json.loads(line) for line in log.read_text().splitlines() if line.strip()]


def command_curves(args: argparse.Namespace) -> int:
    path = plot_training_curves(load_history(Path(args.run_dir)), Path(args.output or Path(args.run_dir) / "curves.png"))
    print(f"wrote {path}")
    return 0


def add_viz_parser(commands: Any) -> None:
    """Register ``cribo viz ...``."""
    viz = commands.add_parser("viz", help="pictures: training curves, clusters, neighbours, PCA, segmentations")
    kinds = viz.add_subparsers(dest="viz_command", required=True)
    curves = kinds.add_parser("curves", help="plot log.txt of a run directory")
    curves.add_argument("run_dir")
    curves.add_argument("--output", help="PNG path (default RUN_DIR/curves.png)")
    curves.set_defaults(func=command_curves)
