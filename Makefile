# The two set-up commands of README.md. Each creates .venv (if missing), installs the package
# with everything it needs, then runs: `make quickstart` the end-to-end job on the embedded
# default (real small model + real sample data), `make test` the test suite.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: quickstart test test-spark test-bench test-shuffled install clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

quickstart: $(STAMP)
	PATH="$(abspath $(BIN)):$$PATH" bash scripts/quickstart.sh

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

# Conversion on a local Spark (tests/data/test_spark.py; needs `java`): CI runs it after `make test`
test-spark: $(STAMP)
	$(BIN)/python -m pytest -q -m spark tests/data/test_spark.py

# Every scripts/bench_*.py on its smallest configuration (tests/test_bench_*.py): CI runs it after `make test`
test-bench: $(STAMP)
	$(BIN)/python -m pytest -q -m bench tests/test_bench_scripts.py tests/test_bench_memory.py

# The suite in a random order (modules shuffled, and the tests in each): no test may rely on what
# an earlier one left behind. The seed is printed first; `make test-shuffled SEED=N` reruns that order.
ifndef SEED
SEED := $(shell od -An -N4 -tu4 /dev/urandom | tr -d ' ')
endif
test-shuffled: $(STAMP)
	@echo "random order seed: $(SEED)"
	$(BIN)/python -m pytest -q tests --random-order-seed=$(SEED)

clean:
	rm -rf $(VENV) runs
