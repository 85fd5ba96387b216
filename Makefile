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

.PHONY: setup build train info lint native-test test test-all lock bench clean

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

clean:
	rm -rf $(CMAKE_BUILD) build mgm_fast/_C*.so *.egg-info
