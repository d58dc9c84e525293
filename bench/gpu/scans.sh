#!/usr/bin/env bash
# The CUDA runs of issues 10 and 11 (this session's GPU work), run on the GPU host from a copy of
# this checkout, stage by stage, each stage one `device run` call:
#   .whl/          gguf and platformdirs wheels (the host's Python lacks them)
#   .gpu/pack/1/   the pinned llama.cpp source and SmolLM2 Q4_1 part 1 (../shared/tools/pack-for-gpu)
#   .gpu/pack/2/   SmolLM2 part 2
# Stages, in order: setup (unpack, start the CUDA build of the whole patch series with test-backend-ops),
# model (join the model, wait for the build), tests (test-backend-ops on SET_ROWS, GET_ROWS, CPY,
# FLASH_ATTN_EXT: every case, counted; patch 0003's backend checks through bench/gpu/patch_checks.sh),
# scans-w (the weight scan at 20, 4, 2 and 1 chunks: the chunk-count study), scans-kv (the KV scan of V
# over the turbo family at 20 chunks), parity (`lacq parity` on the CPU and CUDA builds against one CPU-made
# reference, and `lacq compare` of the two), verify (bench/gpu/verify.py). Results land in $OUT.
# Second session (patches 0009-0012): kernels (test-backend-ops counts, test-kv-bytes on CUDA0, the mixed
# turbo pairs with and without their kernels (GGML_CUDA_FA_MIXED_TURBO=0), decode speed of a turbo-K boundary
# policy before/after, the tqs V types against q4_0: decode at depth 7680 and PPL on the F16 base), scan-t (the
# tensor-granularity weight scan over iq4_nl/q5_0/q6_k/q8_0), verify-t (optimized recipes at the stock mixes'
# sizes, measured at 20 chunks beside those mixes).
# Third session (patches 0013-0014, issue 13): tql (test-backend-ops on the tql cases of the four ops, test-kv-bytes
# on CUDA0, decode at depth 7680 with a tql/tqs/q4_0 V, PPL of the F16 base with a tql V; run after model;
# TQL_V="q4_0 tqs4 tql4" picks the V types of the PPL and decode runs).
. "$(dirname "$0")/env.sh"
bin() { lacq build --backend cuda --source "$SRC" --target test-backend-ops --target test-kv-bytes --print-path; }

case "$1" in
setup)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  bash .gpu/pack/1/collect.sh $G
  nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
  setsid nohup bash -c "python3 -m lacq build --backend cuda --source $SRC --target test-backend-ops \
    --target test-kv-bytes; echo rc=\$?" > /tmp/build.log 2>&1 < /dev/null &
  sleep 20; tail -n 2 /tmp/build.log ;;
model)
  bash .gpu/pack/2/collect.sh $G
  for _ in $(seq 1 "${2:-55}"); do grep -q '^rc=' /tmp/build.log && break; sleep 10; done
  tail -n 3 /tmp/build.log
  grep -q '^rc=0' /tmp/build.log || { grep -h -B2 -A8 'error' $(find $LACQ_HOME -name lacq-build.log) | head -60; exit 1; } ;;
tests)
  B=$(bin)
  for op in SET_ROWS GET_ROWS CPY FLASH_ATTN_EXT; do
    "$B/test-backend-ops" test -b CUDA0 -o "$op" > "$OUT/tbo-$op.log" 2>&1
    python3 .ci/backend_ops_summary.py --backend CUDA0 "$OUT/tbo-$op.log" 2>&1 | tail -n 3
  done
  mkdir -p .gpu/build && ln -sfn "$B" .gpu/build/bin
  OUT=$OUT/patch_checks bash bench/gpu/patch_checks.sh run "$MODEL" ;;
scans-w)
  B=$(bin)
  [ -f $G/f16.gguf ] || "$B/llama-quantize" --allow-requantize "$MODEL" $G/f16.gguf F16 > /dev/null 2>&1
  for n in 20 4 2 1; do
    lacq scan weights "$MODEL" --base $G/f16.gguf --unit block,group --chunks $n --backend cuda --source "$SRC" \
      -o "$OUT/scan_weights_cuda_n$n.json" > "$OUT/scan_weights_cuda_n$n.txt" 2>/dev/null
    tail -n 1 "$OUT/scan_weights_cuda_n$n.txt"
  done ;;
scans-kv)
  lacq scan kv "$MODEL" --types turbo2,turbo3,turbo4,q8_0 --chunks 20 --backend cuda --source "$SRC" \
    -o "$OUT/scan_kv_cuda.json" > "$OUT/scan_kv_cuda.txt" 2>/dev/null
  tail -n 1 "$OUT/scan_kv_cuda.txt" ;;
verify)
  # Predicted against measured for ten size and ten bits budgets, and the baselines (bench/gpu/verify.py).
  R=bench/results/gpu-2026-11-24
  [ -f $G/f16.gguf ] || "$(bin)/llama-quantize" --allow-requantize "$MODEL" $G/f16.gguf F16 > /dev/null 2>&1
  python3 bench/gpu/verify.py --scan-weights $R/scan_weights_cuda_n20.json --scan-kv $R/scan_kv_cuda.json \
    --source "$SRC" --model "$MODEL" --base $G/f16.gguf --out "$OUT/verify" 2>&1 | tail -n 40
  rm -f "$OUT"/verify/*.gguf; tar -C "$OUT" -czf "$OUT/verify.tgz" verify && rm -rf "$OUT/verify" ;;
parity)
  # One f16-cache reference made by the CPU build (16 threads here), both backends measured against it.
  lacq parity --backend cpu --source "$SRC" --model "$MODEL" --no-backend-ops --out "$OUT/parity-cpu.json" \
    > "$OUT/parity-cpu.txt" 2>&1; tail -n 3 "$OUT/parity-cpu.txt"
  REF=$(python3 -c "import json; print(json.load(open('$OUT/parity-cpu.json'))['reference']['path'])")
  lacq parity --backend cuda --source "$SRC" --model "$MODEL" --base-logits "$REF" --out "$OUT/parity-cuda.json" \
    > "$OUT/parity-cuda.txt" 2>&1; tail -n 3 "$OUT/parity-cuda.txt"
  lacq compare "$OUT/parity-cpu.json" "$OUT/parity-cuda.json" --allow-partial --format md | tee "$OUT/parity-compare.md" ;;
kernels)
  B=$(bin)
  for op in SET_ROWS GET_ROWS CPY FLASH_ATTN_EXT; do
    "$B/test-backend-ops" test -b CUDA0 -o "$op" > "$OUT/tbo-$op.log" 2>&1
    echo "$op: $(python3 .ci/backend_ops_summary.py --backend CUDA0 "$OUT/tbo-$op.log" 2>&1 | tail -n 1)"
  done
  "$B/test-kv-bytes" -b CUDA0 > "$OUT/kv-bytes-cuda.txt" 2>&1; echo "test-kv-bytes rc=$?: $(tail -n 1 "$OUT/kv-bytes-cuda.txt")"
  MIXED='type_K=turbo2,type_V=(q8_0|f16|turbo3|turbo4),|type_K=turbo3,type_V=(q8_0|f16|turbo2|turbo4),|type_K=turbo4,type_V=(q8_0|f16|turbo2|turbo3),'
  # GGML_CUDA_FA_MIXED_TURBO=0 hid the mixed-pair kernels for the before/after rows of kernels_cuda.md; the
  # switch left the dispatch path afterwards (issue 19), so only the run with the kernels remains
  for m in 1; do
    GGML_CUDA_FA_MIXED_TURBO=$m "$B/test-backend-ops" test -b CUDA0 -o FLASH_ATTN_EXT -p "$MIXED" > "$OUT/tbo-mixed-$m.log" 2>&1
    echo "mixed pairs, GGML_CUDA_FA_MIXED_TURBO=$m: $(grep -c 'FLASH_ATTN_EXT(.*OK' "$OUT/tbo-mixed-$m.log") OK," \
      "$(grep -c 'FAIL' "$OUT/tbo-mixed-$m.log") FAIL, f16-fallback warnings: $(grep -c 'no FlashAttention vector kernel' "$OUT/tbo-mixed-$m.log")"
  done
  [ -f $G/f16.gguf ] || "$B/llama-quantize" --allow-requantize "$MODEL" $G/f16.gguf F16 > /dev/null 2>&1
  for m in 1; do  # decode with K turbo3 and V q8_0 on the four boundary layers
    GGML_CUDA_FA_MIXED_TURBO=$m lacq bench "$MODEL" --backend cuda --source "$SRC" -ngl 99 --ctk turbo3 --ctv turbo3 \
      --boundary 2 --depth 0,4096 --pp 512 --tg 128 -r 3 --label "turbo3 boundary 2 mixed=$m" --format md \
      > "$OUT/bench-mixed-$m.md" 2>/dev/null; cat "$OUT/bench-mixed-$m.md"
  done
  for v in q4_0 q8_0 turbo3 turbo4 tqs3 tqs4; do  # issue 13: decode at depth 7680, K q8_0
    lacq bench "$MODEL" --backend cuda --source "$SRC" -ngl 99 --ctk q8_0 --ctv $v --depth 7680 --pp 512 --tg 128 -r 3 \
      --label "V $v" --format md > "$OUT/bench-v-$v.md" 2>/dev/null; tail -n 2 "$OUT/bench-v-$v.md"
  done
  for v in f16 q4_0 q8_0 turbo3 turbo4 tqs2 tqs3 tqs4; do  # PPL on the F16 base (CPU figures: same command, --backend cpu)
    lacq ppl $G/f16.gguf --backend cuda --source "$SRC" -ngl 99 --ctk q8_0 --ctv $v --chunks 20 --json \
      > "$OUT/ppl-v-$v.json" 2>/dev/null; python3 -c "import json,sys; d=json.load(open(sys.argv[1])); m=d['metrics']; print('$v', m['ppl'], m.get('ppl_error'))" "$OUT/ppl-v-$v.json"
  done
  tar -C "$OUT" -czf "$OUT/kernels-logs.tgz" tbo-SET_ROWS.log tbo-GET_ROWS.log tbo-CPY.log tbo-FLASH_ATTN_EXT.log \
    tbo-mixed-1.log tbo-mixed-0.log && rm -f "$OUT"/tbo-*.log ;;
tql)
  B=$(bin)
  for op in SET_ROWS GET_ROWS CPY FLASH_ATTN_EXT; do
    "$B/test-backend-ops" test -b CUDA0 -o "$op" -p tql > "$OUT/tbo-tql-$op.log" 2>&1
    echo "$op (tql): $(python3 .ci/backend_ops_summary.py --backend CUDA0 "$OUT/tbo-tql-$op.log" 2>&1 | tail -n 1)"
  done
  "$B/test-kv-bytes" -b CUDA0 > "$OUT/kv-bytes-cuda.txt" 2>&1; echo "test-kv-bytes rc=$?: $(tail -n 2 "$OUT/kv-bytes-cuda.txt")"
  [ -f $G/f16.gguf ] || "$B/llama-quantize" --allow-requantize "$MODEL" $G/f16.gguf F16 > /dev/null 2>&1
  for v in ${TQL_V:-tql2 tql3 q4_0 tqs2 tqs3}; do  # PPL on the F16 base (CPU figures: same command, --backend cpu)
    lacq ppl $G/f16.gguf --backend cuda --source "$SRC" -ngl 99 --ctk q8_0 --ctv $v --chunks 20 --json \
      > "$OUT/ppl-v-$v.json" 2>/dev/null; python3 -c "import json,sys; d=json.load(open(sys.argv[1])); m=d['metrics']; print('$v', m['ppl'], m.get('ppl_error'))" "$OUT/ppl-v-$v.json"
  done
  for v in ${TQL_V:-q4_0 tql2 tql3 tqs2 tqs3}; do  # decode at depth 7680, K q8_0
    lacq bench "$MODEL" --backend cuda --source "$SRC" -ngl 99 --ctk q8_0 --ctv $v --depth 7680 --pp 512 --tg 128 -r 3 \
      --label "V $v" --format md > "$OUT/bench-v-$v.md" 2>/dev/null; tail -n 2 "$OUT/bench-v-$v.md"
  done
  (cd "$OUT" && tar -czf tql-run.tgz tbo-tql-*.log ppl-v-*.json bench-v-*.md kv-bytes-cuda.txt \
    && rm -f tbo-tql-*.log ppl-v-*.json bench-v-*.md) ;;  # $OUT returns at most 8 files
scan-t)
  [ -f $G/f16.gguf ] || "$(bin)/llama-quantize" --allow-requantize "$MODEL" $G/f16.gguf F16 > /dev/null 2>&1
  timeout "${2:-540}" python3 -m lacq scan weights "$MODEL" --base $G/f16.gguf --unit tensor --types iq4_nl,q5_0,q6_k,q8_0 \
    --chunks 4 --jobs 8 -t 2 --backend cuda --source "$SRC" -o "$OUT/scan_weights_tensor_cuda.json" \
    > "$OUT/scan_weights_tensor_cuda.txt" 2>"$OUT/scan_weights_tensor_cuda.err"
  echo "rc=$?"; tail -n 3 "$OUT/scan_weights_tensor_cuda.err"; tail -n 1 "$OUT/scan_weights_tensor_cuda.txt" ;;
verify-t)
  R=${2:-$OUT/scan_weights_tensor_cuda.json}
  [ -f $G/f16.gguf ] || "$(bin)/llama-quantize" --allow-requantize "$MODEL" $G/f16.gguf F16 > /dev/null 2>&1
  python3 bench/gpu/verify_tensor.py --scan "$R" --source "$SRC" --model "$MODEL" --base $G/f16.gguf \
    --out "$OUT/verify-t" 2>&1 | tail -n 40
  rm -f "$OUT"/verify-t/*.gguf; tar -C "$OUT" -czf "$OUT/verify-t.tgz" verify-t && rm -rf "$OUT/verify-t" ;;
verify-kv)
  # KV budgets again after the K-type fix of the policy writer and the new search (bench/gpu/verify.py, KV part)
  python3 bench/gpu/verify.py --scan-kv bench/results/gpu-2026-11-24/scan_kv_cuda.json --source "$SRC" --model "$MODEL" \
    --base "$MODEL" --out "$OUT/verify-kv" 2>&1 | tail -n 30
  tar -C "$OUT" -czf "$OUT/verify-kv.tgz" verify-kv && rm -rf "$OUT/verify-kv" ;;
esac
