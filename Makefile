# matryoshka2d developer entry points. `make demo` and `make test` set everything up from scratch.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# every extra: the tests need all of them (ray included: tests/corpus/test_corpus_ray.py); README installs the same set
EXTRAS ?= train,dev,plot,st,onnx,openvino,retrieval,corpus,ray,serve
TORCH_SPEC ?= torch==2.13.0
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install demo test test-all lint reproduce research clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first, pinned, so that nothing pulls a multi-GB CUDA build (see README for GPUs)
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -e ".[$(EXTRAS)]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) -m matryoshka2d.demo

test: install
	$(PY) -m pytest -q -m "not slow"

test-all: install
	$(PY) -m pytest -q

# ruff, then the layer contract of pyproject.toml [tool.importlinter] (no upward import, no circle)
lint: install
	$(VENV)/bin/ruff check src tests benchmarks scripts
	$(VENV)/bin/lint-imports

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache build *.egg-info src/*.egg-info

# The studies: WORKERS processes share one study (each unit is locked by the worker that trains it) with
# WORKER_THREADS torch threads each; on 2 cores two 1-thread workers finish about twice as fast as one.
WORKERS ?= 2
WORKER_THREADS ?= 1
define run_study
	@pids=""; for i in $$(seq $(WORKERS)); do \
	  OMP_NUM_THREADS=$(WORKER_THREADS) $(VENV)/bin/m2d reproduce --config $(1) & pids="$$pids $$!"; sleep 5; \
	done; rc=0; for p in $$pids; do wait $$p || rc=1; done; exit $$rc
endef

reproduce: install
	$(call run_study,configs/reproduce-stsb-minilm.toml)

research: reproduce
	$(call run_study,research/configs/research-exits-ablations.toml)
	$(call run_study,research/configs/research-exits-minilm.toml)
