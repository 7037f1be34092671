"""Offline DPO-family preference training (DPO, IPO, SimPO, KTO) on Megatron-Core.

Trains a policy from an HF checkpoint on offline preference pairs (UltraFeedback-binarized
schema) against a frozen reference in the same parallel layout, and exports the result as
an HF checkpoint. The loss is `loss.name`; everything runs through the one training loop
(`metaapo_nemo.trainer.loop`) with the offline algorithm (`metaapo_nemo.algorithms.dpo`).

    CPU (tiny default):  python recipes/dpo.py                  # conf/tiny_cpu_dpo.yaml
                         python recipes/dpo.py --config conf/tiny_cpu_simpo.yaml optim.lr=1e-4
    One node:            torchrun --nproc-per-node 8 recipes/dpo.py --config conf/llama31_8b_dpo.yaml
    SLURM:               sbatch slurm/dpo_llama31_8b.sbatch
    Inspect only:        python recipes/dpo.py --dry-run parallel.tp=2 --world-size 2
                         python recipes/dpo.py --dry-run --sbatch slurm/dpo_llama31_8b.sbatch
    Installed command:   metaapo-nemo train --config conf/tiny_cpu_dpo.yaml  (docs/quickstart.md)
"""

import sys

if __name__ == "__main__":
    from metaapo_nemo import preempt

    preempt.install()  # SIGUSR1 / SIGTERM from here on: before training a signal exits 85 (requeue)
    from metaapo_nemo.run import main

    sys.exit(main(method="dpo", doc=__doc__))
