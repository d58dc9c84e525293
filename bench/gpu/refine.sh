#!/usr/bin/env bash
# The third GPU session of issue 10: measured refinement (`lacq optimize … --refine`), KV scan times on CUDA,
# gemma-3-270m's KV scan on CUDA. Run on the GPU host from a copy of this checkout, one stage per `device run`:
#   .whl/          gguf and platformdirs wheels (the host's Python lacks them)
#   .gpu/pack/N/   the pinned llama.cpp source and SmolLM2 Q4_1, in parts (../shared/tools/pack-for-gpu)
#   .gpu/gpack/N/  gemma-3-270m Q4_K_M, in parts
# Stages: setup (unpack, start the CUDA build), part DIR DEST (collect one carried part), q4q8 (SmolLM2's
# tensor scan over q4_0/q8_0, the optimizer at first8_q8's 105.9 MB with and without --refine, both files at
# 20 chunks), kv-smol (SmolLM2's turbo KV scan, timed, then bench/kv_optimize.py at 3.3 b/v), kv-gemma
# (gemma's turbo KV scan, timed), kv-gemma-opt BUDGETS (bench/kv_optimize.py on it, refined rows beside).
. "$(dirname "$0")/env.sh"
GEMMA=$G/gemma/model.gguf
CUDA="--backend cuda --source $SRC"

case "$1" in
setup)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  bash .gpu/pack/1/collect.sh $G
  nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
  setsid nohup bash -c "python3 -m lacq build $CUDA; echo rc=\$?" > /tmp/build.log 2>&1 < /dev/null &
  sleep 5; tail -n 2 /tmp/build.log ;;
part)
  bash "$2/collect.sh" "$3"; tail -n 1 /tmp/build.log ;;
wait)
  for _ in $(seq 1 "${2:-55}"); do grep -q '^rc=' /tmp/build.log && break; sleep 10; done
  tail -n 3 /tmp/build.log
  grep -q '^rc=0' /tmp/build.log || { grep -h -B2 -A8 'error' $(find $LACQ_HOME -name lacq-build.log) | head -60; exit 1; }
  B=$(lacq build $CUDA --print-path)
  [ -f $G/f16.gguf ] || "$B/llama-quantize" --allow-requantize "$MODEL" $G/f16.gguf F16 > /dev/null 2>&1
  ls -la $G ;;
q4q8)
  S=$OUT/scan_q4q8_tensor_cuda.json
  t0=$SECONDS; python3 -m lacq scan weights "$MODEL" --base $G/f16.gguf --unit tensor \
    --types q4_0,q8_0 --chunks 4 --jobs 8 -t 2 $CUDA -o "$S" > "$OUT/scan_q4q8.txt" 2> "$OUT/scan_q4q8.err"
  echo "scan wall $((SECONDS - t0)) s"; tail -n 1 "$OUT/scan_q4q8.err"; tail -n 1 "$OUT/scan_q4q8.txt"
  lacq optimize weights "$S" --size-mb 105.9 --name opt_q4q8_105_9 -o "$OUT/opt_q4q8_105_9.toml" --verify $CUDA \
    2>/dev/null | tail -n 2
  t0=$SECONDS; python3 -m lacq optimize weights "$S" --size-mb 105.9 --name opt_q4q8_105_9_r \
    -o "$OUT/opt_q4q8_105_9_r.toml" --verify --refine "${2:-3}" --jobs 8 -t 2 $CUDA > "$OUT/refine_q4q8.txt" 2> "$OUT/refine_q4q8.err"
  echo "refine wall $((SECONDS - t0)) s"; grep -v '^\[' "$OUT/refine_q4q8.txt" | tail -n 12; tail -n 1 "$OUT/refine_q4q8.err"
  for r in opt_q4q8_105_9 opt_q4q8_105_9_r; do
    lacq quantize --recipe "$OUT/$r.toml" $G/f16.gguf -o $G/$r.gguf --force $CUDA > /dev/null 2>&1
    lacq kld $G/$r.gguf --base $G/f16.gguf --chunks 20 $CUDA --json > "$OUT/kld20_$r.json" 2>/dev/null
    python3 -c "import json,sys; d=json.load(open(sys.argv[1])); m=d['metrics']; print('$r', d.get('model_bytes'), m['kld_mean'], m['kld_mean_error'], m['ppl_q'])" "$OUT/kld20_$r.json"
  done ;;
kv-smol)
  t0=$SECONDS; python3 -m lacq scan kv "$MODEL" --types turbo2,turbo3,turbo4,q8_0 --jobs "${2:-8}" \
    -t 2 $CUDA -o "$OUT/scan_kv_smol_cuda.json" > "$OUT/scan_kv_smol.txt" 2> "$OUT/scan_kv_smol.err"
  echo "scan wall $((SECONDS - t0)) s"; tail -n 1 "$OUT/scan_kv_smol.err"; tail -n 1 "$OUT/scan_kv_smol.txt"
  python3 bench/kv_optimize.py --scan "$OUT/scan_kv_smol_cuda.json" --bits 3.3 --dir /tmp/kvs --boundary 2 \
    --even q8_0,turbo3 --gap-to turbo3 --refine 2 --jobs 8 --lacq-args "$CUDA" --out "$OUT/kv_smol_opt.md" 2>&1 | tail -n 12 ;;
kv-gemma)
  t0=$SECONDS; python3 -m lacq scan kv "$GEMMA" --types turbo2,turbo3,turbo4,q8_0 --jobs "${2:-8}" \
    -t 2 $CUDA -o "$OUT/scan_kv_gemma_cuda.json" > "$OUT/scan_kv_gemma.txt" 2> "$OUT/scan_kv_gemma.err"
  echo "scan wall $((SECONDS - t0)) s"; tail -n 1 "$OUT/scan_kv_gemma.err"; tail -n 1 "$OUT/scan_kv_gemma.txt"; cp "$OUT/scan_kv_gemma_cuda.json" $G/ ;;
kv-gemma-opt)
  python3 bench/kv_optimize.py --scan $G/scan_kv_gemma_cuda.json --bits "$2" --dir /tmp/kvg --even q8_0,turbo3 \
    --gap-to turbo3 ${3:+--boundary $3} --refine 2 --jobs 8 --lacq-args "$CUDA" --out "$OUT/kv_gemma_opt.md" 2>&1 | tail -n 30
  cp /tmp/kvg/rows.json "$OUT/kv_gemma_rows_$2.json" ;;
esac
