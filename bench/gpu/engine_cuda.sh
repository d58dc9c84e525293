#!/usr/bin/env bash
# On the GPU host, from the repo root: build llama-perplexity and llama-quantize (CUDA, sm_90) from the engine's
# tree, make a SmolLM2-shaped F16 model (SmolLM2's tokenizer, random weights), its q4_0/q8_0 files and base
# logits (4x512), then time a bare KLD process of the q4_0 file against the engine on 18 variants.
# .gpu/engine/ (ignored; carried by the device tool) holds: llama-src.tar.xz and extra-src.tar.xz (the patched
# tree from scripts/patchdev.py init, tarred without build/.git/models/docs, then src/models and
# tools/mtmd/models), kv.bin (SmolLM2 Q4_1's metadata and tokenizer: its KV count then the bytes between the
# GGUF header and the tensor table) and shapes.json (its tensor names and shapes).
set -uo pipefail
R=$PWD; E=$R/.gpu/engine; W=/tmp/e; mkdir -p $W; OUT=${OUT:-/tmp/out}
t0=$(date +%s)
tar -C $W -xJf $E/llama-src.tar.xz && tar -C $W -xJf $E/extra-src.tar.xz
cd $W/pd-engine
cmake -S . -B build -G Ninja -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF \
  -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF -DBUILD_SHARED_LIBS=ON > $OUT/cmake.log 2>&1 || exit 3
timeout ${BUILD_S:-400} ninja -C build -j16 llama-perplexity llama-quantize > $OUT/build.log 2>&1 || { tail -5 $OUT/build.log; exit 4; }
echo "build $(( $(date +%s) - t0 )) s"
B=$W/pd-engine/build/bin; C="-c 512 -ngl 99 -lv 4 --no-log-timestamps"
python3 $R/bench/gpu/engine_synth.py $E/kv.bin $E/shapes.json $W/f16.gguf
for t in q4_0 q8_0; do $B/llama-quantize $W/f16.gguf $W/$t.gguf $t > $OUT/quant-$t.log 2>&1 || exit 5; done
$B/llama-perplexity -m $W/f16.gguf -f $R/data/wikitext-2-raw/wiki.test.raw $C --chunks 4 --kl-divergence-base $W/base.logits > $OUT/base.log 2>&1 || exit 6
for i in 1 2 3 4; do
  s=$EPOCHREALTIME; $B/llama-perplexity -m $W/q4_0.gguf --kl-divergence-base $W/base.logits --kl-divergence $C > $OUT/bare$i.log 2>&1
  echo "bare $i $(python3 -c "print(round($EPOCHREALTIME - $s, 3))") s"; grep -E "seconds per pass|Mean +KLD" $OUT/bare$i.log
done
cd $R
python3 - $E/shapes.json > $W/variants.jsonl <<'PY'
import json, sys
names = [t["name"] for t in json.load(open(sys.argv[1])) if "norm" not in t["name"]]
groups = sorted({n.split(".")[2] for n in names if n.startswith("blk.")})
vs = [("uniform q4_0", {}), ("uniform q8_0", {n: "q8_0" for n in names})]
for g in groups + ["token_embd"]:
    sel = [n for n in names if (n.split(".")[2] if n.startswith("blk.") else n.split(".")[0]) == g]
    vs.append((f"{g} raise q8_0", {n: "q8_0" for n in sel}))
    vs.append((f"{g} lower q4_0", {n: "q8_0" for n in names if n not in sel}))
for vid, t in vs:
    print(json.dumps({"id": vid, "tensors": t}))
PY
s=$EPOCHREALTIME
$B/llama-perplexity -m $W/q4_0.gguf --kl-divergence-base $W/base.logits --kl-divergence $C --engine-candidate q8_0=$W/q8_0.gguf --engine-variants $W/variants.jsonl > $OUT/engine.log 2>&1
echo "engine total $(python3 -c "print(round($EPOCHREALTIME - $s, 3))") s for $(wc -l < $W/variants.jsonl) variants"
python3 - $OUT/engine.log <<'PY'
import json, statistics, sys
v = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{") and '"variant"' in l]
secs = [x["seconds"] for x in v if x["ok"]]
print("engine variants ok", len(secs), "of", len(v), "median s", round(statistics.median(secs), 4), "min", round(min(secs), 4), "max", round(max(secs), 4))
for x in v[:3]:
    print(x["id"], x.get("seconds"), x.get("result", {}).get("kld_mean"), x.get("error"))
PY
nvidia-smi --query-gpu=name --format=csv,noheader
echo "all $(( $(date +%s) - t0 )) s"
