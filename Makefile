# Every target creates .venv and installs the package first, so a fresh clone needs only `make demo` / `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export RAY_USAGE_STATS_ENABLED := 0

.PHONY: install demo test test-fast lint docs bench bench-smoke clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# torch/torchvision are pinned to a pair that imports together on CPU-only machines;
# pyproject keeps loose ranges so other pairs work elsewhere.
$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -e ".[dev,serve,tracking,datasets]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/xkd demo

# Two pytest workers (pytest-xdist), each with its own local Ray started on first use; the tests
# that start a cluster of their own run one after another (conftest's OWN_CLUSTER group), and the
# tests that read one costly shared fixture run in one worker (SMOKE_SEARCH, the served student).
test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist loadgroup

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow" -n 2

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

# docs/REGISTRIES.md from the registries and the config schema (tests/test_docs.py keeps it current);
# plugin entries (XKD_PLUGINS) are left out.
docs: $(STAMP)
	env -u XKD_PLUGINS $(BIN)/python docs/registries.py > docs/REGISTRIES.md.tmp
	mv docs/REGISTRIES.md.tmp docs/REGISTRIES.md

# Every figure in the README, in one go (about 1.5 hours on 2 CPU cores).
bench: $(STAMP)
	$(BIN)/python bench/train_overhead.py
	$(BIN)/python bench/explain_cache.py
	$(BIN)/python bench/scaling.py
	$(BIN)/python bench/paper_claim.py --seeds 5
	$(BIN)/python bench/paper_claim.py --seeds 5 --explainer integrated_gradients
	$(BIN)/python bench/search_quality.py
	$(BIN)/python bench/trial_overhead.py --trials 6
	$(BIN)/python bench/search_efficiency.py --budget-minutes 3 --seeds 3
	$(BIN)/python bench/gpu_path.py  # measures the CPU alone where there is no GPU
	$(BIN)/python bench/rung_agreement.py --configs 12
	$(BIN)/python bench/fsync_cost.py --trials 40
	$(BIN)/python bench/data_scale.py --scales 1,4,16 --size 32
	$(BIN)/python bench/data_readers.py --copies 4 --size 32
	$(BIN)/python bench/serve_load.py
	$(BIN)/python bench/faithfulness.py  # with XKD_QUANTUS_PATH=DIR (Quantus installed there) it also compares with Quantus

# Every bench script in its --smoke mode (pyproject's addopts leave these out of `make test`).
bench-smoke: $(STAMP)
	$(BIN)/python -m pytest -q -m bench tests/test_bench_smoke.py

clean:
	rm -rf .xkd_cache .pytest_cache build *.egg-info
