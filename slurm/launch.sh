#!/usr/bin/env bash
# One process per GPU via srun, called from the sbatch scripts in this folder:
#   slurm/launch.sh recipes/metaapo.py conf/llama31_8b_metaapo.yaml [a.b=c ...]
#
# Rendezvous comes from the allocation: MASTER_ADDR = first node of the node list,
# MASTER_PORT derived from the job id; metaapo_nemo/parallel/state.py reads SLURM_PROCID,
# SLURM_NTASKS and SLURM_LOCALID as rank / world size / local rank.
#
# Containers (pyxis/enroot): set CONTAINER_IMAGE (e.g. nvcr.io#nvidia/pytorch:xx.yy-py3 or a
# .sqsh file) and optionally CONTAINER_MOUNTS ("/lustre:/lustre,/home:/home"); the repo is
# mounted at its own path and used as the working directory.
#
# Preemption: the sbatch scripts ask SLURM for USR1 some minutes before the time limit
# (--signal=USR1@300). The trainer finishes its optimiser step, writes a checkpoint and exits
# with status 85 (REQUEUE_EXIT); this script then requeues the job (`scontrol requeue`, which
# ends the batch script at once), and the requeued job (same id, SLURM_RESTART_COUNT=1)
# resumes from the run directory's latest checkpoint by itself. Every sbatch script, GPU and
# CPU, goes through here: the requeue logic exists once.
#
# A signal at ANY moment, also while the tasks are still starting (SLURM's --signal time is only
# accurate to ~60 s, and a requeued job starts its clock again), ends in a requeue: every rank
# handles SIGUSR1/SIGTERM from its first line (metaapo_nemo/preempt.py) and exits 85, and each
# rank that got a signal writes $RUN_DIR/.preempted, so a job whose srun status is not 85 (a
# rank killed while blocked in a collective) is requeued too when a rank saw SIGUSR1.
#
# Run directory: $OUTPUT_DIR/$RUN_NAME, default runs/<job name>-<job id>; an array task uses
# <job name>-<array job id>_<array task id>, so a sweep's tasks never share a directory.
# run.output_dir=... / run.name=... among the overrides win, for the run and for train.log.
set -euo pipefail
: "${SLURM_JOB_ID:?run this inside an sbatch/salloc allocation}"
[ $# -ge 2 ] || { echo "usage: $0 RECIPE_SCRIPT RECIPE_YAML [a.b=c ...]" >&2; exit 2; }
SCRIPT=$1; RECIPE=$2; shift 2
REPO=$(cd "$(dirname "$0")/.." && pwd)
[ -f "$REPO/$SCRIPT" ] || { echo "no such recipe script: $SCRIPT" >&2; exit 2; }
[ -f "$REPO/$RECIPE" ] || { echo "no such recipe: $RECIPE (see conf/)" >&2; exit 2; }

export MASTER_ADDR=${MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)}
export MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
# NCCL / CUDA settings (documented in README "Running on a SLURM cluster"):
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}  # megatron TP comm/compute overlap
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}  # fail fast on a dead peer
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
export TOKENIZERS_PARALLELISM=false

# One run directory per job; a requeued job keeps its id, so it finds its checkpoints.
if [ -n "${SLURM_ARRAY_JOB_ID:-}" ]; then
  RUN_NAME=${RUN_NAME:-${SLURM_JOB_NAME:-job}-${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}}
else
  RUN_NAME=${RUN_NAME:-${SLURM_JOB_NAME:-job}-${SLURM_JOB_ID}}
fi
OUTPUT_DIR=${OUTPUT_DIR:-$REPO/runs}
for arg in "$@"; do  # the last override wins, as in the recipe's own parsing
  case "$arg" in
    run.output_dir=*) OUTPUT_DIR=${arg#run.output_dir=} ;;
    run.name=*) RUN_NAME=${arg#run.name=} ;;
  esac
done
case "$OUTPUT_DIR" in  # a relative path as the recipe resolves it: the cwd if it is there, else the repo
  /*) ;;
  *) if [ -e "$OUTPUT_DIR" ]; then OUTPUT_DIR=$PWD/$OUTPUT_DIR; else OUTPUT_DIR=$REPO/$OUTPUT_DIR; fi ;;
esac
RUN_DIR=$OUTPUT_DIR/$RUN_NAME
mkdir -p "$RUN_DIR"
export METAAPO_PREEMPT_MARKER=$RUN_DIR/.preempted  # written by every rank that gets a signal
rm -f "$METAAPO_PREEMPT_MARKER"

# Outside a container use the project's venv if there is one; inside, the image's python.
PYTHON=${PYTHON:-python}
if [ -z "${CONTAINER_IMAGE:-}" ] && [ -x "$REPO/.venv/bin/python" ]; then
  PYTHON="$REPO/.venv/bin/python"
fi
CONTAINER_ARGS=()
if [ -n "${CONTAINER_IMAGE:-}" ]; then
  CONTAINER_ARGS=(--container-image="$CONTAINER_IMAGE" --container-workdir="$REPO"
                  --container-mounts="$REPO:$REPO${CONTAINER_MOUNTS:+,$CONTAINER_MOUNTS}")
fi

echo "launch: job $SLURM_JOB_ID restart ${SLURM_RESTART_COUNT:-0}: $SLURM_NTASKS tasks on" \
  "$SLURM_JOB_NODELIST, rendezvous $MASTER_ADDR:$MASTER_PORT, run dir $RUN_DIR" | tee -a "$RUN_DIR/train.log"
set +e
srun --kill-on-bad-exit=1 --cpu-bind=none "${CONTAINER_ARGS[@]}" \
  "$PYTHON" "$REPO/$SCRIPT" --config "$REPO/$RECIPE" \
  "$@" run.name="$RUN_NAME" run.output_dir="$OUTPUT_DIR" \
  2>&1 | tee -a "$RUN_DIR/train.log"
rc=${PIPESTATUS[0]}
set -e
REQUEUE_EXIT=${REQUEUE_EXIT:-85}  # the trainer's "checkpoint written, please requeue me" status
# A rank can miss the handler: blocked in a collective when srun's --kill-on-bad-exit ends it,
# or signalled in the ~0.1 s between exec and the recipe's first line (the interpreter's own
# start-up: it dies of the signal, 128 + 10 = 138 for USR1). That is still a preemption, never
# a lost job: requeue when any rank recorded SIGUSR1 (only ever sent to ask for a checkpoint:
# --signal=USR1@N, scancel --signal=USR1) or srun's status is USR1's. A SIGTERM alone is not
# enough: srun's --kill-on-bad-exit sends it to the survivors of a crashed or killed rank, and
# a crash must end the job, not requeue it forever (SIGTERM preemption requeues on 85).
if [ "$rc" -ne 0 ] && [ "$rc" -ne "$REQUEUE_EXIT" ] && \
   { grep -qs " SIGUSR1 rank " "$METAAPO_PREEMPT_MARKER" || [ "$rc" -eq 138 ]; }; then
  echo "srun exited $rc after a preemption signal (a rank did not exit $REQUEUE_EXIT itself):" \
    "$(head -n 3 "$METAAPO_PREEMPT_MARKER" 2>/dev/null | tr '\n' ';')" | tee -a "$RUN_DIR/train.log"
  rc=$REQUEUE_EXIT
fi
if [ "$rc" -eq "$REQUEUE_EXIT" ]; then
  echo "preempted/time limit: latest checkpoint complete; requeueing job $SLURM_JOB_ID" \
    | tee -a "$RUN_DIR/train.log"
  # Only a batch job can be requeued (not salloc/srun): then say how to resume and keep 85.
  scontrol requeue "$SLURM_JOB_ID" && exit 0
  echo "could not requeue job $SLURM_JOB_ID; rerun the same command to resume" >&2
fi
exit "$rc"
