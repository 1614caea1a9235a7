# The project's commands. Each one sets up the environment it needs (a .venv in the repository,
# ignored by git) on its first run, and reuses it afterwards.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.skysense-installed
PIP := $(BIN)/python -m pip --disable-pip-version-check
DEPS := constraints.txt pyproject.toml kernels/pyproject.toml kernels/setup.py \
        $(wildcard kernels/csrc/*.cpp kernels/csrc/*.h) $(wildcard packages/*/pyproject.toml)
# Extra arguments: `make pretrain ARGS="trainer.max_steps=50"`, `make test PYTEST_ARGS="-k swin"`.
ARGS ?=
PYTEST_ARGS ?=

# The reference tier's OpenMMLab packages (tests/reference/requirements.txt), in a --target
# folder of their own so that .venv's pins stay as they are.
REF := .venv-ref
REF_STAMP := $(REF)/.installed

.PHONY: setup pretrain test lint format bench bench-busy bench-quick clean reference

setup: $(STAMP)

$(STAMP): $(DEPS)
	@echo "skysense: setting up $(VENV) (the first run installs torch and friends: a few minutes)"
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(PIP) install -q -c constraints.txt setuptools wheel pybind11
	@$(PIP) install -q -c constraints.txt --no-build-isolation --config-settings editable_mode=compat \
	    -e ./kernels -e ./packages/encoders -e ./packages/losses -e "./packages/data[dali,scale]" \
	    -e "./packages/tasks[bench,onnx]" -e ".[dev]"
	@touch $@
	@echo "skysense: $(VENV) ready"

reference: $(REF_STAMP)

$(REF_STAMP): tests/reference/requirements.txt | $(STAMP)
	@echo "skysense: installing the reference packages into $(REF) (no deps, a few seconds)"
	@rm -rf $(REF)
	@if $(PIP) install -q --no-deps --target $(REF) -r tests/reference/requirements.txt; then \
	    touch $@; \
	else \
	    rm -rf $(REF); \
	    echo "skysense: WARNING: the reference packages did not install (see above): the reference tier skips"; \
	fi

# A second `make pretrain` continues the run in runs/pretrain (resume=true), or reports it
# finished; it never overwrites a checkpoint (overwrite=true in ARGS does, on purpose).
pretrain: $(STAMP)
	$(BIN)/skysense pretrain $(if $(findstring resume=,$(ARGS))$(findstring overwrite=,$(ARGS)),,resume=true) $(ARGS)

# Pre-training on the real samples of ../shared/data on a small machine (recipe=cpu_real, about
# 35 min on 2 CPU cores): stage the unlabelled samples (SKYSENSE_SHARED_DATA overrides the
# folder; stops naming it where absent), ingest them into $(REAL_DATA)/shards (resumable: a
# second call finds the ingest done), then pre-train in runs/pretrain-real; a second call
# continues the run or reports it finished, never overwriting a checkpoint.
REAL_DATA ?= $(or $(SKYSENSE_REAL_DATA),data/real)

.PHONY: pretrain-real
pretrain-real: $(STAMP)
	$(BIN)/python -m skysense.tasks.stage_shared $(REAL_DATA)/src
	$(BIN)/skysense ingest $(REAL_DATA)/src $(REAL_DATA)/shards missing_bands=fill val_fraction=0 plots=0
	SKYSENSE_REAL_DATA=$(REAL_DATA) $(BIN)/skysense pretrain recipe=cpu_real $(if $(findstring resume=,$(ARGS))$(findstring overwrite=,$(ARGS)),,resume=true) $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

test: $(STAMP) $(REF_STAMP) lint
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: $(STAMP)
	-@bench/peers/setup.sh  # TorchGeo, TerraTorch in .venv-peers*; a failure: "peer absent"
	$(BIN)/skysense bench $(ARGS)

bench-busy: $(STAMP)  # the guard under load: the other core busy for the whole suite
	-@bench/peers/setup.sh
	$(BIN)/skysense bench busy=true $(ARGS)

bench-quick: $(STAMP)
	$(BIN)/skysense bench mode=quick $(ARGS)

clean:
	rm -rf $(VENV) $(REF) build kernels/build .pytest_cache .ruff_cache
	find . -name '*.so' -path '*skysense*' -delete
