# The two commands of the README:  `make demo`  and  `make test` (ruff lint + format check, then pytest).
# Both create the virtual environment (.venv) and install certbnn into it first.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# Data: an explicit CERTBNN_DATA wins; otherwise use ../shared/data when it exists (this project's machines).
CERTBNN_DATA ?= $(if $(wildcard ../shared/data),$(abspath ../shared/data),)
export CERTBNN_DATA

.PHONY: setup demo test lint format test-slow data bench clean

$(BIN)/certbnn: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -c constraints.txt setuptools torch
	$(BIN)/python -m pip install --quiet -c constraints.txt --no-build-isolation -e '.[test]'
	touch $@

setup: $(BIN)/certbnn data

# Fashion-MNIST comes from Debian's package when apt is usable (root); skipped silently otherwise.
data:
	@if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	  apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 || echo "note: apt-get install dataset-fashion-mnist failed; Fashion-MNIST tests will be skipped"; fi

demo: setup
	$(BIN)/certbnn demo --out runs/demo

test: setup lint
	$(BIN)/python -m pytest -q --durations=15

# ruff (rules in pyproject.toml): lint and format check; `make format` rewrites the files.
lint: $(BIN)/certbnn
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(BIN)/certbnn
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

test-slow: setup
	$(BIN)/python -m pytest -q -m slow

bench: setup
	$(BIN)/python benchmarks/bounds_bench.py

clean:
	rm -rf $(VENV) src/*.egg-info .pytest_cache
