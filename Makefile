# Two entry points for a fresh Linux machine (Python 3.11):
#   make train   set up .venv, build the native extension, run the main job
#   make test    set up .venv, build, lint, C++/CUDA kernel build + ctest, pytest
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export PATH := $(abspath $(BIN)):$(PATH)
DEPS_STAMP := $(VENV)/.deps-installed
CMAKE_BUILD ?= build-cmake
PYTEST_ARGS ?=
TRAIN_ARGS ?=
BENCH_DEVICE ?= cpu-2core-epyc
BENCH_DIR := benchmarks/results/$(BENCH_DEVICE)

.PHONY: setup build train info lint native-test test bench clean

$(DEPS_STAMP): requirements/cpu.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade --quiet pip
	$(BIN)/pip install --quiet -r requirements/cpu.txt
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
	$(BIN)/python -m pytest -q --benchmark-disable $(PYTEST_ARGS)

# pytest-benchmark JSON, the environment and the generated report in benchmarks/results/$(BENCH_DEVICE)/
bench: build
	mkdir -p $(BENCH_DIR)
	$(BIN)/python -m pytest -q benchmarks --benchmark-only --benchmark-json=$(BENCH_DIR)/benchmarks.json
	$(BIN)/python -m mgm_fast.bench env --out $(BENCH_DIR)/env.json > /dev/null
	$(BIN)/python -m mgm_fast.bench report $(BENCH_DIR) --plots

clean:
	rm -rf $(CMAKE_BUILD) build mgm_fast/_C*.so *.egg-info
