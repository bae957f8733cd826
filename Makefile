# One entry point: `make demo` (set up + pretrain the tiny preset on the built-in scenes)
# and `make test` (set up + run the test suite). Everything installs into ./.venv.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# These two pins match the wheels on local disk of the project machines (DESIGN.md §6);
# the package itself only asks for ranges (pyproject.toml).
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1

.PHONY: setup demo test test-slow lint format bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_PINS)
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(VENV)/bin/cribo demo

test: setup
	$(PY) -m pytest -q

test-slow: setup
	$(PY) -m pytest -q --runslow -m slow

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks
	$(VENV)/bin/mypy

format: setup
	$(VENV)/bin/ruff check --fix src tests benchmarks
	$(VENV)/bin/ruff format src tests benchmarks

bench: setup
	PYTHONPATH=src $(PY) benchmarks/bench_parts.py
	PYTHONPATH=src $(PY) benchmarks/bench_step.py --rounds 3  # side by side with the authors' code when CRIBO_OFFICIAL_DIR is set
	PYTHONPATH=src $(PY) benchmarks/bench_scaling.py
	PYTHONPATH=src $(PY) benchmarks/bench_scenes.py
	PYTHONPATH=src $(PY) benchmarks/bench_regression.py
	PYTHONPATH=src $(PY) benchmarks/bench_ablation.py
	$(PY) benchmarks/report.py

clean:
	rm -rf $(VENV) runs .pytest_cache .mypy_cache .ruff_cache
