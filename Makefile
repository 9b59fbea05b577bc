# Two commands on a fresh machine: `make run` and `make test`.
# Each creates .venv when it is missing and installs what it needs, at the versions (and
# hashes) locked in requirements/: run.txt for `make run` (no linters, no test tools),
# test.txt for `make test`, build.txt for what builds them. `make lock` refreshes them.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
RUN_STAMP  := $(VENV)/.run-stamp
TEST_STAMP := $(VENV)/.test-stamp

BENCH_STAMP := $(VENV)/.bench-stamp

.PHONY: run test test-compose check lint typecheck imports pytest system-tools build-tools bench lock clean

run: $(RUN_STAMP)
	$(BIN)/mtlsproxy quickstart

test: $(TEST_STAMP) system-tools check pytest

check: lint typecheck imports

lint: $(TEST_STAMP)
	$(BIN)/ruff check mtlsproxy tests tests_compose benchmarks
	$(BIN)/ruff format --check mtlsproxy tests tests_compose benchmarks

typecheck: $(TEST_STAMP)
	$(BIN)/mypy

# The floors of docs/architecture.md as import-linter contracts ([tool.importlinter] in
# pyproject.toml): nothing imports upwards, the proxy process never loads pki/.
imports: $(TEST_STAMP)
	$(BIN)/lint-imports --no-cache

pytest: $(TEST_STAMP) system-tools
	$(BIN)/pytest $(PYTEST_ARGS)

# curl and openssl are the tests' real clients; cc and the OpenSSL headers build the
# load generator the benchmark smoke test runs.
system-tools:
	@scripts/ensure-system-tools curl openssl cc:gcc make:make \
		/usr/include/openssl/ssl.h:libssl-dev

# The docker-compose stack (deploy/) built and run for real, checked from the host; starts
# dockerd when none runs and stops it after (tests_compose/test_stack.py says how).
test-compose: $(TEST_STAMP)
	@scripts/ensure-system-tools curl dockerd:docker.io docker-compose:docker-compose \
		debootstrap:debootstrap
	$(BIN)/pytest tests_compose -o testpaths=tests_compose --timeout 1200 $(PYTEST_ARGS)

# mtlsproxy and nginx side by side (benchmarks/README.md). BENCH_ARGS="--rounds 5 --workers2"
bench: $(BENCH_STAMP)
	@scripts/ensure-system-tools curl openssl nginx:nginx cc:gcc make:make taskset:util-linux \
		pkg-config:pkg-config /usr/include/openssl/ssl.h:libssl-dev
	$(MAKE) -C benchmarks/loadgen
	$(BIN)/python benchmarks/bench.py $(BENCH_ARGS)

$(BENCH_STAMP): $(TEST_STAMP)
	$(BIN)/python -m pip install --quiet -e '.[test,bench]'
	@touch $@

# Re-install when the locks change; the stamps keep `make test` fast otherwise. Every
# package is checked against its hash: the build backend first (build.txt), then the
# locked packages and the project itself, built with it (no isolated, unpinned setuptools).
# llhttp ships as source only: building it needs a C compiler and Python's headers.
PY_HEADERS = $(shell $(PYTHON) -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
PIP := $(BIN)/python -m pip install --quiet
$(RUN_STAMP): requirements/build.txt requirements/run.txt pyproject.toml | $(BIN)/python build-tools
	$(PIP) --require-hashes -r requirements/build.txt
	$(PIP) --require-hashes --no-build-isolation -r requirements/run.txt
	$(PIP) --no-deps --no-build-isolation -e .
	@touch $@

$(TEST_STAMP): requirements/build.txt requirements/test.txt pyproject.toml | $(BIN)/python build-tools
	$(PIP) --require-hashes -r requirements/build.txt
	$(PIP) --require-hashes --no-build-isolation -r requirements/test.txt
	$(PIP) --no-deps --no-build-isolation -e .
	@touch $@

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

build-tools:
	@scripts/ensure-system-tools cc:gcc /usr/include/stdio.h:libc6-dev \
		$(PY_HEADERS)/Python.h:python3-dev

# After a change of dependencies in pyproject.toml: exact versions and hashes, resolved on
# this Python (3.11); commit the result.
LOCK := $(BIN)/pip-compile --quiet --generate-hashes --no-emit-index-url --no-emit-find-links \
	--strip-extras
lock: | $(BIN)/python
	$(BIN)/python -m pip install --quiet pip-tools
	$(LOCK) --extra demo -o requirements/run.txt pyproject.toml
	$(LOCK) --extra demo --extra client --extra test -o requirements/test.txt pyproject.toml
	$(LOCK) --allow-unsafe -o requirements/build.txt requirements/build.in

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis mtlsproxy.egg-info
