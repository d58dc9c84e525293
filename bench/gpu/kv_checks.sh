#!/usr/bin/env bash
# CUDA checks of the KV types of lacq's patch series (issue 19), run on the GPU host from a copy of this
# checkout with the patched source packed by pack-for-gpu into .gpu/kvsrc/llama-src.tar.xz:
#   bash bench/gpu/kv_checks.sh build [WAIT_S]  unpack, configure (sm_90, test targets only), build detached,
#                                                then wait up to WAIT_S seconds for it
#   bash bench/gpu/kv_checks.sh tests [WAIT_S]  wait for the build, then test-backend-ops on the four KV ops for
#                                                every case of a turbo, tqs or tql type, and test-kv-bytes on CUDA0
# Logs and a summary go to $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
SRC=/tmp/g/llama.cpp
B=/tmp/g/build

wait_build() {
  for _ in $(seq 1 $(( ${1:-0} / 10 ))); do grep -q '^rc=' /tmp/build.log 2>/dev/null && break; sleep 10; done
  tail -n 3 /tmp/build.log
  grep -q '^rc=0' /tmp/build.log
}

case "$1" in
build)
  mkdir -p /tmp/g && tar -C /tmp/g -xJf .gpu/kvsrc/llama-src.tar.xz
  nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
  cmake -S "$SRC" -B "$B" -G Ninja -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 -DCMAKE_BUILD_TYPE=Release \
    -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=ON -DLLAMA_BUILD_SERVER=OFF > /tmp/cfg.log 2>&1 \
    || { tail -n 30 /tmp/cfg.log; exit 1; }
  setsid nohup bash -c "cmake --build $B -j 16 --target test-backend-ops test-kv-bytes; echo rc=\$?" \
    > /tmp/build.log 2>&1 < /dev/null &
  wait_build "${2:-0}" ;;
tests)
  if ! wait_build "${2:-0}"; then grep -h -B2 -A8 'error' /tmp/build.log | head -60; exit 1; fi
  {
    echo "device: $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader)"
    for op in SET_ROWS GET_ROWS CPY FLASH_ATTN_EXT; do
      "$B/bin/test-backend-ops" test -b CUDA0 -o "$op" -p 'turbo|tqs|tql' > "$OUT/tbo-$op.log" 2>&1
      echo "test-backend-ops test -b CUDA0 -o $op -p 'turbo|tqs|tql': $(grep -cE '\): .*OK' "$OUT/tbo-$op.log") OK," \
           "$(grep -c 'FAIL' "$OUT/tbo-$op.log") FAIL, $(grep -c 'not supported' "$OUT/tbo-$op.log") not supported;" \
           "$(grep -E 'tests passed' "$OUT/tbo-$op.log" | tail -n 1)"
    done
    grep -h 'no FlashAttention vector kernel' "$OUT/tbo-FLASH_ATTN_EXT.log" | sort -u
    "$B/bin/test-kv-bytes" -b CUDA0 > "$OUT/kv-bytes-cuda.txt" 2>&1
    echo "test-kv-bytes -b CUDA0: exit $?; $(tail -n 2 "$OUT/kv-bytes-cuda.txt" | tr '\n' ' ')"
  } | tee "$OUT/summary.txt" ;;
esac
