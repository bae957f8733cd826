"""Shared test fixtures: the authors' reference folder, the --runslow switch, deterministic threads."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

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
