"""Smoke tests of the speed and memory benchmarks: each script's --quick mode, run in this process.

The full measurements take minutes and are not tests; the subprocess path (a fresh worker per measurement) is
covered by one slow test.
"""

from __future__ import annotations

import importlib
import math
import os
import subprocess
import sys
import types
from pathlib import Path
from types import ModuleType

import pytest
import torch

BENCH_DIR = Path(__file__).resolve().parents[1] / "benchmarks"
# Smoke runs measure nothing: one thread keeps them fast on a shared 2-core machine (no OpenMP contention).
ONE_THREAD = ("--threads", "1")


@pytest.fixture
def bench(monkeypatch: pytest.MonkeyPatch) -> object:
    """Import a benchmark module by name, with ``benchmarks/`` on the path."""
    monkeypatch.syspath_prepend(str(BENCH_DIR))

    def load(name: str) -> ModuleType:
        return importlib.import_module(name)

    return load


def test_common_helpers(bench) -> None:
    common = bench("common")
    assert common.loglog_slope([1, 2, 4, 8], [3, 12, 48, 192]) == pytest.approx(2.0)
    assert math.isnan(common.loglog_slope([1], [1]))
    assert common.median([3.0, 1.0, 2.0]) == 2.0
    table = common.markdown_table(["a", "b"], [[1, 2]])
    assert table.splitlines()[0] == "| a | b |" and table.splitlines()[2] == "| 1 | 2 |"
    info = common.machine_info(2)
    assert {"cpu", "cores", "torch", "threads", "date", "load_average", "commit"} <= info.keys()


def test_peak_rise_sees_an_allocation() -> None:
    # In a fresh process: training in this one may have told malloc to keep freed memory for reuse.
    script = (
        "import sys, torch; sys.path.insert(0, sys.argv[1]); import common\n"
        "with common.PeakRise() as rise:\n"
        "    block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched\n"
        "    del block\n"
        "print(rise.exact, rise.rise_mib)\n"
    )
    out = subprocess.run([sys.executable, "-c", script, str(BENCH_DIR)], capture_output=True, text=True, check=True)
    exact, rise_mib = out.stdout.split()
    if exact == "True":
        assert 48 < float(rise_mib) < 200


def test_step_quick(bench, tmp_path: Path) -> None:
    bench_step = bench("bench_step")
    assert bench_step.main(["--quick", "--in-process", *ONE_THREAD, "--output-dir", str(tmp_path)]) == 0
    text = (tmp_path / "bench_step.md").read_text()
    assert "| tiny |" in text and "DINO" in text and "Load average" in text and "Compute bound" in text
    for phase in bench_step.AUTHOR_PHASES:
        assert phase in text


def test_compute_bound_uses_the_goal_and_the_measured_rate(bench) -> None:
    bench_step = bench("bench_step")
    account = bench_step.flop_account(bench_step.SETTINGS["C"], objects=100.0, neighbours=50.0)
    more = bench_step.flop_account(bench_step.SETTINGS["C"], objects=100.0, neighbours=150.0)
    assert more["teacher backbone"] == account["teacher backbone"]
    key = next(k for k in account if k.startswith("object heads"))
    assert more[key] > account[key]  # the teacher's head sees the used neighbours only
    total = sum(account.values())
    run = {"seconds": 4.0, "gemm_gflops": 150.0, "objects": 100.0, "cycle_consistent": 50.0}
    floor = {"seconds": 2.0, "gemm_gflops": 150.0}
    _title, table, text = bench_step.compute_bound({"C": run}, {"C": floor}, bench_step.QUOTED_AUTHORS)
    goal = bench_step.QUOTED_AUTHORS["C"].seconds / bench_step.SPEED_GOALS["C"]
    row = table.splitlines()[2].split(" | ")
    assert row[3] == f"{total / 150.0:.2f}" and row[5].startswith(f"{total / goal:.0f} ")
    assert f"C: the goal needs {100 * total / goal / 150:.0f} %" in text


def test_step_rounds_report_the_median_round_and_every_round(bench, tmp_path: Path) -> None:
    bench_step = bench("bench_step")
    rounds = [{"seconds": 3.0, "tag": "a"}, {"seconds": 1.0, "tag": "b"}, {"seconds": 2.0, "tag": "c"}]
    median = bench_step.median_round(rounds)
    assert median["tag"] == "c" and median["round_seconds"] == [3.0, 1.0, 2.0]
    assert bench_step.median_round(rounds[:2])["tag"] == "b"  # even count: the lower middle round
    args = ["--quick", "--in-process", "--rounds", "2", *ONE_THREAD, "--output-dir", str(tmp_path)]
    assert bench_step.main(args) == 0
    text = (tmp_path / "bench_step.md").read_text()
    assert "2 interleaved rounds" in text
    row = next(line for line in text.splitlines() if line.startswith("| tiny | vit_tiny"))
    assert row.split(" | ")[2].count(" / ") == 1  # both rounds' seconds per step
    with pytest.raises(SystemExit):
        bench_step.main(["--quick", "--rounds", "0", "--output-dir", str(tmp_path)])


def test_step_phase_map_covers_every_lap(bench) -> None:
    bench_step = bench("bench_step")
    mapped = [lap for laps in bench_step.PHASE_MAP.values() for lap in laps]
    assert sorted(mapped) == sorted(bench_step.fine_phases())


def test_parts_quick(bench, tmp_path: Path) -> None:
    bench_parts = bench("bench_parts")
    assert bench_parts.main(["--quick", "--in-process", *ONE_THREAD, "--output-dir", str(tmp_path)]) == 0
    text = (tmp_path / "bench_parts.md").read_text()
    assert "clustering" in text and "bank search + update" in text and "colour=False" in text


def test_parts_alternatives_quick(bench, tmp_path: Path) -> None:
    bench_parts = bench("bench_parts")
    argv = ["--alternatives", "--quick", "--in-process", *ONE_THREAD, "--output-dir", str(tmp_path)]
    assert bench_parts.main(argv) == 0
    text = (tmp_path / "bench_parts_alternatives.md").read_text()
    assert "torchvision / ours" in text and "timm / ours" in text and "SampleDropBlock" in text


def test_scaling_quick(bench, tmp_path: Path) -> None:
    bench_scaling = bench("bench_scaling")
    assert bench_scaling.main(["--quick", "--in-process", *ONE_THREAD, "--output-dir", str(tmp_path)]) == 0
    text = (tmp_path / "bench_scaling.md").read_text()
    assert "measured exponent" in text
    for sweep in bench_scaling.SWEEPS:
        assert (tmp_path / f"scaling_{sweep.name}.png").stat().st_size > 0


def test_gpu_script_quick_on_cpu(bench, tmp_path: Path) -> None:
    bench_gpu = bench("bench_gpu")
    assert bench_gpu.main(["--device", "cpu", "--quick", *ONE_THREAD, "--output-dir", str(tmp_path)]) == 0
    text = (tmp_path / "bench_gpu.md").read_text()
    assert "tiny-bf16" in text and "Parts on the device" in text


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the section written when CUDA is absent")
def test_gpu_script_without_cuda_says_so(bench, tmp_path: Path) -> None:
    bench_gpu = bench("bench_gpu")
    assert bench_gpu.main(["--output-dir", str(tmp_path)]) == 0
    assert "no GPU was available" in (tmp_path / "bench_gpu.md").read_text()


def test_report_orders_sections_and_rewrites_links(bench, tmp_path: Path) -> None:
    report = bench("report")
    results = tmp_path / "benchmarks" / "results"
    results.mkdir(parents=True)
    (results / "zzz_other.md").write_text("## Other\n\nbody\n")
    (results / "bench_parts.md").write_text("## Parts alone (CPU)\n\nparts\n")
    (results / "bench_step.md").write_text("## One training step (CPU)\n\n![plot](scaling_batch.png)\n")
    output = report.assemble(results, tmp_path / "BENCHMARKS.md")
    text = output.read_text()
    assert text.index("## One training step") < text.index("## Parts alone") < text.index("## Other")
    assert "](benchmarks/results/scaling_batch.png)" in text
    assert "`python benchmarks/bench_scaling.py`" in text  # missing speed section is listed


@pytest.mark.slow
def test_step_quick_in_fresh_subprocesses(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(BENCH_DIR / "bench_step.py"), "--quick", "--output-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONPATH": str(BENCH_DIR.parent / "src")},
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "fresh subprocess" in (tmp_path / "bench_step.md").read_text()


def test_instrumented_step_matches_train_step(bench) -> None:
    """The timed step is the library's step: same weights, centres and bank afterwards; a lap at every phase."""
    bench_step = bench("bench_step")
    from cribo.step import PHASES, train_step

    setting = bench_step.QUICK_SETTINGS["tiny"]
    batch = bench_step.random_batch(setting, seed=3)
    trainers = [bench_step.build_step_trainer(setting, "cpu", 1) for _ in range(2)]
    torch.manual_seed(11)
    train_step(trainers[0].modules, trainers[0].settings, batch, trainers[0].values())
    torch.manual_seed(11)
    clock = bench_step.common.PhaseClock()
    bench_step.step(trainers[1], batch, clock)
    assert list(clock.phases) == list(PHASES) == list(bench_step.fine_phases())
    for kind in ("student", "teacher", "criterion", "bank"):
        expected = getattr(trainers[0].modules, kind).state_dict()
        for name, value in getattr(trainers[1].modules, kind).state_dict().items():
            torch.testing.assert_close(value, expected[name], rtol=0, atol=0, msg=f"{kind}.{name}")


def test_side_by_side_ratios_come_from_the_same_round(bench) -> None:
    bench_step = bench("bench_step")
    authors = bench_step.AuthorsStep(4.0, 4000.0, (1.0,) * 6, rounds=(2.8, 4.0, 6.0), measured=True)
    assert bench_step.round_ratios(authors, [2.0, 2.0, 2.0]) == pytest.approx([1.4, 2.0, 3.0])
    quoted = bench_step.QUOTED_AUTHORS["C"]
    assert bench_step.round_ratios(quoted, [1.0, 2.0]) == pytest.approx([3.57, 1.785])
    ours = {"seconds": 2.0, "round_seconds": [2.0, 2.0, 2.0], "peak_rss_mib": 3000.0}
    table = bench_step.summary_table({"C": ours}, {"C": authors})
    assert "met in 2 of 3 rounds" in table and "2.800 / 4.000 / 6.000" in table and "(1.40 / 2.00 / 3.00)" in table
    assert "quoted s / step (another run" in table  # the quoted figure only as a labelled secondary column


def test_official_step_reads_the_shared_harness(bench, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bench_step = bench("bench_step")
    phases = {name: 0.1 * (index + 1) for index, name in enumerate(bench_step.HARNESS_PHASES)}
    result = {
        "median_s": 3.5,
        "peak_rss_MB": 4100.0,
        "breakdown_median_s": phases,
        "cpu_user_s_per_iter": 6.0,
        "cpu_sys_s_per_iter": 1.0,
    }
    fake = tmp_path / "bench.py"
    fake.write_text(
        "import json, sys\n"
        "assert sys.argv[1:3] == ['--official', sys.argv[2]] and 'step' in sys.argv and 'C' in sys.argv\n"
        "print('noise')\n"
        f"print('RESULT ' + json.dumps({result!r}))\n"
    )
    monkeypatch.setenv("CRIBO_REFHARNESS", str(fake))
    args = types.SimpleNamespace(repeat=5, warmup=2, official=tmp_path, threads=2)
    measured = bench_step.official_step("C", args)
    assert measured["seconds"] == 3.5 and measured["peak_rss_mib"] == 4100.0
    assert measured["split"] == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.5, 0.6])
    step = bench_step.measured_authors([measured, {**measured, "seconds": 3.0}, {**measured, "seconds": 4.0}])
    assert step.measured and step.rounds == (3.5, 3.0, 4.0) and step.seconds == 3.5
    fake.write_text("import sys\nsys.exit(3)\n")
    with pytest.raises(RuntimeError, match="harness failed"):
        bench_step.official_step("C", args)


def test_parts_side_by_side_ratios_and_goals(bench, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bench_parts = bench("bench_parts")
    fake = tmp_path / "bench.py"
    fake.write_text(
        "import json, sys\n"
        "part = sys.argv[-1]\n"
        "out = {'cluster': {'median_s': 1.4, 'peak_rss_increase_MB': 700.0},\n"
        "       'nn': {'median_s': 9.0, 'peak_rss_increase_during_call_MB': 6000.0},\n"
        "       'aug': {'per_image_ms_median': 7.0, 'construct_peak_rss_increase_MB': 3000.0}}[part]\n"
        "print('RESULT ' + json.dumps(out))\n"
    )
    monkeypatch.setenv("CRIBO_REFHARNESS", str(fake))
    args = types.SimpleNamespace(official=tmp_path, threads=2)
    theirs = {what: [bench_parts.official_part(what, args)] for _, what, _, _ in bench_parts.OFFICIAL_PARTS}
    assert theirs["aug"][0]["seconds"] == pytest.approx(7e-3) and theirs["nn"][0]["rise_mib"] == 6000.0
    ours = {
        "clustering": [{"seconds": 0.1, "rise_mib": 30.0}],  # 14x: goal 7x met
        "bank_uniform": [{"seconds": 3.0, "rise_mib": 50.0}],  # 3x: goal 4.4x missed
        "augment colour": [{"seconds": 2e-3, "rise_mib": 1.0}],  # 3.5x: goal 3.03x met
    }
    table = bench_parts.side_by_side_table(ours, theirs).splitlines()
    assert "14.00×" in table[2] and "**pass** (met in 1 of 1 rounds)" in table[2]
    assert "3.00×" in table[3] and "**FAIL**" in table[3]
    assert "3.50×" in table[4] and "**pass**" in table[4]
