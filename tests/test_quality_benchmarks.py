"""The quality benchmarks (benchmarks/bench_{regression,ablation,scenes}.py): quick modes run end to end, the
statistics helpers, and (slow) the regression benchmark's full expectation check."""

from __future__ import annotations

import importlib
import json
import math
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCH_DIR = Path(__file__).resolve().parents[1] / "benchmarks"


def load(name: str) -> ModuleType:
    """Import a benchmark script as a module (benchmarks/ is a folder of scripts, not a package)."""
    if str(BENCH_DIR) not in sys.path:
        sys.path.insert(0, str(BENCH_DIR))
    return importlib.import_module(name)


# ------------------------------------------------------------------------------------------------ helpers


def test_summary_mean_std_and_t_interval() -> None:
    qc = load("quality_common")
    summary = qc.summarize([1.0, 2.0, 3.0])
    assert summary.mean == pytest.approx(2.0)
    assert summary.std == pytest.approx(1.0)
    assert summary.half_width == pytest.approx(4.303 / math.sqrt(3))
    assert summary.n == 3
    single = qc.summarize([0.5])
    assert single.mean == 0.5 and math.isnan(single.std) and single.text() == "0.500"
    assert qc.summarize([]).n == 0 and qc.summarize([]).text() == "–"
    assert qc.summarize([1.0, float("nan"), 3.0]).n == 2


def test_t_quantile_and_seeds_needed() -> None:
    qc = load("quality_common")
    assert qc.t_quantile(1) == pytest.approx(12.706)
    assert qc.t_quantile(11) == pytest.approx(qc.T_975[10])  # next tabulated df below: conservative
    assert qc.t_quantile(100) == pytest.approx(1.96)
    need = qc.seeds_needed(0.02, 0.01)
    assert qc.t_quantile(need - 1) * 0.02 / math.sqrt(need) < 0.01
    assert qc.t_quantile(need - 2) * 0.02 / math.sqrt(need - 1) >= 0.01


def test_eval_schedule_and_overrides() -> None:
    qc = load("quality_common")
    assert qc.eval_schedule(192, 48) == [48, 96, 144, 192]
    assert qc.eval_schedule(10, 4) == [4, 8, 10]
    assert qc.eval_schedule(10, 0) == [10]
    assert qc.parse_overrides(["lr=1e-3", "loss.teacher_temp = 0.04"]) == {"lr": "1e-3", "loss.teacher_temp": "0.04"}
    with pytest.raises(ValueError, match="FIELD=VALUE"):
        qc.parse_overrides(["lr"])


def test_variants_are_loss_weight_overrides() -> None:
    qc = load("quality_common")
    config = qc.training_config(qc.SCALES["quick"], Path("unused"), 0, "cpu", 1, qc.VARIANTS["dino"].weights)
    assert (config.loss.weight_global, config.loss.weight_object, config.loss.weight_cross_image) == (1.0, 0.0, 0.0)
    cpu = qc.training_config(qc.SCALES["cpu"], Path("unused"), 0, "cpu", 1)
    assert qc.steps_per_run(cpu) == 768 and cpu.model.depth == 4 and cpu.model.patch_size == 8


# ------------------------------------------------------------------------------------------------ quick modes


def test_ablation_quick(tmp_path: Path) -> None:
    ablation = load("bench_ablation")
    results = tmp_path / "results"
    argv = ["--quick", "--seeds", "0", "1", "--runs-dir", str(tmp_path / "runs"), "--results-dir", str(results)]
    assert ablation.main(argv) == 0
    text = (results / "ablation.md").read_text()
    assert "random init" in text and "DINO-only" in text and "CrIBo (full)" in text and "95 % CI" in text
    assert (results / "ablation_curves.png").stat().st_size > 0
    summaries = list((tmp_path / "runs").glob("*/summary.json"))
    assert len(summaries) == 1
    records = json.loads(summaries[0].read_text())
    for seed in (0, 1):  # every variant of a seed starts from the same teacher: identical step-0 scores
        step0 = {records[f"{v}/{seed}"]["evals"]["0"]["nn"]["miou"] for v in ("dino", "no_cross_image", "cribo")}
        assert len(step0) == 1
        assert records[f"cribo/{seed}"]["complete"]
    # a second call reuses the finished runs instead of training again
    assert ablation.main(argv) == 0


def test_scenes_quick(tmp_path: Path) -> None:
    scenes = load("bench_scenes")
    assert scenes.main(["--quick", "--no-linear", "--results-dir", str(tmp_path)]) == 0
    text = (tmp_path / "scenes.md").read_text()
    assert "raw pixels" in text and "random-init ViT" in text and "label oracle" in text


def test_oracle_feature_function_reads_the_labels() -> None:
    qc = load("quality_common")
    scenes = load("bench_scenes")
    data = qc.EvalData.build(qc.SCALES["quick"].evaluation, "cpu")
    oracle = qc.nn_scores(scenes.oracle_features(data, 8), data)
    raw = qc.nn_scores(scenes.raw_pixel_features(8), data)
    assert oracle["miou"] > raw["miou"] + 0.2


def test_regression_quick(tmp_path: Path) -> None:
    regression = load("bench_regression")
    assert regression.main(["--quick", "--results-dir", str(tmp_path)]) == 0
    text = (tmp_path / "regression.md").read_text()
    assert "no NaN / Inf" in text and "cycle-consistent ratio" in text


@pytest.mark.slow
def test_regression_expectations_hold(tmp_path: Path) -> None:
    """The full CPU regression run (a few minutes): every stated expectation is met."""
    regression = load("bench_regression")
    assert regression.main(["--results-dir", str(tmp_path)]) == 0, (tmp_path / "regression.md").read_text()
