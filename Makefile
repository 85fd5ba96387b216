# Two entry points for a fresh Linux machine (Python 3.11):
#   make train   set up .venv, build the native extension, run the main job
#   make test    set up .venv, build, lint, C++/CUDA kernel build + ctest, pytest (CI's command;
#                tests marked `slow` are left to `make test-all`)
# The environment is pinned: requirements/cpu.txt lists what we depend on, requirements/lock.txt
# the exact versions the suite passed with (pip constraints); `make lock` refreshes the lock.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export PATH := $(abspath $(BIN)):$(PATH)
DEPS_STAMP := $(VENV)/.deps-installed
LOCK := requirements/lock.txt
CMAKE_BUILD ?= build-cmake
PYTEST_ARGS ?=
TRAIN_ARGS ?=
BENCH_DEVICE ?= cpu-2core-epyc
BENCH_DIR := benchmarks/results/$(BENCH_DEVICE)

.PHONY: setup build train info lint native-test test test-all lock bench gpu-wheels clean

$(DEPS_STAMP): requirements/cpu.txt $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -c $(LOCK) --upgrade pip
	$(BIN)/pip install --quiet -c $(LOCK) -r requirements/cpu.txt
	touch $@

setup: $(DEPS_STAMP)

# Editable install; builds mgm_fast._C (ninja keeps rebuilds incremental).
build: setup
	$(BIN)/pip install --quiet --no-deps --no-build-isolation -e .

train: build
	$(BIN)/python -m mgm_fast.train $(TRAIN_ARGS)

info: build
	$(BIN)/python -m mgm_fast.info

lint: setup
	$(BIN)/ruff check .

# Torch-free kernels on their own: C++ unit tests (ctest) and, where nvcc exists, the CUDA
# kernels compiled for sm_80 and sm_90 so a CUDA compile error fails the build.
native-test: setup
	cmake -S . -B $(CMAKE_BUILD) -G Ninja -DCMAKE_BUILD_TYPE=Release
	cmake --build $(CMAKE_BUILD)
	ctest --test-dir $(CMAKE_BUILD) --output-on-failure

test: build lint native-test
	$(BIN)/python -m pytest -q --benchmark-disable -m "not slow" $(PYTEST_ARGS)

# Everything, the slow tests included.
test-all: build lint native-test
	$(BIN)/python -m pytest -q --benchmark-disable $(PYTEST_ARGS)

# Re-resolve requirements/cpu.txt without the lock in a fresh .venv, write the lock from it, and
# run the whole suite on it; commit the new lock only when this passes.
lock:
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements/cpu.txt
	{ sed -n '/^#/p' $(LOCK); $(BIN)/pip freeze --all --exclude-editable; } > $(LOCK).new
	mv $(LOCK).new $(LOCK)
	touch $(DEPS_STAMP)
	$(MAKE) test-all
	@echo "requirements/lock.txt refreshed and the suite passed: review 'git diff $(LOCK)' and commit it"

# pytest-benchmark JSON, the environment and the generated report in benchmarks/results/$(BENCH_DEVICE)/
bench: build
	mkdir -p $(BENCH_DIR)
	$(BIN)/python -m pytest -q benchmarks --benchmark-only --benchmark-json=$(BENCH_DIR)/benchmarks.json
	$(BIN)/python -m mgm_fast.bench env --out $(BENCH_DIR)/env.json > /dev/null
	$(BIN)/python -m mgm_fast.bench report $(BENCH_DIR) --plots

# Wheels for benchmarks/gpu_suite.sh on a GPU machine without network (CPython 3.12, x86_64,
# manylinux): pytest, pytest-benchmark and their dependencies, mgm_fast's own dependencies and
# the build tools, each pinned to requirements/lock.txt where that version has such a wheel
# (else the newest that has one, with a note). torch and triton must already be on that machine.
# The folder is checked to resolve on its own (pip --no-index, for Python 3.12) and to fit in
# $(GPU_WHEELS_MAX_MIB) MiB. Use: benchmarks/gpu_suite.sh --wheels $(GPU_WHEELS) OUT_DIR
GPU_WHEELS ?= gpu-wheels
GPU_WHEELS_MAX_MIB ?= 64
GPU_WHEELS_PIP ?= $(if $(wildcard $(BIN)/pip),$(BIN)/pip,$(PYTHON) -m pip)
GPU_WHEELS_PKGS := pytest pluggy iniconfig packaging Pygments pytest-benchmark py-cpuinfo2 \
	numpy pillow PyYAML tqdm ninja pybind11 setuptools wheel pip
GPU_WHEELS_TARGET := --only-binary=:all: --python-version 3.12 --implementation cp \
	--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
	--platform any

gpu-wheels:
	rm -rf $(GPU_WHEELS)
	mkdir -p $(GPU_WHEELS)
	@set -e; for pkg in $(GPU_WHEELS_PKGS); do \
	  pin=$$(grep -i -m1 "^$$pkg==" $(LOCK) | sed 's/[+;].*//' || true); \
	  if [ -n "$$pin" ] && $(GPU_WHEELS_PIP) download --quiet --no-deps $(GPU_WHEELS_TARGET) -d $(GPU_WHEELS) "$$pin"; then \
	    echo "$$pin"; \
	  else \
	    echo "note: $${pin:-$$pkg (not in $(LOCK))} has no CPython 3.12 manylinux wheel: taking the newest $$pkg that has one"; \
	    $(GPU_WHEELS_PIP) download --quiet --no-deps $(GPU_WHEELS_TARGET) -d $(GPU_WHEELS) "$$pkg"; \
	  fi; \
	done
	$(GPU_WHEELS_PIP) install --quiet --dry-run --ignore-installed --no-index --find-links $(GPU_WHEELS) \
	  $(GPU_WHEELS_TARGET) --target $(GPU_WHEELS)/.never-written $(GPU_WHEELS_PKGS)
	@kib=$$(du -sk $(GPU_WHEELS) | cut -f1); \
	  echo "$(GPU_WHEELS): $$(ls $(GPU_WHEELS) | wc -l) wheels, $$((kib / 1024)) MiB ($$kib KiB)"; \
	  if [ $$kib -gt $$(( $(GPU_WHEELS_MAX_MIB) * 1024 )) ]; then \
	    echo "error: $(GPU_WHEELS) is over $(GPU_WHEELS_MAX_MIB) MiB"; exit 1; fi

clean:
	rm -rf $(CMAKE_BUILD) build mgm_fast/_C*.so *.egg-info
