#!/usr/bin/env bash
# Run medkr_jax on a Cloud TPU VM slice: one JAX process per host, all hosts started together.
# See launch/README.md for copy-paste examples; `launch/tpu_pod.sh --help` for the commands.
set -euo pipefail

readonly PROG="tpu_pod.sh"
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
readonly REPO_ROOT

usage() {
  cat <<'EOF'
Usage: launch/tpu_pod.sh COMMAND [ARGS...]

Run medkr_jax on a Cloud TPU VM slice (v4 / v5e / v5p / v6e): one JAX process per TPU host, all
hosts started together; JAX's multi-controller runtime joins them into one global device mesh.

Commands:
  create                 create the slice, or reuse it when TPU_NAME already exists
  setup                  copy this checkout to every worker, create a venv, pip install -e ".[tpu]"
  fetch SRC DEST         copy SRC (gs://...) to DEST on every worker (model weights, data), e.g.
                           fetch gs://my-bucket/models/Llama-3.1-8B-Instruct models/
  run [--no-follow] [--] MAIN_ARGS...
                         start `python -m medkr_jax.main MAIN_ARGS...` on all workers (detached, so a
                         dropped ssh connection does not kill it), then stream worker 0's log
  logs [--worker=N|all]  stream the latest job log (default worker 0); Ctrl-C stops streaming only
  stop                   send SIGTERM to the job on every worker (training saves a checkpoint first)
  status                 describe the slice
  exec COMMAND...        run a shell command on every worker (from the project folder)
  delete                 delete the slice

Environment variables:
  TPU_NAME          slice name                                              (all commands)
  ZONE              zone, e.g. us-east5-a                                   (all commands)
  PROJECT           Google Cloud project id                                 (all commands)
  ACCELERATOR_TYPE  e.g. v5p-64 (32 chips, 8 hosts), v5p-256, v6e-64       (create)
  RUNTIME_VERSION   TPU VM image; default chosen from ACCELERATOR_TYPE     (create)
  SPOT=1            create a Spot slice (preemptible; runs resume from their last checkpoint)
  REMOTE_DIR        project folder on the workers, relative to home (default: medkr_jax)
  PYTHON_BIN        python used for the venv on the workers (default: python3.11)
  COORDINATOR_PORT  port of the JAX coordinator on worker 0 (default: 8476)
  REMOTE_ENV        extra "KEY=VALUE ..." exported for the job, e.g. "XLA_FLAGS=--xla_dump_to=/tmp/x"
  LOG_DIR           local folder where streamed logs are appended (default: logs/tpu)

Example (v5p-64 SFT of Llama-3.1-8B; outputs and checkpoints in a gs:// bucket):
  export TPU_NAME=medkr-v5p-64 ZONE=us-east5-a PROJECT=my-project ACCELERATOR_TYPE=v5p-64
  launch/tpu_pod.sh create && launch/tpu_pod.sh setup
  launch/tpu_pod.sh fetch gs://my-bucket/models/Llama-3.1-8B-Instruct models/
  launch/tpu_pod.sh run --config configs/sft_8b.py --config.output_dir=gs://my-bucket/runs/sft_8b \
      --config.model.path=models/Llama-3.1-8B-Instruct --config.sft.train_path=gs://my-bucket/data/sft.jsonl
  launch/tpu_pod.sh delete
EOF
}

die() {
  echo "$PROG: error: $*" >&2
  exit 1
}

require_gcloud() {
  command -v gcloud >/dev/null 2>&1 || die "gcloud not found in PATH. Install the Google Cloud CLI \
(https://cloud.google.com/sdk/docs/install), then run 'gcloud auth login'."
}

# require_vars NAME... : every named environment variable must be set and non-empty.
require_vars() {
  local missing=() name
  for name in "$@"; do
    if [[ -z "${!name:-}" ]]; then
      missing+=("$name")
    fi
  done
  if ((${#missing[@]})); then
    die "missing required environment variable(s): ${missing[*]} (see '$PROG --help')"
  fi
}

check_remote_dir() {
  REMOTE_DIR="${REMOTE_DIR:-medkr_jax}"
  # Interpolated into remote shell commands, so only plain relative paths are accepted.
  [[ "$REMOTE_DIR" =~ ^[A-Za-z0-9._][A-Za-z0-9._/-]*$ ]] \
    || die "REMOTE_DIR='$REMOTE_DIR' must be a plain path relative to the workers' home folder"
}

gtpu() {
  gcloud compute tpus tpu-vm "$@" --zone="$ZONE" --project="$PROJECT"
}

# ssh_all COMMAND: run a shell command on every worker at the same time.
ssh_all() {
  gtpu ssh "$TPU_NAME" --worker=all --command="$1"
}

default_runtime_version() {
  case "$1" in
    v4-*) echo "tpu-ubuntu2204-base" ;;
    v5litepod-* | v5e-*) echo "v2-alpha-tpuv5-lite" ;;
    v5p-*) echo "v2-alpha-tpuv5" ;;
    v6e-*) echo "v2-alpha-tpuv6e" ;;
    *) die "no default RUNTIME_VERSION for ACCELERATOR_TYPE='$1'; set RUNTIME_VERSION" ;;
  esac
}

slice_exists() {
  gtpu describe "$TPU_NAME" --format="value(state)" >/dev/null 2>&1
}

cmd_create() {
  require_vars TPU_NAME ZONE PROJECT ACCELERATOR_TYPE
  if slice_exists; then
    echo "$PROG: reusing slice '$TPU_NAME' ($(gtpu describe "$TPU_NAME" --format="value(acceleratorType,state)"))"
    return 0
  fi
  local version="${RUNTIME_VERSION:-$(default_runtime_version "$ACCELERATOR_TYPE")}"
  local extra=()
  if [[ "${SPOT:-0}" == 1 ]]; then
    extra+=(--spot)
  fi
  echo "$PROG: creating $ACCELERATOR_TYPE slice '$TPU_NAME' in $ZONE (runtime $version)"
  gtpu create "$TPU_NAME" --accelerator-type="$ACCELERATOR_TYPE" --version="$version" "${extra[@]}"
}

# pack_repo TARBALL: the project's files (tracked + untracked-but-not-ignored when in git).
pack_repo() {
  local tarball="$1"
  if git -C "$REPO_ROOT" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    (
      cd "$REPO_ROOT"
      git ls-files -z --cached --others --exclude-standard \
        | while IFS= read -r -d '' f; do
          if [[ -f "$f" ]]; then printf '%s\0' "$f"; fi
        done \
        | tar -czf "$tarball" --null -T -
    )
  else
    tar -czf "$tarball" -C "$REPO_ROOT" --exclude=./.git --exclude=./.venv --exclude=./runs --exclude=./logs .
  fi
}

cmd_setup() {
  require_vars TPU_NAME ZONE PROJECT
  check_remote_dir
  local python_bin="${PYTHON_BIN:-python3.11}"
  [[ "$python_bin" =~ ^[A-Za-z0-9._/-]+$ ]] || die "PYTHON_BIN='$python_bin' is not a plain command name"
  local tmp
  tmp="$(mktemp -d)"
  # shellcheck disable=SC2064  # expand now: the path is fixed
  trap "rm -rf '$tmp'" EXIT
  pack_repo "$tmp/medkr_jax_src.tgz"
  echo "$PROG: copying the project ($(du -h "$tmp/medkr_jax_src.tgz" | cut -f1)) to every worker of '$TPU_NAME'"
  gtpu scp "$tmp/medkr_jax_src.tgz" "$TPU_NAME:medkr_jax_src.tgz" --worker=all
  local remote
  remote="set -e
if ! command -v $python_bin >/dev/null 2>&1; then
  sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $python_bin $python_bin-venv
fi
mkdir -p ~/$REMOTE_DIR && tar -xzf ~/medkr_jax_src.tgz -C ~/$REMOTE_DIR && rm -f ~/medkr_jax_src.tgz
cd ~/$REMOTE_DIR
[ -x .venv/bin/python ] || $python_bin -m venv .venv
.venv/bin/pip install -q -U pip
.venv/bin/pip install -q -e '.[tpu]'
# gs:// output dirs: orbax reaches Cloud Storage through etils.epath, whose backend is gcsfs.
.venv/bin/python -c 'import gcsfs' 2>/dev/null || .venv/bin/pip install -q gcsfs
.venv/bin/python -c 'import jax; print(f\"worker {jax.process_index()}: {jax.local_device_count()} local / {jax.device_count()} global devices\")'"
  ssh_all "$remote"
  echo "$PROG: setup done on every worker (~/$REMOTE_DIR)"
}

cmd_fetch() {
  require_vars TPU_NAME ZONE PROJECT
  check_remote_dir
  (($# == 2)) || die "fetch needs SRC and DEST, e.g. fetch gs://bucket/models/Llama-3.1-8B-Instruct models/"
  local src dest
  src="$(printf '%q' "$1")"
  dest="$(printf '%q' "$2")"
  ssh_all "set -e; cd ~/$REMOTE_DIR; mkdir -p $dest; gcloud storage cp -r $src $dest"
}

# worker_ips: internal IPs of the slice's workers, worker 0 first.
worker_ips() {
  gtpu describe "$TPU_NAME" --format="value(networkEndpoints[].ipAddress)" | sed -e 's/[;,]/\n/g' | sed '/^$/d'
}

cmd_run() {
  require_vars TPU_NAME ZONE PROJECT
  check_remote_dir
  local follow=1
  while (($#)); do
    case "$1" in
      --no-follow) follow=0; shift ;;
      --) shift; break ;;
      *) break ;;
    esac
  done
  (($#)) || die "run needs the arguments of 'python -m medkr_jax.main', e.g. run --config configs/sft_8b.py \
--config.output_dir=gs://my-bucket/runs/sft_8b"
  local arg has_config=0
  for arg in "$@"; do
    [[ "$arg" == --config || "$arg" == --config=* ]] && has_config=1
  done
  ((has_config)) || die "run: no --config given (e.g. --config configs/sft_8b.py)"

  local ips=()
  mapfile -t ips < <(worker_ips)
  ((${#ips[@]})) || die "could not read the workers' IP addresses of '$TPU_NAME' (does it exist? '$PROG status')"
  local coordinator="${ips[0]}:${COORDINATOR_PORT:-8476}"
  local n="${#ips[@]}"
  local run_id
  run_id="$(date -u +%Y%m%d-%H%M%S)"
  local main_args env_words=""
  main_args="$(printf ' %q' "$@")"
  if [[ -n "${REMOTE_ENV:-}" ]]; then
    local kv
    local -a kvs
    read -r -a kvs <<<"$REMOTE_ENV"
    for kv in "${kvs[@]}"; do
      [[ "$kv" =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "REMOTE_ENV: '$kv' is not KEY=VALUE"
      env_words+=" $(printf '%q' "$kv")"
    done
  fi
  # The worker's index comes from the metadata server (what JAX itself uses on TPU VMs); the coordinator is
  # worker 0. setsid + nohup + redirects detach the job from the ssh session.
  local remote
  remote="set -e
cd ~/$REMOTE_DIR
mkdir -p logs
if [ -f logs/job.pid ] && kill -0 \"\$(cat logs/job.pid)\" 2>/dev/null; then
  echo \"a job is already running on this worker (pid \$(cat logs/job.pid)); '$PROG stop' first\" >&2; exit 1
fi
worker=\$(curl -sf -H 'Metadata-Flavor: Google' \
  http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number)
export MEDKR_COORDINATOR=$coordinator MEDKR_NUM_PROCESSES=$n MEDKR_PROCESS_ID=\"\$worker\"$env_words
setsid nohup .venv/bin/python -m medkr_jax.main$main_args >logs/$run_id.log 2>&1 </dev/null &
echo \$! >logs/job.pid
ln -sfn $run_id.log logs/latest.log
echo \"worker \$worker: started pid \$(cat logs/job.pid), log ~/$REMOTE_DIR/logs/$run_id.log\""
  echo "$PROG: starting on $n worker(s) of '$TPU_NAME' (coordinator $coordinator): python -m medkr_jax.main$main_args"
  ssh_all "$remote"
  if ((follow)); then
    cmd_logs --worker="${WORKER:-0}"
  fi
}

cmd_logs() {
  require_vars TPU_NAME ZONE PROJECT
  check_remote_dir
  local worker="${WORKER:-0}"
  while (($#)); do
    case "$1" in
      --worker=*) worker="${1#--worker=}"; shift ;;
      *) die "logs: unknown argument '$1' (expected --worker=N or --worker=all)" ;;
    esac
  done
  [[ "$worker" =~ ^([0-9]+|all)$ ]] || die "logs: --worker must be a number or 'all', got '$worker'"
  local log_dir="${LOG_DIR:-logs/tpu}"
  mkdir -p "$log_dir"
  local local_log="$log_dir/$TPU_NAME.log"
  echo "$PROG: streaming worker $worker's log (Ctrl-C stops streaming; the job keeps running); copy: $local_log"
  gtpu ssh "$TPU_NAME" --worker="$worker" --command="tail -n +1 -F ~/$REMOTE_DIR/logs/latest.log" \
    | tee -a "$local_log"
}

cmd_stop() {
  require_vars TPU_NAME ZONE PROJECT
  check_remote_dir
  ssh_all "cd ~/$REMOTE_DIR 2>/dev/null || exit 0
if [ -f logs/job.pid ] && kill -0 \"\$(cat logs/job.pid)\" 2>/dev/null; then
  kill -TERM \"\$(cat logs/job.pid)\" && echo \"stopping pid \$(cat logs/job.pid)\"
else
  echo 'no job running'
fi"
}

cmd_status() {
  require_vars TPU_NAME ZONE PROJECT
  gtpu describe "$TPU_NAME" --format="yaml(name,acceleratorType,state,health,runtimeVersion,networkEndpoints)"
}

cmd_exec() {
  require_vars TPU_NAME ZONE PROJECT
  check_remote_dir
  (($#)) || die "exec needs a command"
  ssh_all "cd ~/$REMOTE_DIR && $*"
}

cmd_delete() {
  require_vars TPU_NAME ZONE PROJECT
  echo "$PROG: deleting slice '$TPU_NAME'"
  gtpu delete "$TPU_NAME" --quiet
}

main() {
  local cmd="${1:-}"
  case "$cmd" in
    -h | --help | help)
      usage
      return 0
      ;;
    "")
      usage >&2
      die "no command given"
      ;;
    create | setup | fetch | run | logs | stop | status | exec | delete) ;;
    *)
      usage >&2
      die "unknown command '$cmd'"
      ;;
  esac
  shift
  require_gcloud
  "cmd_$cmd" "$@"
}

main "$@"
