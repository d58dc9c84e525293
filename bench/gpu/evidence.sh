#!/usr/bin/env bash
# The GPU session behind issues 19-21's CUDA figures, run on the GPU host from a copy of this checkout.
# Uploads are limited (64 MiB a call, the tracked tree counted), so the inputs come in two carried folders:
#   .whl/     gguf and platformdirs wheels (the host's Python lacks them)
#   .gpu/s1/  llama-src.tar.xz: the pinned tree without models/, docs/, media/ and the ggml backends lacq never
#             builds (made from lacq's pinned source with tar --exclude); train.npy.xz.part00: the first part of
#             the clean base's training tokens (scripts/make_clean_base.py data, then xz of train.npy, cut in two)
#   .gpu/s2/  train.npy.xz.part01, val.npy; kv.bin and shapes.json (SmolLM2's metadata and tensor shapes, see
#             bench/gpu/engine_cuda.sh) for the SmolLM2-shaped random model of the engine's timing
# Stages, each one call, in order:
#   start         wheels, source; `lacq build --backend cuda` (tools, test-backend-ops, test-kv-bytes) detached
#   train [S]     the rest of the tokens; the clean base's training detached; then wait up to S s for the build
#   wait [S]      wait up to S s for the build and the training; weights.npz in parts to $OUT when trained
#   kvchecks      bench/gpu/kv_checks.sh's checks (test-kv-bytes, test-backend-ops on the KV ops) on this build
#   engine        lacq scan weights of the SmolLM2-shaped random model, tensor units, six k-quant candidates:
#                 the engine against one process per variant
set -uo pipefail
export LACQ_HOME=/tmp/lh PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$PWD
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
G=/tmp/g; SRC=$G/llama.cpp; CB=/tmp/cb; E=/tmp/e
bin() { python3 -m lacq build --backend cuda --cuda-arch 90 --source "$SRC" --target test-backend-ops \
          --target test-kv-bytes --print-path; }
build_done() { grep -q '^rc=' /tmp/build.log 2>/dev/null; }
train_done() { [ -f $CB/train.json ]; }
wait_for() {  # up to $1 seconds for the build (and the training, when it runs)
  for _ in $(seq 1 $(( ${1:-0} / 10 ))); do
    build_done && { [ ! -f /tmp/train.log ] || train_done; } && break; sleep 10
  done
  echo "build: $(tail -n 2 /tmp/build.log | tr '\n' ' ')"
  [ -f /tmp/train.log ] && echo "train: $(tail -n 2 /tmp/train.log | tr '\n' ' ')"
  if build_done && ! grep -q '^rc=0' /tmp/build.log; then
    grep -h -B2 -A6 ' error' $(find "$LACQ_HOME" -name '*build*.log') 2>/dev/null | head -60
  fi
  return 0
}

case "$1" in
start)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  mkdir -p $G $CB $E && tar -C $G -xJf .gpu/s1/llama-src.tar.xz && cp .gpu/s1/train.npy.xz.part00 $CB/
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; nproc
  setsid nohup bash -c "python3 -m lacq build --backend cuda --cuda-arch 90 --source $SRC --target test-backend-ops \
    --target test-kv-bytes; echo rc=\$?" > /tmp/build.log 2>&1 < /dev/null &
  sleep 15; tail -n 3 /tmp/build.log ;;
train)
  cp .gpu/s2/train.npy.xz.part01 .gpu/s2/val.npy $CB/ && cp .gpu/s2/kv.bin .gpu/s2/shapes.json $E/
  cat $CB/train.npy.xz.part00 $CB/train.npy.xz.part01 > $CB/train.npy.xz && rm $CB/train.npy.xz.part0*
  cp scripts/make_clean_base.py /tmp/make_clean_base.py
  setsid nohup python3 /tmp/make_clean_base.py train --work $CB --device cuda --budget-s "${TRAIN_S:-420}" \
    > /tmp/train.log 2>&1 < /dev/null &
  wait_for "${2:-0}" ;;
wait)
  wait_for "${2:-0}"
  if train_done && [ ! -f $OUT/train.json ]; then
    cp $CB/train.json $OUT/ && (cd $CB && split -b 15M -d -a 2 weights.npz "$OUT/weights.npz.part")
  fi ;;
kvchecks)
  B=$(bin) || exit 1
  {
    echo "device: $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader)"
    "$B/test-kv-bytes" -b CUDA0 > "$OUT/kv-bytes-cuda.txt" 2>&1
    echo "test-kv-bytes -b CUDA0: exit $?; $(tail -n 2 "$OUT/kv-bytes-cuda.txt" | tr '\n' ' ')"
    for op in SET_ROWS GET_ROWS CPY FLASH_ATTN_EXT; do
      "$B/test-backend-ops" test -b CUDA0 -o "$op" -p 'turbo|tqs|tql' > /tmp/tbo-$op.log 2>&1
      echo "test-backend-ops test -b CUDA0 -o $op -p 'turbo|tqs|tql': exit $?, $(grep -cE '\): .*OK' /tmp/tbo-$op.log) OK," \
           "$(grep -c 'FAIL' /tmp/tbo-$op.log) FAIL, $(grep -c 'not supported' /tmp/tbo-$op.log) not supported;" \
           "$(grep -E 'tests passed' /tmp/tbo-$op.log | tail -n 1)"
    done
    grep -h 'no FlashAttention vector kernel\|falls back\|fallback' /tmp/tbo-FLASH_ATTN_EXT.log | sort | uniq -c | head
    grep -h 'FAIL' /tmp/tbo-*.log | head -20
  } 2>&1 | tee "$OUT/kvchecks.txt"
  xz -c /tmp/tbo-FLASH_ATTN_EXT.log > "$OUT/tbo-FLASH_ATTN_EXT.log.xz" ;;
esac
