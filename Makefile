# Two commands on a fresh machine: `make run` and `make test`.
# Each creates .venv when it is missing and installs what it needs.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

BENCH_STAMP := $(VENV)/.bench-stamp

.PHONY: run test test-compose check lint typecheck imports pytest system-tools bench clean

run: $(STAMP)
	$(BIN)/mtlsproxy quickstart

test: $(STAMP) system-tools check pytest

check: lint typecheck imports

lint: $(STAMP)
	$(BIN)/ruff check mtlsproxy tests tests_compose benchmarks
	$(BIN)/ruff format --check mtlsproxy tests tests_compose benchmarks

typecheck: $(STAMP)
	$(BIN)/mypy

# The floors of docs/architecture.md as import-linter contracts ([tool.importlinter] in
# pyproject.toml): nothing imports upwards, the proxy process never loads pki/.
imports: $(STAMP)
	$(BIN)/lint-imports --no-cache

pytest: $(STAMP) system-tools
	$(BIN)/pytest $(PYTEST_ARGS)

# curl and openssl are the tests' real clients; cc and the OpenSSL headers build the
# load generator the benchmark smoke test runs.
system-tools:
	@scripts/ensure-system-tools curl openssl cc:gcc make:make \
		/usr/include/openssl/ssl.h:libssl-dev

# The docker-compose stack (deploy/) built and run for real, checked from the host; starts
# dockerd when none runs and stops it after (tests_compose/test_stack.py says how).
test-compose: $(STAMP)
	@scripts/ensure-system-tools curl dockerd:docker.io docker-compose:docker-compose \
		debootstrap:debootstrap
	$(BIN)/pytest tests_compose -o testpaths=tests_compose --timeout 1200 $(PYTEST_ARGS)

# mtlsproxy and nginx side by side (benchmarks/README.md). BENCH_ARGS="--rounds 5 --workers2"
bench: $(BENCH_STAMP)
	@scripts/ensure-system-tools curl openssl nginx:nginx cc:gcc make:make taskset:util-linux \
		pkg-config:pkg-config /usr/include/openssl/ssl.h:libssl-dev
	$(MAKE) -C benchmarks/loadgen
	$(BIN)/python benchmarks/bench.py $(BENCH_ARGS)

$(BENCH_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[test,bench]'
	@touch $@

# Re-install when pyproject.toml changes; the stamp keeps `make test` fast otherwise.
$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	@touch $@

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis mtlsproxy.egg-info
