#!/usr/bin/env bash
# The prepared H200 run, one command, under 10 minutes: three independent stages, each with its own
# timeout, each writing its JSON under $OUT as soon as it has it (a later failure loses nothing):
#   preflight  (<= 90 s)  the GPU, versions, measured bf16 matmul rate, datasheet peak, plan's sizes
#   block      (<= 150 s) our MoE block vs the dense MLP vs HF Mixtral, 4096/14336, 8k and 32k tokens, bf16
#   step       (<= 330 s) whole training steps at Llama-3-8B's layer shapes (3 layers, seq 8192, micro-batch
#                         1, accumulation 4, bf16, ZeRO-2, fused torch AdamW), dense then upcycled 8x top-2;
#                         no checkpoint is written (train.save_final=false)
# What comes back (8 files at most): log.txt (the whole script), preflight.json, block.json, step.json,
# dense_summary.json, dense_metrics.jsonl, upcycled_summary.json, upcycled_metrics.jsonl.
#
# The device has torch and transformers but not deepspeed. Here, first:  bash benchmarks/make_wheels.sh
# (fills the git-ignored .whl/), then run this script there with .whl carried along.
# SMOKE=1 runs the same stages on the CPU with tiny shapes (tests/test_gpu_readiness.py does).
set -uo pipefail  # no -e: a failing stage must not stop the next one
OUT=${OUT:-bench_out}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/log.txt") 2>&1

if ! python3 -c "import deepspeed" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD PYTHONUNBUFFERED=1

stage() {  # stage NAME SECONDS COMMAND...: run with a time limit and report. `timeout` signals its whole
  # process group, so the launcher and ranks a stage started end with it (they start no sessions of their own).
  local name=$1 limit=$2 start=$SECONDS
  shift 2
  echo "== stage $name (limit ${limit} s): $*"
  timeout --kill-after=15 "$limit" "$@"
  echo "== stage $name: exit $? after $((SECONDS - start)) s"
}

if [ "${SMOKE:-0}" = 1 ]; then
  preflight=(--smoke) block=(--device cpu --dtype fp32 --shapes smollm2 --tokens 64 --repeats 1) step=(--smoke)
else
  preflight=() block=(--device cuda --dtype bf16 --shapes llama3-8b --tokens 8192 32768 --repeats 5) step=()
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
fi
stage preflight 90 python3 -m ds_upcycle bench preflight "${preflight[@]}" --json "$OUT/preflight.json"
stage block 150 python3 -m ds_upcycle bench block "${block[@]}" --json "$OUT/block.json"
stage step 330 python3 -m ds_upcycle bench gpu "${step[@]}" --workdir "${WORKDIR:-/tmp/ds_upcycle_gpu}" \
  --copy-runs "$OUT" --json "$OUT/step.json" ${MASTER_PORT:+--master-port "$MASTER_PORT"}
echo "== done; files in $OUT:"
ls -la "$OUT"
