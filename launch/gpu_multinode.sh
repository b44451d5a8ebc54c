#!/usr/bin/env bash
#SBATCH --job-name=medkr_jax
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --exclusive
# Run medkr_jax on several GPU nodes under SLURM: one JAX process per node driving all of its GPUs.
# As a batch script:  sbatch --nodes=4 --gpus-per-node=8 launch/gpu_multinode.sh --config ... (from the repo root)
# As a wrapper:       NODES=4 GPUS_PER_NODE=8 launch/gpu_multinode.sh --config ...  (runs srun itself)
# See launch/README.md and `launch/gpu_multinode.sh --help`.
set -euo pipefail

readonly PROG="gpu_multinode.sh"

usage() {
  cat <<'EOF'
Usage: sbatch [SBATCH OPTIONS] launch/gpu_multinode.sh MAIN_ARGS...     (submit from the repo root)
       NODES=N [GPUS_PER_NODE=G] launch/gpu_multinode.sh MAIN_ARGS...   (login node: srun allocates)
       launch/gpu_multinode.sh MAIN_ARGS...                             (inside salloc / sbatch)

Starts `python -m medkr_jax.main MAIN_ARGS...` once per node with `srun`, one process per node using
all of the node's GPUs. Each process gets what JAX's multi-controller runtime needs:
  MEDKR_COORDINATOR    first node of $SLURM_JOB_NODELIST (scontrol show hostnames) : port
  MEDKR_NUM_PROCESSES  $SLURM_NTASKS (= number of nodes)
  MEDKR_PROCESS_ID     $SLURM_PROCID
  JAX_LOCAL_DEVICE_IDS all local GPUs (otherwise JAX's SLURM detection would give each process one GPU)

Environment variables:
  NODES               number of nodes, when run outside an allocation (required there)
  GPUS_PER_NODE       GPUs per node: passed to srun outside an allocation, and the local device count
                      (default: the entries of CUDA_VISIBLE_DEVICES, else `nvidia-smi -L`)
  PARTITION, ACCOUNT, TIME   passed to srun outside an allocation (optional)
  MEDKR_COORDINATOR_PORT     coordinator port (default: 20000 + SLURM_JOB_ID % 20000)
  MEDKR_REPO          project folder on the shared filesystem (default: this script's checkout, or
                      the sbatch submit folder)
  PYTHON              python to run (default: $MEDKR_REPO/.venv/bin/python if present, else python3)

Example (2 nodes x 8 GPUs, SFT of Llama-3.1-8B):
  sbatch --nodes=2 --gpus-per-node=8 launch/gpu_multinode.sh --config configs/sft_8b.py \
      --config.output_dir=/shared/runs/sft_8b --config.model.path=/shared/models/Llama-3.1-8B-Instruct \
      --config.mesh.fsdp=2 --config.mesh.tensor=8
EOF
}

die() {
  echo "$PROG: error: $*" >&2
  exit 1
}

# The script's folder is a SLURM spool copy under sbatch, so also accept the submit folder.
find_repo() {
  local here candidate
  here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
  for candidate in "${MEDKR_REPO:-}" "$here/.." "${SLURM_SUBMIT_DIR:-}" "$PWD"; do
    if [[ -n "$candidate" && -f "$candidate/medkr_jax/main.py" ]]; then
      (cd "$candidate" && pwd)
      return 0
    fi
  done
  die "cannot find the medkr_jax checkout: submit from the repo root or set MEDKR_REPO=/path/to/repo \
(a folder every node can read)"
}

# What every task runs: derive the JAX multi-process variables from SLURM's, then exec the job.
# Single quotes on purpose: the variables expand inside each task, not here.
# shellcheck disable=SC2016
readonly TASK_SCRIPT='set -euo pipefail
# Whole output first: "| head -n 1" could kill scontrol with SIGPIPE, which pipefail turns into an exit.
nodes="$(scontrol show hostnames "$SLURM_JOB_NODELIST")"
head_node="${nodes%%[[:space:]]*}"
[[ -n "$head_node" ]] || { echo "gpu_multinode.sh: error: empty SLURM_JOB_NODELIST" >&2; exit 1; }
export MEDKR_COORDINATOR="$head_node:${MEDKR_COORDINATOR_PORT:-$((20000 + SLURM_JOB_ID % 20000))}"
export MEDKR_NUM_PROCESSES="$SLURM_NTASKS"
export MEDKR_PROCESS_ID="$SLURM_PROCID"
if [[ -z "${JAX_LOCAL_DEVICE_IDS:-}" ]]; then
  n="${GPUS_PER_NODE:-}"
  if [[ -z "$n" && -n "${CUDA_VISIBLE_DEVICES:-}" ]]; then
    n="$(tr "," "\n" <<<"$CUDA_VISIBLE_DEVICES" | grep -c .)"
  elif [[ -z "$n" ]] && command -v nvidia-smi >/dev/null 2>&1; then
    n="$(nvidia-smi -L | grep -c "^GPU")"
  fi
  if [[ -n "$n" && "$n" -gt 0 ]]; then
    JAX_LOCAL_DEVICE_IDS="$(seq -s , 0 $((n - 1)))"
    export JAX_LOCAL_DEVICE_IDS
  fi
fi
echo "[$(hostname)] process $MEDKR_PROCESS_ID/$MEDKR_NUM_PROCESSES coordinator $MEDKR_COORDINATOR gpus ${JAX_LOCAL_DEVICE_IDS:-default}" >&2
cd "$MEDKR_REPO"
exec "$PYTHON" -m medkr_jax.main "$@"'

main() {
  case "${1:-}" in
    -h | --help)
      usage
      return 0
      ;;
    "")
      usage >&2
      die "no arguments: give the arguments of 'python -m medkr_jax.main', e.g. --config configs/sft_8b.py"
      ;;
  esac
  local arg has_config=0
  for arg in "$@"; do
    [[ "$arg" == --config || "$arg" == --config=* ]] && has_config=1
  done
  ((has_config)) || die "no --config given (e.g. --config configs/sft_8b.py)"
  command -v srun >/dev/null 2>&1 || die "srun not found in PATH: run this on a SLURM cluster \
(sbatch launch/gpu_multinode.sh ..., or NODES=N launch/gpu_multinode.sh ... on a login node)"
  command -v scontrol >/dev/null 2>&1 || die "scontrol not found in PATH (needed to find the coordinator node)"

  MEDKR_REPO="$(find_repo)"
  export MEDKR_REPO
  if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x "$MEDKR_REPO/.venv/bin/python" ]]; then PYTHON="$MEDKR_REPO/.venv/bin/python"; else PYTHON=python3; fi
  fi
  export PYTHON
  if [[ -n "${GPUS_PER_NODE:-}" ]]; then
    [[ "$GPUS_PER_NODE" =~ ^[1-9][0-9]*$ ]] || die "GPUS_PER_NODE='$GPUS_PER_NODE' must be a positive integer"
    export GPUS_PER_NODE
  fi

  local srun_args=(--ntasks-per-node=1 --kill-on-bad-exit=1 --export=ALL)
  if [[ -n "${SLURM_JOB_ID:-}" ]]; then
    local nodes="${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-}}"
    [[ -n "$nodes" ]] || die "inside SLURM job $SLURM_JOB_ID but SLURM_JOB_NUM_NODES is not set"
    srun_args+=(--nodes="$nodes" --ntasks="$nodes")
  else
    [[ -n "${NODES:-}" ]] || die "not inside a SLURM allocation: submit with sbatch, or set NODES=<number of nodes> \
(and GPUS_PER_NODE, PARTITION ...) to let srun allocate"
    [[ "$NODES" =~ ^[1-9][0-9]*$ ]] || die "NODES='$NODES' must be a positive integer"
    srun_args+=(--nodes="$NODES" --ntasks="$NODES")
    if [[ -n "${GPUS_PER_NODE:-}" ]]; then srun_args+=(--gpus-per-node="$GPUS_PER_NODE"); fi
    if [[ -n "${PARTITION:-}" ]]; then srun_args+=(--partition="$PARTITION"); fi
    if [[ -n "${ACCOUNT:-}" ]]; then srun_args+=(--account="$ACCOUNT"); fi
    if [[ -n "${TIME:-}" ]]; then srun_args+=(--time="$TIME"); fi
  fi
  echo "$PROG: srun ${srun_args[*]} -> python -m medkr_jax.main $*" >&2
  srun "${srun_args[@]}" bash -c "$TASK_SCRIPT" medkr_task "$@"
}

main "$@"
