#!/usr/bin/env bash
# Issue 21 on the GPU host, SmolLM2's shape (run detached by `evidence.sh smol`; results under $1):
#  1. the 1392-variant k-quant tensor scan through `lacq scan`, one engine, then four engines on the one GPU
#     (the results store emptied between the two, the candidate files and base logits kept in lacq's cache);
#  2. the engine's KL-divergence on the GPU against llama-perplexity's host arithmetic (LLAMA_ENGINE_KLD) on
#     the same variants, and the run-to-run spread of bare llama-perplexity processes.
# Arguments: OUT_DIR LLAMA_BIN_DIR SOURCE E_DIR (E_DIR holds kv.bin and shapes.json, see engine_synth.py).
set -uo pipefail
O=$1; B=$2; SRC=$3; E=$4
mkdir -p "$O"
python3 bench/gpu/engine_synth.py "$E/kv.bin" "$E/shapes.json" "$E/smol-f16.gguf"
for J in 1 4; do
  rm -f "$LACQ_HOME"/results.sqlite*
  s=$EPOCHREALTIME
  python3 -m lacq scan weights "$E/smol-f16.gguf" --base "$E/smol-f16.gguf" --unit tensor \
    --types iq4_nl,q4_k,q5_0,q5_k,q6_k,q8_0 --chunks 4 --backend cuda --source "$SRC" --jobs $J \
    -o "$O/scan_smol_j$J.json" > "$O/scan_smol_j$J.txt" 2> "$O/scan_smol_j$J.err"
  echo "lacq scan --jobs $J: exit $?, $(python3 -c "print(round($EPOCHREALTIME - $s, 1))") s wall, all stages"
  grep -iE 'engine memory|variants' "$O/scan_smol_j$J.err" | tail -n 3
done
q4=$(ls "$LACQ_HOME"/work/scan/*/smol-f16.all-q4_k.gguf | head -n 1)
q8=$(ls "$LACQ_HOME"/work/scan/*/smol-f16.all-q8_0.gguf | head -n 1)
lg=$(ls -S "$LACQ_HOME"/logits/*.logits | head -n 1)
# the same variants through the engine with the KLD on the GPU and on the host
python3 - > /tmp/variants.jsonl <<'PY'
import json
print(json.dumps({"id": "uniform"}))
for b in (0, 7, 15, 29):
    for t in ("attn_q", "attn_v", "ffn_down"):
        print(json.dumps({"id": f"blk.{b}.{t}", "tensors": {f"blk.{b}.{t}.weight": "hi"}}))
print(json.dumps({"id": "kv q8_0/q4_0", "args": ["-ctk", "q8_0", "-ctv", "q4_0", "-fa", "on"]}))
PY
for K in device host; do
  s=$EPOCHREALTIME
  LLAMA_ENGINE_KLD=$K "$B/llama-perplexity" -m "$q4" -c 512 -lv 4 --no-log-timestamps --kl-divergence-base "$lg" \
    --kl-divergence --engine-candidate hi="$q8" --engine-variants /tmp/variants.jsonl > "$O/engine_kld_$K.log" 2>&1
  echo "engine, KLD on $K: exit $?, $(python3 -c "print(round($EPOCHREALTIME - $s, 2))") s for 14 variants and the loads"
done
for i in 1 2 3 4 5; do
  s=$EPOCHREALTIME
  "$B/llama-perplexity" -m "$q4" --kl-divergence-base "$lg" --kl-divergence -c 512 > "$O/bare_q4_k_$i.log" 2>&1
  echo "bare llama-perplexity --kl-divergence, q4_k, run $i: $(python3 -c "print(round($EPOCHREALTIME - $s, 3))") s," \
       "$(grep -E 'seconds per pass' "$O/bare_q4_k_$i.log" | sed 's/.*: //') $(grep -E 'Mean +KLD' "$O/bare_q4_k_$i.log")"
done
echo rc=0
