#!/usr/bin/env bash
# CUDA checks of the KV types of lacq's patch series (issue 19), run on the GPU host from a copy of this
# checkout with the patched source in .gpu/kvsrc/llama-src.tar.xz, packed from a patchdev worktree PD with
#   git -C PD archive --prefix=llama.cpp/ HEAD | tar -x -C /tmp/p && tar -C /tmp/p --exclude=llama.cpp/models \
#     --exclude=llama.cpp/docs -cJf .gpu/kvsrc/llama-src.tar.xz llama.cpp
# (only the top-level models/ may go: src/models holds the model graphs):
#   bash bench/gpu/kv_checks.sh build [WAIT_S]  unpack, configure (sm_90, test targets only), build detached,
#                                                then wait up to WAIT_S seconds for it
#   bash bench/gpu/kv_checks.sh tests [WAIT_S]  wait for the build, then test-backend-ops on the four KV ops for
#                                                every case of a turbo, tqs or tql type, and test-kv-bytes on CUDA0
# Logs and a summary go to $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
SRC=/tmp/kv19/llama.cpp
B=/tmp/kv19/build

wait_build() {
  for _ in $(seq 1 $(( ${1:-0} / 10 ))); do grep -q '^rc=' /tmp/kv19-build.log 2>/dev/null && break; sleep 10; done
  tail -n 3 /tmp/kv19-build.log
  grep -q '^rc=0' /tmp/kv19-build.log
}

case "$1" in
build)
  rm -rf /tmp/kv19 && mkdir -p /tmp/kv19 && tar -C /tmp/kv19 -xJf .gpu/kvsrc/llama-src.tar.xz
  nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
  cmake -S "$SRC" -B "$B" -G Ninja -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 -DCMAKE_BUILD_TYPE=Release \
    -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=ON -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_APP=OFF > /tmp/cfg.log 2>&1 \
    || { tail -n 30 /tmp/cfg.log; exit 1; }
  setsid nohup bash -c "cmake --build $B -j 16 --target test-backend-ops test-kv-bytes; echo rc=\$?" \
    > /tmp/kv19-build.log 2>&1 < /dev/null &
  wait_build "${2:-0}" ;;
tests)
  if ! wait_build "${2:-0}"; then grep -h -B2 -A8 'error' /tmp/kv19-build.log | head -60; exit 1; fi
  {
    echo "device: $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader)"
    "$B/bin/test-kv-bytes" -b CUDA0 > "$OUT/kv-bytes-cuda.txt" 2>&1
    echo "test-kv-bytes -b CUDA0: exit $?; $(tail -n 2 "$OUT/kv-bytes-cuda.txt" | tr '\n' ' ')"
    for op in SET_ROWS GET_ROWS CPY FLASH_ATTN_EXT; do
      "$B/bin/test-backend-ops" test -b CUDA0 -o "$op" -p 'turbo|tqs|tql' > "$OUT/tbo-$op.log" 2>&1
      echo "test-backend-ops test -b CUDA0 -o $op -p 'turbo|tqs|tql': $(grep -cE '\): .*OK' "$OUT/tbo-$op.log") OK," \
           "$(grep -c 'FAIL' "$OUT/tbo-$op.log") FAIL, $(grep -c 'not supported' "$OUT/tbo-$op.log") not supported;" \
           "$(grep -E 'tests passed' "$OUT/tbo-$op.log" | tail -n 1)"
    done
    grep -h 'no FlashAttention vector kernel' "$OUT/tbo-FLASH_ATTN_EXT.log" | sort -u
  } | tee "$OUT/summary.txt" ;;
esac
