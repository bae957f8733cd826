"""The installed libraries meet the bounds pyproject.toml declares, and the timm API the models call exists.

timm's lower bound is the first release whose ViT ``Attention.forward`` takes ``is_causal`` (``SampleDropBlock``
passes it on); older releases fail there, and before that on ``Block.forward(attn_mask=...)`` and on building a
ViT on the meta device (``cribo.models._backbone_to_load``). The bound was found by running the suite against
each candidate release in a scratch environment: 1.0.25 fails, 1.0.26 passes.
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest
import timm
from packaging.version import Version
from timm.models.vision_transformer import Attention, Block, VisionTransformer

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def declared_lower_bound(package: str) -> Version:
    """The ``>=`` bound of ``package`` in pyproject.toml's dependencies."""
    found = re.search(rf'^\s*"{re.escape(package)}>=([0-9][0-9.]*)"', PYPROJECT.read_text(), re.MULTILINE)
    if found is None:
        pytest.fail(f"pyproject.toml declares no {package}>= bound")
    return Version(found.group(1))


def test_installed_timm_meets_the_declared_bound() -> None:
    assert Version(timm.__version__) >= declared_lower_bound("timm")


def test_timm_declares_the_keywords_our_block_passes_on() -> None:
    # SampleDropBlock.forward(x, attn_mask, is_causal) calls Block.forward(x, attn_mask=, is_causal=) and
    # Attention.forward(x, is_causal=) (cribo.models).
    assert {"attn_mask", "is_causal"} <= set(inspect.signature(Block.forward).parameters)
    assert "is_causal" in inspect.signature(Attention.forward).parameters
    assert {"block_fn", "dynamic_img_size", "drop_path_rate"} <= set(inspect.signature(VisionTransformer).parameters)
