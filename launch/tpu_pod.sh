#!/usr/bin/env bash
# Trains mlseg_jax on a Cloud TPU VM slice or pod: creates (or reuses) the TPU, installs the
# code on every worker, starts the same command on all of them, streams the logs and, with
# --teardown, deletes the TPU at the end. JAX finds the other workers itself
# (mlseg_jax/distributed.py); every worker reads its own slice of the data.
#
#   launch/tpu_pod.sh --zone us-central2-b --accelerator-type v4-64 \
#     --config configs/ade20k_vit_l.py --workdir gs://BUCKET/runs/vit_l [--dry-run] \
#     [-- --config.total_steps=160000 ...]
#
# Run from the repository (the code is copied from `git archive HEAD`, committed files only,
# unless --repo-url clones it on the workers). See launch/README.md.
set -euo pipefail

usage() {
  cat <<'EOF'
usage: launch/tpu_pod.sh --zone ZONE --accelerator-type TYPE --config FILE --workdir DIR
                         [options] [-- CONFIG_OVERRIDES...]
  --project ID            GCP project (default: gcloud's configured project)
  --zone ZONE             zone with capacity for TYPE (e.g. us-central2-b, us-west4-a)
  --accelerator-type T    v4-8, v4-64, v5litepod-8, v5p-32, v6e-8, ...
  --name NAME             TPU (and queued resource) name (default: mlseg-TYPE)
  --runtime-version V     TPU software version (default: from the TPU generation)
  --queued                get the TPU through a queued resource (large pods, spot capacity)
  --spot                  spot (preemptible) capacity
  --repo-url URL          clone this repository on the workers instead of copying HEAD
  --branch B              branch or tag to clone with --repo-url
  --python P              Python (3.11+) used on the workers (default: python3.11)
  --requirements FILE     pip requirements of the run (default: requirements.txt)
  --config FILE           config file, relative to the repository (configs/NAME.py[:ARG])
  --workdir DIR           checkpoints and logs; gs://BUCKET/... on pods
  --skip-install          reuse the code and venv already on the workers
  --attach                only stream the logs of the run already going
  --log-worker W          worker whose log is streamed: 0 (default) or all
  --teardown              delete the TPU when the run ends
  --dry-run               print every command instead of running it
  -- ...                  everything after -- is passed to mlseg_jax.main
EOF
}

die() { echo "tpu_pod.sh: $*" >&2; exit 2; }

project="" zone="" accelerator_type="" name="" runtime_version="" queued=0 spot=0
repo_url="" branch="" python="python3.11" requirements="requirements.txt" config="" workdir="" skip_install=0 attach=0
log_worker=0 teardown=0 dry_run=0
overrides=()
while (($#)); do
  case "$1" in
    --project) project="${2:?--project needs a value}"; shift 2 ;;
    --zone) zone="${2:?--zone needs a value}"; shift 2 ;;
    --accelerator-type) accelerator_type="${2:?--accelerator-type needs a value}"; shift 2 ;;
    --name) name="${2:?--name needs a value}"; shift 2 ;;
    --runtime-version) runtime_version="${2:?--runtime-version needs a value}"; shift 2 ;;
    --queued) queued=1; shift ;;
    --spot) spot=1; shift ;;
    --repo-url) repo_url="${2:?--repo-url needs a value}"; shift 2 ;;
    --branch) branch="${2:?--branch needs a value}"; shift 2 ;;
    --python) python="${2:?--python needs a value}"; shift 2 ;;
    --requirements) requirements="${2:?--requirements needs a value}"; shift 2 ;;
    --config) config="${2:?--config needs a value}"; shift 2 ;;
    --workdir) workdir="${2:?--workdir needs a value}"; shift 2 ;;
    --skip-install) skip_install=1; shift ;;
    --attach) attach=1; shift ;;
    --log-worker) log_worker="${2:?--log-worker needs a value}"; shift 2 ;;
    --teardown) teardown=1; shift ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; overrides=("$@"); break ;;
    *) usage >&2; die "unknown argument: $1" ;;
  esac
done

[[ -n $zone ]] || die "--zone is required"
[[ -n $accelerator_type ]] || die "--accelerator-type is required (e.g. v4-8, v5litepod-8)"
if ((!attach)); then
  [[ -n $config ]] || die "--config is required (e.g. configs/ade20k_vit_l.py)"
  [[ -n $workdir ]] || die "--workdir is required (gs://BUCKET/... on a pod)"
fi
[[ $log_worker == all || $log_worker =~ ^[0-9]+$ ]] || die "--log-worker must be a number or all"
[[ -z $branch || -n $repo_url ]] || die "--branch needs --repo-url"
name="${name:-mlseg-${accelerator_type}}"
if [[ -z $runtime_version ]]; then
  # Base images per generation (cloud.google.com/tpu/docs/runtimes); JAX comes from pip.
  case "$accelerator_type" in
    v4-*) runtime_version="tpu-ubuntu2204-base" ;;
    v5litepod-*|v5e-*) runtime_version="v2-alpha-tpuv5-lite" ;;
    v5p-*) runtime_version="v2-alpha-tpuv5" ;;
    v6e-*) runtime_version="v2-alpha-tpuv6e" ;;
    *) die "no default runtime version for $accelerator_type; pass --runtime-version" ;;
  esac
fi

# Single-quotes what the shell would otherwise split or expand, so printed commands paste back.
quote() {
  local word out=()
  for word in "$@"; do
    if [[ $word =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
      out+=("$word")
    else
      out+=("'${word//\'/\'\\\'\'}'")
    fi
  done
  echo "${out[*]}"
}

run() {
  if ((dry_run)); then
    quote "$@"
  else
    echo "+ $(quote "$@")" >&2
    "$@"
  fi
}

note() { echo "# $*"; }

scope=(--zone="$zone")
[[ -n $project ]] && scope+=(--project="$project")
on_workers() {  # on_workers WORKER COMMAND: runs a shell command on the TPU's workers
  run gcloud compute tpus tpu-vm ssh "$name" "${scope[@]}" --worker="$1" --command="$2"
}

# Paths on the workers, in the commands sent there: their shell expands the ~, not this one.
# shellcheck disable=SC2088
remote_repo="~/mlseg_jax"
# shellcheck disable=SC2088
remote_venv="~/mlseg_jax_venv"
# shellcheck disable=SC2088
log="~/mlseg_jax.log"

create_or_reuse_tpu() {
  local spot_flag=()
  ((spot)) && spot_flag=(--spot)
  if ((queued)); then
    local describe=(gcloud compute tpus queued-resources describe "$name" "${scope[@]}")
    if ((dry_run)); then
      note "reuse the queued resource if this finds it, else create it:"
      quote "${describe[@]}"
    elif "${describe[@]}" >/dev/null 2>&1; then
      echo "reusing queued resource $name" >&2
      describe=()
    fi
    if ((${#describe[@]})); then
      run gcloud compute tpus queued-resources create "$name" "${scope[@]}" --node-id="$name" \
        --accelerator-type="$accelerator_type" --runtime-version="$runtime_version" \
        "${spot_flag[@]}"
    fi
    local state_cmd=(gcloud compute tpus queued-resources describe "$name" "${scope[@]}"
                     --format='value(state.state)')
    if ((dry_run)); then
      note "repeat every 60 s until it prints ACTIVE:"
      quote "${state_cmd[@]}"
      return
    fi
    local state
    while state="$("${state_cmd[@]}")" && [[ $state != ACTIVE ]]; do
      case "$state" in
        FAILED|SUSPENDED|SUSPENDING) die "queued resource $name is $state" ;;
      esac
      echo "queued resource $name: $state; waiting" >&2
      sleep 60
    done
  else
    local describe=(gcloud compute tpus tpu-vm describe "$name" "${scope[@]}")
    if ((dry_run)); then
      note "reuse the TPU VM if this finds it, else create it:"
      quote "${describe[@]}"
    elif "${describe[@]}" >/dev/null 2>&1; then
      echo "reusing TPU VM $name" >&2
      return
    fi
    run gcloud compute tpus tpu-vm create "$name" "${scope[@]}" \
      --accelerator-type="$accelerator_type" --version="$runtime_version" "${spot_flag[@]}"
  fi
}

install_on_workers() {
  if [[ -n $repo_url ]]; then
    local clone=(git clone --depth=1)
    [[ -n $branch ]] && clone+=(--branch="$branch")
    on_workers all "rm -rf $remote_repo && $(quote "${clone[@]}" "$repo_url") $remote_repo"
  else
    local repo_root archive
    repo_root="$(git rev-parse --show-toplevel 2>/dev/null)" \
      || die "run from the repository, or pass --repo-url"
    archive="${TMPDIR:-/tmp}/mlseg_jax_$name.tar.gz"
    run git -C "$repo_root" archive --format=tar.gz --output="$archive" HEAD
    run gcloud compute tpus tpu-vm scp "$archive" "$name:mlseg_jax.tar.gz" "${scope[@]}" \
      --worker=all
    on_workers all "rm -rf $remote_repo && mkdir -p $remote_repo \
&& tar -xzf ~/mlseg_jax.tar.gz -C $remote_repo"
  fi
  # Base images ship an older Python; jax needs 3.11+. apt waits for the boot-time upgrades.
  local apt="sudo apt-get -o DPkg::Lock::Timeout=600"
  on_workers all "set -e; $python -c 'import venv, ensurepip' 2>/dev/null \
|| { $apt update && $apt install -y $python-venv; }; \
$python -m venv $remote_venv; $remote_venv/bin/pip install -q --upgrade pip; \
cd $remote_repo && $remote_venv/bin/pip install -q -r $(quote "$requirements") 'jax[tpu]' gcsfs"
}

refuse_if_running() {
  # One process at a time can own a TPU, and the code must not change under a running job.
  on_workers all "if [ -f ~/mlseg_jax.pid ] && kill -0 \"\$(cat ~/mlseg_jax.pid)\" 2>/dev/null; \
then echo \"\$(hostname): a run is still going (use --attach)\" >&2; exit 1; fi"
}

start_run() {
  local train
  train="$remote_venv/bin/python -m mlseg_jax.main $(quote --config "$config" --workdir \
"$workdir" "${overrides[@]}")"
  # Detached with nohup: a dropped ssh connection or ^C while streaming leaves the run going.
  # The exit file tells the stream how it ended.
  on_workers all "cd $remote_repo && rm -f ~/mlseg_jax.exit \
&& { nohup sh -c $(quote "$train; echo \$? > ~/mlseg_jax.exit") > $log 2>&1 < /dev/null & \
echo \$! > ~/mlseg_jax.pid; }"
}

stream_logs() {
  # Process 0 writes the training log; the other workers' logs are in the same file on each.
  on_workers "$log_worker" "tail -n +1 -F $log --pid=\"\$(cat ~/mlseg_jax.pid)\" 2>/dev/null; \
exit \"\$(cat ~/mlseg_jax.exit 2>/dev/null || echo 1)\""
}

teardown_tpu() {
  if ((queued)); then
    run gcloud compute tpus queued-resources delete "$name" "${scope[@]}" --force --quiet
  else
    run gcloud compute tpus tpu-vm delete "$name" "${scope[@]}" --quiet
  fi
}

status=0
if ((attach)); then
  stream_logs || status=$?
else
  create_or_reuse_tpu
  refuse_if_running
  ((skip_install)) || install_on_workers
  start_run
  stream_logs || status=$?
fi
if ((teardown)); then
  teardown_tpu
fi
exit "$status"
