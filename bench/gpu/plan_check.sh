#!/usr/bin/env bash
# The memory plan `lacq scan` prints against what the GPU held (issue 21): SmolLM2's shape, four engines sharing
# the GPU, nvidia-smi sampled every 0.5 s; then the result rows' kld_on. Run after `evidence.sh start`.
set -uo pipefail
export LACQ_HOME=/tmp/lh PYTHONPATH=/tmp/site:$PWD
E=/tmp/e; O=${OUT:-/tmp/out}
python3 bench/gpu/engine_synth.py $E/kv.bin $E/shapes.json $E/smol-f16.gguf
nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits > $O/idle_mib.txt
(while sleep 0.5; do nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits; done) > $O/gpumem.log 2>&1 &
sampler=$!
s=$EPOCHREALTIME
python3 -m lacq scan weights $E/smol-f16.gguf --base $E/smol-f16.gguf --unit tensor \
  --types iq4_nl,q4_k,q5_0,q5_k,q6_k,q8_0 --chunks 4 --backend cuda --source /tmp/g/llama.cpp --jobs 4 \
  -o $O/scan.json > $O/scan.txt 2> $O/scan.err
echo "lacq scan --jobs 4 (cold): exit $?, $(python3 -c "print(round($EPOCHREALTIME - $s, 1))") s"
kill $sampler
grep -E 'engine memory' $O/scan.err
echo "GPU memory used: idle $(cat $O/idle_mib.txt) MiB, peak $(sort -n $O/gpumem.log | tail -n 1) MiB"
python3 - <<'PY'
import json, sqlite3, collections
rows = sqlite3.connect('/tmp/lh/results.sqlite').execute("select metrics from results where kind='kld'").fetchall()
print("rows by kld_on:", dict(collections.Counter(json.loads(m).get("kld_on") for (m,) in rows)))
PY
