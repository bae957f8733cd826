"""Shared test fixtures: the authors' reference folder, the --runslow switch, deterministic threads."""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor

from cribo.config import TrainConfig
from cribo.hub import load_network_state
from cribo.models import CrIBoNetwork, ProjectionHead, create_backbone, set_fused_attention

REPO_ROOT = Path(__file__).resolve().parents[1]


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--runslow", action="store_true", default=False, help="run tests marked slow")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--runslow"):
        return
    skip_slow = pytest.mark.skip(reason="slow: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip_slow)


@pytest.fixture(autouse=True)
def _torch_defaults() -> None:
    torch.set_num_threads(min(2, os.cpu_count() or 1))


def reference_dir() -> Path:
    """The fixture folder: $CRIBO_REFERENCE_DIR or ../shared/reference next to the repository."""
    configured = os.environ.get("CRIBO_REFERENCE_DIR")
    return Path(configured) if configured else REPO_ROOT.parent / "shared" / "reference"


@pytest.fixture(scope="session")
def reference() -> Path:
    """Path of the reference folder; a missing folder fails (parity tests are never skipped)."""
    path = reference_dir()
    if not path.is_dir():
        pytest.fail(f"reference fixtures not found at {path}; set CRIBO_REFERENCE_DIR to the folder holding them")
    return path


def load_fixture(reference: Path, name: str) -> dict:
    """Load one fixture file with the safe loader."""
    path = reference / name
    if not path.is_file():
        pytest.fail(f"reference fixture {path} is missing")
    return torch.load(path, weights_only=True, map_location="cpu")


CHECKPOINT = "checkpoint_vit_tiny.pth"
WHICH = ("teacher", "student")


# ----------------------------------------------------------------------------------------------------------------
# The authors' checkpoint and backbone fixture, read once per module (test_models.py, test_hub.py)


@pytest.fixture(scope="module")
def fixture(reference: Path) -> dict[str, Any]:
    return torch.load(reference / "backbone.pt", weights_only=True, map_location="cpu")


@pytest.fixture(scope="module")
def checkpoint(reference: Path) -> dict[str, Any]:
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(reference / CHECKPOINT, weights_only=True, map_location="cpu")


@pytest.fixture(scope="module")
def networks(fixture: dict[str, Any], checkpoint: dict[str, Any]) -> dict[str, CrIBoNetwork]:
    """The authors' teacher and student: architecture from backbone.pt, head sizes and flags from the checkpoint.

    Built on the meta device (every tensor is then loaded, so a random init would be wasted time).
    """
    shapes = fixture["teacher_state_dict_shapes"]
    out_dim, bottleneck_dim = shapes["head.last_layer.weight_v"]
    built = {}
    for which, norm_last_layer in zip(WHICH, (True, checkpoint["args"].norm_last_layer)):
        with torch.device("meta"):
            backbone = create_backbone(fixture["arch"], fixture["patch_size"])
            head = ProjectionHead(
                fixture["embed_dim"],
                out_dim,
                shapes["head.last_layer_c.weight_v"][0],
                hidden_dim=shapes["head.mlp.0.weight"][0],
                bottleneck_dim=bottleneck_dim,
                norm_last_layer=norm_last_layer,
            )
        network = CrIBoNetwork(backbone, head).to_empty(device="cpu").eval()
        load_network_state(network, checkpoint[which])
        built[which] = network
    return built


@pytest.fixture(scope="module")
def network(networks: dict[str, CrIBoNetwork]) -> CrIBoNetwork:
    """The teacher (tests must not change its weights)."""
    return networks["teacher"]


@pytest.fixture(scope="module")
def backbone_state(checkpoint: dict[str, Any]) -> dict[str, Tensor]:
    """The checkpoint teacher's backbone tensors under timm's names."""
    prefix = "backbone."
    return {k[len(prefix) :]: v for k, v in checkpoint["teacher"].items() if k.startswith(prefix)}


@pytest.fixture
def fused_restored(networks: dict[str, CrIBoNetwork]) -> Iterator[dict[str, CrIBoNetwork]]:
    yield networks
    for network in networks.values():
        set_fused_attention(network, True)


def assert_state_equal(module: torch.nn.Module, expected: dict[str, Tensor]) -> None:
    """``module``'s state dict has exactly the keys of ``expected``, with equal tensors."""
    state = module.state_dict()
    assert set(state) == set(expected)
    for key, value in expected.items():
        assert torch.equal(state[key], value), key


# A seconds-long training run: 2-block ViT-Tiny/8 on 32-px views of the built-in scenes, 4 steps of 4 images per
# epoch, CPU, fp32, a log line every step (test_train.py, test_failures.py, test_init.py).
TINY_RUN: dict[str, Any] = {
    "arch": "vit_tiny",
    "patch_size": 8,
    "depth": 2,
    "out_dim": 64,
    "out_dim_c": 64,
    "image_size": 32,
    "scenes_num_images": 16,
    "scenes_image_size": 48,
    "num_workers": 0,
    "n_tokens": 4,
    "queue_size": 12,
    "epochs": 2,
    "batch_size_per_gpu": 4,
    "warmup_epochs": 1,
    "warmup_teacher_temp_epochs": 1,
    "device": "cpu",
    "precision": "fp32",
    "log_every": 1,
    "checkpoint_every": 0,
    "saveckp_freq": 0,
}


def tiny_config(output_dir: Path, **extra: Any) -> TrainConfig:
    """:data:`TINY_RUN` writing to ``output_dir``, with ``extra`` overrides."""
    from cribo import config as config_lib

    return config_lib.resolve(overrides={**TINY_RUN, "output_dir": str(output_dir), **extra})


def dense_nearest_neighbours(
    queries: Tensor, keys: Tensor, key_mask: Tensor | None = None, normalize_keys: bool = True
) -> tuple[Tensor, Tensor]:
    """Reference: the full (n, M) float32 similarity matrix, masked, then argmax (first index on ties)."""
    unit_queries = torch.nn.functional.normalize(queries.float(), dim=1)
    unit_keys = torch.nn.functional.normalize(keys.float(), dim=1) if normalize_keys else keys.float()
    if key_mask is None:
        key_mask = torch.ones(keys.shape[0], dtype=torch.bool)
    if not bool(key_mask.any()):
        return torch.full((queries.shape[0],), -math.inf), torch.full((queries.shape[0],), -1)
    similarity = (unit_queries @ unit_keys.T).masked_fill(~key_mask, -math.inf)
    return similarity.max(dim=1)
