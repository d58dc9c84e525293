# Sourced by the GPU-host scripts of bench/gpu/: where the carried checkout puts things on the host.
set -uo pipefail
export LACQ_HOME=/tmp/lh PYTHONUNBUFFERED=1
export PYTHONPATH=/tmp/site:$PWD
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
G=/tmp/g
SRC=$G/llama.cpp
MODEL=$G/model.gguf
lacq() { python3 -m lacq "$@"; }
