# The two commands a newcomer runs. Both create .venv on first use.
PYTHON ?= python3
# Only for creating .venv: `make test PYTHON=...` must not reach the recipes' environment, where
# scripts/gpu_check.sh (run by a test) reads $PYTHON as the interpreter to use.
unexport PYTHON
VENV := .venv
BIN := $(VENV)/bin
# Several CPU "devices" so the sharding tests run on a laptop.
TEST_XLA_FLAGS := --xla_force_host_platform_device_count=4
# Huge pages for XLA:CPU's per-step buffers (faster steps; jaxldm/hostmem.py). The `jaxldm` command
# sets this itself; pytest runs the library in-process, so the test run sets it here.
TEST_GLIBC_TUNABLES := $(if $(GLIBC_TUNABLES),$(GLIBC_TUNABLES):,)glibc.malloc.hugetlb=1
# Bytecode, written under .venv: where PYTHONDONTWRITEBYTECODE is set (container images often set it), no
# module would ever be compiled once and kept (pip installs with --no-compile, below), and every Python
# process would compile jax, flax, orbax, ... from source again: ~3.5 s per process, ~6 s more with
# torch. A test run starts dozens (two pytest workers, the CLI and benchmark subprocesses).
RUN_ENV := PYTHONDONTWRITEBYTECODE= PYTHONPYCACHEPREFIX="$(CURDIR)/$(VENV)/pycache"

.PHONY: demo test install install-test clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# --no-compile: pip would byte-compile every installed module (torch's thousands: ~45 s of a
# fresh clone's `make test`); Python compiles the ones a run imports when it first imports them.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet --no-compile -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet --no-compile -e '.[test,bench]'
	touch $@ $(VENV)/.installed

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

demo: install
	$(RUN_ENV) $(BIN)/jaxldm demo

test: install-test
	$(RUN_ENV) GLIBC_TUNABLES=$(TEST_GLIBC_TUNABLES) XLA_FLAGS=$(TEST_XLA_FLAGS) $(BIN)/python -m pytest -q -n 2 --dist loadgroup -p no:cacheprovider

clean:
	rm -rf $(VENV) runs .pytest_cache
