#!/bin/bash
# Fill .whl/ (in the project root) with the wheels that the offline GPU machine's Python (3.12,
# with torch, transformers, numpy, safetensors, tqdm, psutil, einops, msgpack, ninja, py-cpuinfo,
# tokenizers, matplotlib and pytest already installed) lacks for benchmarks/gpu_h200.sh: deepspeed
# and its pydantic stack (typing-extensions too: pydantic-core needs a newer one than some images
# have). The benchmark reads .txt data without `datasets` and runs with W&B disabled, so neither
# travels. Pass extra package names for other work (e.g. gguf for the demo).
# Usage (from the project root):  bash benchmarks/make_wheels.sh [EXTRA_PACKAGE ...]
# Then, on the GPU machine, before running anything:
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
#     --target .site .whl/*.whl && export PYTHONPATH=$PWD/.site:$PWD || exit;
# .whl/ is git-ignored locally (.git/info/exclude); take it along with the working tree. Keep it
# small (well under 64 MiB).
set -euo pipefail
mkdir -p .whl
for p in /.whl/ /.site/; do grep -qx "$p" .git/info/exclude 2>/dev/null || echo "$p" >> .git/info/exclude; done
pip wheel --no-deps -q -w .whl "deepspeed==${DEEPSPEED_VERSION:-0.19.8}"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d .whl \
  hjson typing-extensions "pydantic==2.14.4" "pydantic-core==2.50.5" annotated-types typing-inspection \
  "$@"
du -sh .whl; ls .whl
