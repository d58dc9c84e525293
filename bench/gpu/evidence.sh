#!/usr/bin/env bash
# The GPU session behind issues 19-21's CUDA figures, run on the GPU host from a copy of this checkout.
# Uploads are limited (64 MiB a call, the tracked tree counted), so the inputs come in carried folders:
#   .gpu/t1/  train.npy.xz and val.npy: the clean base's training tokens (scripts/make_clean_base.py pack
#             --max-tokens 19500000: 19.4 M of the 25.4 M tokens, evenly spaced blocks) and held-out tokens
#   .whl/     gguf and platformdirs wheels (the host's Python lacks them)
#   .gpu/s1/  llama-src.tar.xz: the pinned tree without models/, docs/, media/ and the ggml backends lacq never
#             builds (made from lacq's pinned source with tar --exclude)
#   .gpu/s2/  kv.bin and shapes.json (SmolLM2's metadata and tensor shapes, see bench/gpu/engine_cuda.sh) for the
#             SmolLM2-shaped random model; ggml-vocab-llama-bpe.gguf.xz (the pinned tree's) for the synthetic 8B
# Stages, each one call, in order:
#   train         the clean base's training, detached (TRAIN_S seconds, default 420)
#   start [S]     wheels, source; `lacq build --backend cuda` (tools, test-backend-ops, test-kv-bytes) detached;
#                 then wait up to S s for the build
#   wait [S]      wait up to S s for the build and the training; weights.npz in parts to $OUT when trained
#   smol, smolpoll [S]   bench/gpu/engine_smol.sh detached (SmolLM2-shaped scans, KLD on GPU vs host), then its files
#   synth8b, poll [S]    the synthetic 8B's tensor scan detached, then its files
#   (kvchecks, engine, kvspeed: see their bodies; TESTS=0 before `start` builds the tools without the test programs)
set -uo pipefail
export LACQ_HOME=/tmp/lh PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$PWD
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
G=/tmp/g; SRC=$G/llama.cpp; CB=/tmp/cb; E=/tmp/e
# TESTS=0: the tools alone (a shorter build, for the engine and speed stages)
TARGETS=(); [ "${TESTS:-1}" = 1 ] && TARGETS=(--target test-backend-ops --target test-kv-bytes)
bin() { python3 -m lacq build --backend cuda --source "$SRC" "${TARGETS[@]}" --print-path; }
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
train)
  mkdir -p $CB && cp .gpu/t1/train.npy.xz .gpu/t1/val.npy $CB/ && cp scripts/make_clean_base.py /tmp/make_clean_base.py
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; nproc
  setsid nohup python3 /tmp/make_clean_base.py train --work $CB --device cuda --budget-s "${TRAIN_S:-420}" \
    > /tmp/train.log 2>&1 < /dev/null &
  sleep 45; tail -n 3 /tmp/train.log ;;
start)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  mkdir -p $G $E && tar -C $G -xJf .gpu/s1/llama-src.tar.xz && cp .gpu/s2/* $E/
  setsid nohup bash -c "python3 -m lacq build --backend cuda --source $SRC ${TARGETS[*]}; echo rc=\$?" \
    > /tmp/build.log 2>&1 < /dev/null &
  sleep 10; wait_for "${2:-0}" ;;
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
engine)
  B=$(bin) || exit 1
  python3 bench/gpu/engine_synth.py $E/kv.bin $E/shapes.json $E/smol-f16.gguf
  s=$EPOCHREALTIME
  python3 -m lacq scan weights $E/smol-f16.gguf --base $E/smol-f16.gguf --unit tensor \
    --types iq4_nl,q4_k,q5_0,q5_k,q6_k,q8_0 --chunks 4 --backend cuda --source "$SRC" -o $OUT/scan_smol_engine.json \
    > $OUT/scan_smol_engine.txt 2> /tmp/scan_smol.err
  echo "lacq scan (engine), exit $?: $(python3 -c "print(round($EPOCHREALTIME - $s, 1))") s wall, all stages"
  grep -iE 'engine|variants|memory' /tmp/scan_smol.err | tail -n 4
  python3 - $OUT/scan_smol_engine.json <<'PY'
import json, sys
d = json.load(open(sys.argv[1])); p = d["provenance"]
print("units", len(d["units"]), "scan seconds", p.get("seconds"), "notes", [n for n in d["notes"] if "measured once" in n])
PY
  q4=$(ls $LACQ_HOME/work/scan/*/smol-f16.all-q4_k.gguf 2>/dev/null | head -n 1); lg=$(ls $LACQ_HOME/logits/*.logits 2>/dev/null | head -n 1)
  ls $LACQ_HOME/work/scan/*/ $LACQ_HOME/logits 2>/dev/null | head -20
  for i in 1 2 3; do
    s=$EPOCHREALTIME; $B/llama-perplexity -m "$q4" --kl-divergence-base "$lg" --kl-divergence -c 512 > /tmp/bare$i.log 2>&1
    echo "bare KLD process of $(basename "$q4"): $(python3 -c "print(round($EPOCHREALTIME - $s, 3))") s"
  done
  grep -E 'seconds per pass|Mean +KLD' /tmp/bare1.log ;;
smol)  # bench/gpu/engine_smol.sh, detached; `smolpoll S` waits up to S s and brings its files back
  B=$(bin) || exit 1
  setsid nohup bash bench/gpu/engine_smol.sh /tmp/sm "$B" "$SRC" $E > /tmp/sm.log 2>&1 < /dev/null &
  sleep 5; tail -n 3 /tmp/sm.log ;;
smolpoll)
  for _ in $(seq 1 $(( ${2:-0} / 10 ))); do grep -q '^rc=' /tmp/sm.log && break; sleep 10; done
  cat /tmp/sm.log; mkdir -p $OUT/smol && cp /tmp/sm.log /tmp/sm/* $OUT/smol/ 2>/dev/null; ls $OUT/smol | head -40 ;;
synth8b)
  B=$(bin) || exit 1
  mkdir -p /tmp/s8 && xz -dc $E/ggml-vocab-llama-bpe.gguf.xz > /tmp/s8/vocab.gguf
  setsid nohup bash -c "
    python3 bench/gpu/synth8b.py /tmp/s8/vocab.gguf /tmp/s8/f16.gguf && df -h /tmp | tail -n 1 &&
    /usr/bin/time -v python3 -m lacq scan weights /tmp/s8/f16.gguf --base /tmp/s8/f16.gguf --unit tensor \
      --types q4_0,q8_0 --chunks 4 --backend cuda --source $SRC -o /tmp/s8/scan8b.json > /tmp/s8/scan8b.txt
    q4=\$(ls $LACQ_HOME/work/scan/*/f16.all-q4_0.gguf | head -n 1); lg=\$(ls -S $LACQ_HOME/logits/*.logits | head -n 1)
    for i in 1 2; do $B/llama-perplexity -m \$q4 --kl-divergence-base \$lg --kl-divergence -c 512 2>&1 \
      | grep -E 'seconds per pass|Mean +KLD' | sed 's/^/bare q4_0 process: /'; done; echo rc=0
  " > /tmp/s8/run.log 2>&1 < /dev/null &
  setsid nohup bash -c "while sleep 2; do nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits; done" \
    > /tmp/s8/gpumem.log 2>&1 < /dev/null &
  sleep 5; tail -n 3 /tmp/s8/run.log ;;
poll)
  for _ in $(seq 1 $(( ${2:-0} / 10 ))); do grep -q '^rc=' /tmp/s8/run.log && break; sleep 10; done
  tail -n 25 /tmp/s8/run.log; tail -n 3 /tmp/s8/scan8b.txt 2>/dev/null
  echo "peak GPU memory used (MiB, sampled every 2 s): $(sort -n /tmp/s8/gpumem.log | tail -n 1)"
  cp /tmp/s8/scan8b.json /tmp/s8/scan8b.txt /tmp/s8/run.log /tmp/s8/gpumem.log $OUT/ 2>/dev/null; ls -la /tmp/s8 ;;
kvspeed)
  B=$(bin) || exit 1
  q4=$(ls $LACQ_HOME/work/scan/*/f16.all-q4_0.gguf | head -n 1)
  for v in f16 q8_0 q4_0 turbo3 tql3 tql4; do
    $B/llama-bench -m "$q4" -ngl 99 -fa 1 -ctk q8_0 -ctv $v -p 0 -n 64 -d 0,16384,32768 -r 2 -o md 2>/dev/null \
      | grep -E '^\| (llama|model)' | tee -a $OUT/kvspeed.md
  done ;;
esac
