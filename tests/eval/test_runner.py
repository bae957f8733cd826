"""Command-level runs on the built-in scenes: JSON result files, tables, cache, and the argparse builder."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from eval_helpers import tiny_vit

from cribo.eval.commands import add_eval_parser
from cribo.eval.options import FinetuneEvalOptions, LinearEvalOptions, NNEvalOptions, parse_fraction
from cribo.eval.runner import run_finetune, run_linear, run_nn
from cribo.options import options_from_args, resolve_input_size

SCENES: dict[str, Any] = {"scenes_train_images": 6, "scenes_val_images": 3, "scenes_image_size": 32, "progress": False}


def injected() -> tuple[torch.nn.Module, Any]:
    return tiny_vit(), {"note": "tiny test ViT"}


def test_run_nn_writes_json_and_table_and_uses_the_cache(tmp_path: Path) -> None:
    options = NNEvalOptions(
        backbone="tiny",
        output=str(tmp_path / "nn.json"),
        cache_dir=str(tmp_path / "cache"),
        fractions=(0.5, 1.0),
        seeds=(0, 1),
        **SCENES,
    )
    report = run_nn(options, backbone=injected())
    payload = json.loads(report.path.read_text())
    assert report.path == tmp_path / "nn.json"
    for key in ("miou", "miou_all_classes", "per_class_iou", "miou_averaged_over", "config", "backbone", "timing"):
        assert key in payload
    assert payload["config"]["fractions"] == [0.5, 1.0] and payload["matching"] == "none"
    assert len(payload["runs"]) == 4 and [row["train_images"] for row in payload["summary"]] == [3, 6]
    assert len(payload["backbone"]["state_dict_sha256"]) == 64 and payload["search"] == "faiss"
    assert "classes present in the validation ground truth" in payload["miou_averaged_over"]
    assert "mIoU" in report.table and "background" in report.table and str(report.path) in report.table
    again = run_nn(options, backbone=injected())
    assert again.payload["timing"]["cache_hits"] == 4  # queries + three banks (fraction 1: one bank for all seeds)
    assert again.payload["miou"] == payload["miou"]


def test_run_linear_and_finetune(tmp_path: Path) -> None:
    linear = run_linear(
        LinearEvalOptions(backbone="tiny", output=str(tmp_path), steps=5, layers=2, **SCENES), backbone=injected()
    )
    assert linear.path.parent == tmp_path and linear.path.name.startswith("linear_scenes_")
    assert 0.0 <= linear.payload["miou"] <= 1.0 and linear.payload["train_samples"] == 6
    finetune = run_finetune(
        FinetuneEvalOptions(
            backbone="tiny",
            output=str(tmp_path / "ft.json"),
            steps=2,
            train_batch_size=2,
            decoder="mask_transformer",
            decoder_dim=32,
            frozen_blocks=1,
            **SCENES,
        ),
        backbone=injected(),
    )
    payload = json.loads(finetune.path.read_text())
    assert payload["config"]["decoder"] == "mask_transformer" and payload["trainable_backbone_parameters"] > 0
    assert set(payload["per_class_iou"]) == set(payload["dataset"]["class_names"])


def test_input_size_rules() -> None:
    assert resolve_input_size(NNEvalOptions(dataset="voc"), 16) == 512
    assert resolve_input_size(NNEvalOptions(dataset="voc"), 14) == 504  # the protocol's /14 size
    assert resolve_input_size(NNEvalOptions(scenes_image_size=100), 16) == 96
    with pytest.raises(ValueError, match="multiple of the patch"):
        resolve_input_size(NNEvalOptions(input_size=100), 16)
    with pytest.raises(ValueError, match="backbone is required"):
        run_nn(NNEvalOptions(**SCENES))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cribo")
    commands = parser.add_subparsers(dest="command", required=True)
    add_eval_parser(commands)
    return parser


def test_flags_map_one_to_one_onto_the_options() -> None:
    args = build_parser().parse_args(
        [
            "eval",
            "nn",
            "--backbone",
            "runs/demo/checkpoint.pth",
            "--fractions",
            "1/128",
            "1/8",
            "1",
            "--seeds",
            "0",
            "1",
            "--bank_cap",
            "1000",
            "--no-progress",
            "--search",
            "faiss-ivf",
            "--hungarian",
        ]
    )
    options = options_from_args(args, NNEvalOptions)
    assert isinstance(options, NNEvalOptions)
    assert options.fractions == (1 / 128, 1 / 8, 1.0) and options.seeds == (0, 1)
    assert options.bank_cap == 1000 and options.progress is False and options.hungarian is True
    assert options.search == "faiss-ivf" and options.k == 30 and options.temperature == 0.02
    with pytest.raises(SystemExit):
        build_parser().parse_args(["eval", "linear", "--backbone", "x", "--eval-mode", "tiles"])
    with pytest.raises(argparse.ArgumentTypeError):
        parse_fraction("2")


def test_cli_end_to_end_with_a_random_backbone(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = build_parser().parse_args(
        [
            "eval",
            "nn",
            "--backbone",
            "random:vit_tiny",
            "--scenes-train-images",
            "4",
            "--scenes-val-images",
            "2",
            "--scenes-image-size",
            "32",
            "--output",
            str(tmp_path / "r.json"),
            "--no-progress",
        ]
    )
    assert args.func(args) == 0
    assert "mIoU" in capsys.readouterr().out
    payload = json.loads((tmp_path / "r.json").read_text())
    assert payload["backbone"]["info"]["source"] == "random" and payload["input_size"] == 32
