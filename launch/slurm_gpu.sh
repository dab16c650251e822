#!/usr/bin/env bash
# Submits launch/slurm_gpu.sbatch with matching sbatch resources: N nodes x G GPUs, one JAX
# process per GPU (default) or per node. Run from anywhere with the Python environment that
# has mlseg_jax's requirements active; the job starts in the repository root.
#
#   launch/slurm_gpu.sh --nodes 2 --gpus-per-node 8 --partition gpu \
#     --config configs/ade20k_vit_l.py --workdir /shared/runs/vit_l [--dry-run] [-- overrides]
set -euo pipefail

usage() {
  cat <<'EOF'
usage: launch/slurm_gpu.sh --config FILE --workdir DIR [options] [-- CONFIG_OVERRIDES...]
  --nodes N            nodes (default: 2)
  --gpus-per-node G    GPUs per node (default: 8)
  --per gpu|node       one process per GPU (default) or per node
  --partition P        SLURM partition
  --account A          SLURM account
  --time T             time limit (default: 24:00:00)
  --job-name NAME      job name (default: mlseg_jax); the log is NAME-JOBID.out
  --python P           Python with mlseg_jax's requirements (default: python3)
  --port P             coordinator port (default: from the job id)
  --config FILE        config file (configs/NAME.py[:ARG])
  --workdir DIR        checkpoints and logs, on a filesystem every node sees
  --dry-run            print the sbatch command instead of submitting
  -- ...               everything after -- is passed to mlseg_jax.main
EOF
}

die() { echo "slurm_gpu.sh: $*" >&2; exit 2; }

nodes=2 gpus_per_node=8 per="gpu" partition="" account="" time_limit="24:00:00"
job_name="mlseg_jax" python="python3" port="" config="" workdir="" dry_run=0
overrides=()
while (($#)); do
  case "$1" in
    --nodes) nodes="${2:?--nodes needs a value}"; shift 2 ;;
    --gpus-per-node) gpus_per_node="${2:?--gpus-per-node needs a value}"; shift 2 ;;
    --per) per="${2:?--per needs gpu or node}"; shift 2 ;;
    --partition) partition="${2:?--partition needs a value}"; shift 2 ;;
    --account) account="${2:?--account needs a value}"; shift 2 ;;
    --time) time_limit="${2:?--time needs a value}"; shift 2 ;;
    --job-name) job_name="${2:?--job-name needs a value}"; shift 2 ;;
    --python) python="${2:?--python needs a value}"; shift 2 ;;
    --port) port="${2:?--port needs a value}"; shift 2 ;;
    --config) config="${2:?--config needs a value}"; shift 2 ;;
    --workdir) workdir="${2:?--workdir needs a value}"; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; overrides=("$@"); break ;;
    *) usage >&2; die "unknown argument: $1" ;;
  esac
done

[[ $nodes =~ ^[1-9][0-9]*$ ]] || die "--nodes must be a positive integer, got '$nodes'"
[[ $gpus_per_node =~ ^[1-9][0-9]*$ ]] \
  || die "--gpus-per-node must be a positive integer, got '$gpus_per_node'"
[[ $per == gpu || $per == node ]] || die "--per must be gpu or node, got '$per'"
[[ -n $config ]] || die "--config is required (e.g. configs/ade20k_vit_l.py)"
[[ -n $workdir ]] || die "--workdir is required (a directory every node sees)"

quote() {  # Single-quotes what the shell would split or expand: printed lines paste back.
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

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
tasks_per_node="$gpus_per_node"
[[ $per == node ]] && tasks_per_node=1
sbatch_cmd=(sbatch --nodes="$nodes" --ntasks-per-node="$tasks_per_node"
            --gpus-per-node="$gpus_per_node" --time="$time_limit" --job-name="$job_name"
            --chdir="$repo_root")
[[ -n $partition ]] && sbatch_cmd+=(--partition="$partition")
[[ -n $account ]] && sbatch_cmd+=(--account="$account")
sbatch_cmd+=("$repo_root/launch/slurm_gpu.sbatch" --per "$per" --gpus-per-node "$gpus_per_node"
             --python "$python" --config "$config" --workdir "$workdir")
[[ -n $port ]] && sbatch_cmd+=(--port "$port")
sbatch_cmd+=(-- "${overrides[@]}")

if ((dry_run)); then
  echo "# $nodes nodes x $gpus_per_node GPUs, $((nodes * tasks_per_node)) JAX processes"
  quote "${sbatch_cmd[@]}"
  exit 0
fi
echo "+ $(quote "${sbatch_cmd[@]}")" >&2
job_id="$(sbatch --parsable "${sbatch_cmd[@]:1}")"
job_id="${job_id%%;*}"  # --parsable prints JOBID or JOBID;CLUSTER
echo "submitted job $job_id; log: $repo_root/$job_name-$job_id.out" >&2
echo "follow it with: tail -F $(quote "$repo_root/$job_name-$job_id.out")" >&2
