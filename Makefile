# The two commands a newcomer needs (see README): `make run` and `make test`.
# Both create an isolated virtual environment with the pinned, tested dependencies first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
ARGS ?=

.PHONY: setup run test lint
setup: $(VENV)/.installed

$(VENV)/.installed: requirements.lock pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	@echo "installing the pinned dependencies into $(VENV) (a few minutes the first time)"
	$(BIN)/python -m pip install --progress-bar off -r requirements.lock
	$(BIN)/python -m pip install -q --no-deps -e .
	@# Triton comes with CUDA builds of torch; CPU installs get it so that the tests run ptq's kernels in its interpreter
	$(BIN)/python -c "import triton" 2>/dev/null || $(BIN)/python -m pip install -q --progress-bar off "triton==3.6.0" \
		|| echo "no Triton wheel for this platform: tests/test_kernels.py will be skipped"
	touch $@

run: setup
	$(BIN)/python -m ptq.run $(ARGS)

test: setup
	@# two workers (pytest-xdist): the suite is CPU-bound and its slowest files run side by side on 2 cores; each
	@# worker (and the runs it starts) gets half the cores' threads, since torch would otherwise start one per core
	@# in both and oversubscribe them
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-$$(( ($$(nproc) + 1) / 2 ))} $(BIN)/python -m pytest -q -n 2 --durations=15

lint: setup
	$(BIN)/ruff check ptq tests scripts
	$(BIN)/ruff format --check ptq tests scripts
