#!/usr/bin/env bash
# The GPU measurements of benchmarks/README.md in one command, on one H100 / H200 (or any
# single NVIDIA GPU with bf16):
#
#   bash benchmarks/gpu.sh [PHASE ...]        (default: every phase, in this order)
#
#   plan         memory plans of ViT-B/16 512 and ViT-L/16 640 (host only, seconds)
#   b16          ViT-B/16 Segmenter + MLSeg 512, batch 8, with a profile and the timm peer
#   b16-largest  the same at the largest batch that fits (--sweep-batch)
#   l16          ViT-L/16 640, batch 8, remat (nothing_saveable), then without remat
#   l16-largest  ViT-L/16 640, largest batch with remat
#
# Each phase takes a few minutes (most of it compiling); give a 10-minute slot one or two.
# Results go to $RESULTS (default ./bench_out): one JSON and one table per phase, the whole
# log, and the profile traces. Where $OUT is set (a batch system's output folder), they
# are also packed into $OUT/results.tar.gz beside a copy of the log.
#
# Packages: requirements.txt. On a machine without a package index, wheels in .whl/
# (grain, array-record, portpicker, ml_collections, tensorboardX for Python 3.12) are
# installed into /tmp/site first when grain is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

out="${RESULTS:-bench_out}"
mkdir -p "$out"
log="$out/log.txt"
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-.95}"
export PYTHONUNBUFFERED=1
python="${PYTHON:-python3}"

if ! "$python" -c "import grain, ml_collections" 2>/dev/null; then
  if compgen -G ".whl/*.whl" >/dev/null; then
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
  else
    echo "grain / ml_collections missing: pip install -r requirements.txt" >&2
    exit 1
  fi
fi

{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || true
  "$python" -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__); print(jax.devices())"
} 2>&1 | tee -a "$log"

B16=configs/segmenter_mlseg_vit_b16_512_160k_ade20k.py
L16=configs/segmenter_mlseg_vit_l16_640_160k_ade20k.py
FAST=(--config.model.dtype=bfloat16 --config.model.attention_impl=cudnn)
failed=()

bench() {  # name, then bench arguments
  local name=$1
  shift
  echo "=== $name: python -m benchmarks.bench $*" | tee -a "$log"
  if "$python" -m benchmarks.bench "$@" --json "$out/$name.json" 2>&1 | tee -a "$log" \
      > "$out/$name.stdout"; then
    grep -v '^[IWE][0-9]\{4\} ' "$out/$name.stdout" > "$out/$name.txt" || true
  else
    echo "=== $name FAILED" | tee -a "$log"
    failed+=("$name")
  fi
  rm -f "$out/$name.stdout"
}

phase() {
  case "$1" in
    plan)
      bench plan_b16_b32 --config "$B16" --batch 32 --plan "${FAST[@]}"
      bench plan_l16_b8 --config "$L16" --batch 8 --plan "${FAST[@]}" ;;
    b16)
      bench b16_b8 --config "$B16" --batch 8 --steps 50 --profile /tmp/profile_b16_b8 \
        "${FAST[@]}" ;;
    b16-largest)
      bench b16_largest --config "$B16" --batch 8 --steps 30 --sweep-batch --no-torch \
        --eval-images 2 "${FAST[@]}" ;;
    l16)
      bench l16_b8_remat --config "$L16" --batch 8 --steps 20 --no-torch --eval-images 2 \
        --config.model.remat=True "${FAST[@]}"
      bench l16_b8 --config "$L16" --batch 8 --steps 20 --no-torch --eval-images 0 \
        "${FAST[@]}" ;;
    l16-largest)
      bench l16_largest_remat --config "$L16" --batch 8 --steps 10 --sweep-batch --no-torch \
        --eval-images 0 --config.model.remat=True "${FAST[@]}" ;;
    *)
      echo "unknown phase $1 (plan b16 b16-largest l16 l16-largest)" >&2
      exit 2 ;;
  esac
}

phases=("$@")
[ ${#phases[@]} -eq 0 ] && phases=(plan b16 b16-largest l16 l16-largest)
for p in "${phases[@]}"; do
  phase "$p"
done
if [ -d /tmp/profile_b16_b8 ]; then
  rm -rf "$out/profile_b16_b8"
  cp -r /tmp/profile_b16_b8 "$out/"
fi
if [ -n "${OUT:-}" ]; then
  tar -czf "$OUT/results.tar.gz" -C "$(dirname "$out")" "$(basename "$out")"
  cp "$log" "$OUT/log.txt"
fi
if [ ${#failed[@]} -gt 0 ]; then
  echo "failed: ${failed[*]}" | tee -a "$log"
  exit 1
fi
