# The two commands of the README set everything up themselves on a fresh machine.
# torch is installed first from its pinned CPU build, so the project's `torch>=` floor is then
# satisfied and pip never pulls a CUDA build.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH := torch==2.13.0

# pytest-xdist workers: one per CPU, 2 to 4 (each holds torch, onnxruntime and a converter: ~2-3 GB)
WORKERS ?= $(shell $(PY) -c "import os; print(max(2, min(4, len(os.sched_getaffinity(0)))))")

.PHONY: run test test-all bench venv clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e '.[test,pte,tflite]'
	$(BIN)/python -c "import torch, onnxruntime, coremltools, typer, executorch, litert_torch, ai_edge_litert.interpreter; assert '+cpu' in torch.__version__ or not torch.cuda.is_available()"
	touch $(STAMP)

venv: $(STAMP)

# The main job: the headline export on the built-in default.
run: $(STAMP)
	$(BIN)/edgevit-export export shvit_s4 --format coreml --res 1024 --force

test: $(STAMP)
	$(BIN)/python -m pytest -q -n $(WORKERS)

test-all: $(STAMP)
	$(BIN)/python -m pytest -q -n $(WORKERS) -m "slow or not slow"

clean:
	rm -rf $(VENV) exports .pytest_cache
