"""MetaAPO: meta-weighted adaptive preference optimisation (arXiv 2509.23371) on Megatron-Core.

Per round: offline margins with the current policy and reference -> meta weights w ->
seeded selection (u > w) -> weight push into vLLM + K samples for the selected prompts ->
reward model -> best/worst online pairs -> training with w * L_off + (1 - w) * L_on ->
a meta-learner step every T_meta optimiser steps. The paper's baselines and ablations are
settings of the same algorithm (`metaapo_nemo.algorithms.metaapo`; see conf/tiny_cpu_*.yaml),
trained by the one loop (`metaapo_nemo.trainer.loop`).

    CPU (tiny default):  python recipes/metaapo.py                 # conf/tiny_cpu.yaml
                         python recipes/metaapo.py --config conf/tiny_cpu_online_dpo.yaml
    One node:            torchrun --nproc-per-node 8 recipes/metaapo.py --config conf/llama31_8b_metaapo.yaml
    SLURM:               sbatch slurm/metaapo_llama31_8b.sbatch
    Inspect only:        python recipes/metaapo.py --dry-run
                         python recipes/metaapo.py --dry-run --sbatch slurm/metaapo_llama31_70b.sbatch
    Installed command:   metaapo-nemo train --config conf/tiny_cpu.yaml  (docs/quickstart.md)
"""

import sys

if __name__ == "__main__":
    from metaapo_nemo import preempt

    preempt.install()  # SIGUSR1 / SIGTERM from here on: before training a signal exits 85 (requeue)
    from metaapo_nemo.run import main

    sys.exit(main(method="metaapo", doc=__doc__))
