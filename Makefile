# mtl_plugins: one entry point for set-up, tests, the demo and the benchmarks.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: setup test demo env bench gpu-check clean-venv

## setup: create $(VENV) with the pinned stack (idempotent; seconds when up to date)
setup:
	bash tools/install.sh $(VENV)

## test: set up if needed, then run the whole suite
test: setup
	$(PY) -m pytest tests $(PYTEST_ARGS)

## demo: the main job: single-task baselines and ISTA + uncertainty on synthetic scenes,
## through mmseg's own tools/train.py and tools/test.py, CPU, a few minutes (tools/demo.py)
demo: setup
	$(PY) tools/demo.py $(DEMO_ARGS)

## env: print the versions of the stack
env: setup
	$(PY) -m mtl_plugins.collect_env

## bench: per-step time and memory of every MTL backward method (tools/benchmark_backward.py)
bench: setup
	$(PY) tools/benchmark_backward.py

## gpu-check: on a machine with CUDA, the CUDA-only tests, one iteration per allocation mode
## and both benchmarks on the GPU, < 8 minutes, one report (tools/gpu_check.sh; REPORT=path)
gpu-check:
	bash tools/gpu_check.sh $(REPORT)

clean-venv:
	rm -rf $(VENV)
