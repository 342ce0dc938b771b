#!/usr/bin/env bash
# The ratio benchmarks at GPU-sized shapes, on a machine with an accelerator, in < 8 min.
#
#   bash benchmarks/device_suite.sh [--smoke] [OUTDIR]
#
# Runs, through benchmarks/run_all.py (one process per configuration):
#   train_step.py   LoRA factorized vs full fine-tuning vs merge-then-call (d=2048, 8 layers)
#   qlora_train.py  a LoRA step on a bf16 vs int8 vs NF4 base
#   dora.py         DoRA vs LoRA vs DoRA merge-then-call (d=4096 stack)
#   moe.py          mixture-of-experts LoRA (ragged_dot) vs full vs merged
#   decode.py       decode/prefill with N adapters: gathered vs grouped (ragged_dot) vs merged
#   latency.py      inference latency, merged vs unmerged LoRA vs Houlsby (GPT-2 medium)
# and writes benchmarks.json + benchmarks.md into OUTDIR (default: $OUT if set, else
# results/device). The JSON is run_all.py's, so benchmarks/compare.py reads it
# (compare two device runs with --baseline; CPU and device runs use other flags).
#
# Install: this checkout goes on PYTHONPATH (pip install -e . if flax, optax, chex or
# numpy is missing); if JAX sees no accelerator, `pip install -U "jax[cuda13]==<installed jax>"` is tried
# (JAX's install docs; cuda12 as a fallback), which needs the network. A machine without
# one must already hold JAX with its CUDA plugin, flax, optax, chex and numpy.
#
# --smoke shrinks every shape so that the whole suite runs on 2 CPU cores in < 3 min
# (on an idle machine): a test of this script, not a measurement. SUITE_TIMEOUT=S
# changes the per-script limit (75 s; 120 s with --smoke).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-python3}
SMOKE=0
DIR=""
for arg in "$@"; do
    case "$arg" in
        --smoke) SMOKE=1 ;;
        -h | --help) sed -n '2,24p' "${BASH_SOURCE[0]}"; exit 0 ;;
        *) DIR=$arg ;;
    esac
done
DIR=${DIR:-${OUT:-$ROOT/results/device}}
mkdir -p "$DIR"
cd "$ROOT"

backend() { "$PY" -c 'import jax; print(jax.default_backend())' 2>/dev/null || echo none; }

# --- install -------------------------------------------------------------------------
if [ "$SMOKE" = 0 ] && [ "$(backend)" != gpu ] && [ "$(backend)" != tpu ]; then
    version=$("$PY" -c 'import jax; print(jax.__version__)' 2>/dev/null || true)
    pin=${version:+==$version}
    echo "JAX backend is $(backend): installing jax[cuda13]$pin" >&2
    "$PY" -m pip install -q -U "jax[cuda13]$pin" || "$PY" -m pip install -q -U "jax[cuda12]$pin" ||
        echo "could not install JAX's CUDA plugin (no network?); running on $(backend)" >&2
fi
# lorax_fn from this checkout: on the path if its dependencies are there, else installed.
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
if ! "$PY" -c 'import flax, optax, chex, numpy' 2>/dev/null; then
    "$PY" -m pip install -q -e "$ROOT"
fi
"$PY" -c 'import lorax_fn, jax; print("lorax_fn", lorax_fn.__file__, "on", jax.devices())'

# --- settings: script=flags ----------------------------------------------------------
if [ "$SMOKE" = 1 ]; then
    decoder="--d 64 --heads 4 --layers 2 --seq 16 --batch 2 --vocab 256 --rank 4 --repeats 2"
    runs=(
        "train_step.py=$decoder"
        "qlora_train.py=$decoder"
        "dora.py=--layers 2 --d 64 --tokens 64 --rank 4 --repeats 2"
        "moe.py=--layers 1 --d 64 --hidden 128 --experts 4 --seq 16 --batch 2 --rank 4 --repeats 2"
        "decode.py=--batch 4 --prompt 8 --max-len 16 --adapters 1 4 --chunk 2 --repeats 2
            --prefill-repeats 1 --loop-steps 3 --loop-prompt 4"
        "latency.py=--layers 2 --d 64 --heads 4 --vocab 256 --seq 16 --houlsby 8 --repeats 2"
    )
    timeout=120
else
    # GPT-2-XL-wide decoder, 8 layers, 4096 tokens per step: ~11 TFLOP per full step.
    decoder="--d 2048 --heads 16 --layers 8 --seq 512 --batch 8 --vocab 32000 --rank 16"
    runs=(
        "train_step.py=$decoder --repeats 10"
        "qlora_train.py=$decoder --repeats 10"
        "dora.py=--layers 8 --d 4096 --tokens 8192 --rank 16 --repeats 10"
        "moe.py=--layers 4 --d 1024 --hidden 4096 --experts 8 --seq 512 --batch 8 --rank 16
            --repeats 10"
        "decode.py=--batch 256 --prompt 256 --max-len 512 --adapters 1 8 64 256 --repeats 20
            --prefill-repeats 5"
        "latency.py=--batch 8 --seq 512 --repeats 20"
    )
    # Six scripts, each stopped (its finished rows kept) after 75 s: < 8 min in all.
    timeout=75
fi

only=()
flags=()
for run in "${runs[@]}"; do
    only+=("${run%%=*}")
    flags+=(--args "$(echo "$run" | tr -s ' \n' ' ')")
done
timeout=${SUITE_TIMEOUT:-$timeout}  # seconds per script; a loaded machine needs more
start=$SECONDS
"$PY" benchmarks/run_all.py --out "$DIR" --timeout "$timeout" --only "${only[@]}" "${flags[@]}" |
    tee "$DIR/log.txt"
echo "device suite: $((SECONDS - start)) s; wrote $DIR/benchmarks.json and $DIR/benchmarks.md"
