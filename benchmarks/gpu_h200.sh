#!/usr/bin/env bash
# The GPU benchmark, prepared for one H200 (about 5 minutes): the MoE block in bf16, then a whole
# ZeRO-2 bf16 training step of a 0.89 B Llama (5.1 B upcycled), dense and upcycled to 8 experts top-2, with MFU
# against the card's measured bf16 matmul rate. The device machine has torch and transformers but
# not deepspeed: first, here, `bash benchmarks/make_wheels.sh` fills .whl/ (carry it along).
# Results land in $OUT (or ./bench_out).
set -euo pipefail
OUT=${OUT:-bench_out}
mkdir -p "$OUT"
if ! python3 -c "import deepspeed" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
python3 -m ds_upcycle bench block --device cuda --dtype bf16 --tokens 8192 32768 --repeats 7 --json "$OUT/block.json" | tee "$OUT/block.md"
python3 -m ds_upcycle bench gpu --steps 30 --seq-len 4096 --micro-batch 2 --workdir /tmp/ds_upcycle_gpu --json "$OUT/gpu.json" | tee "$OUT/gpu.md"
