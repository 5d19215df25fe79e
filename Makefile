# Quick start: `make demo` trains + evaluates on the embedded synthetic set; `make test` runs the suite.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint format bench gpu-check clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# exact torch first: the offline CPU build; a looser spec would pull CUDA wheels
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/reidkit demo

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

lint: $(STAMP)
	$(BIN)/ruff check reidkit tests benchmarks
	$(BIN)/ruff format --check reidkit tests benchmarks

format: $(STAMP)
	$(BIN)/ruff format reidkit tests benchmarks
	$(BIN)/ruff check --fix reidkit tests benchmarks

bench: $(STAMP)
	for f in benchmarks/bench_*.py; do $(BIN)/python $$f || exit 1; done

# on a GPU machine: CUDA tests, AMP steps, training / loader benchmarks -> gpu_check.json
gpu-check:
	bash benchmarks/gpu_check.sh

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
