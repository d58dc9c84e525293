#!/usr/bin/env bash
# The commands lacq's CUDA figures in bench/results/ come from, run on the GPU
# host (no network) from a copy of this checkout:
#   .whl/       gguf, platformdirs, diskcache and llama-cpp-python 0.3.36 wheels (the host's Python
#               lacks them; llama-cpp-python built here with CMAKE_ARGS="-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF")
#   .gpu/src/   llama-src.tar.xz: the pinned llama.cpp tree (models/ and docs/ left out)
#   .gpu/m1, .gpu/m2: SmolLM2-135M-Instruct.Q4_1.gguf split in two (upload limit)
# Usage: bash bench/gpu/session.sh STAGE   (stages in order: setup, wait, tests, ppl, speed;
#        cpu-setup and cpu-ppl run the same PPL tables on the host's 16-core CPU backend;
#        measure-setup, wait, niah, kvbench give issue 5's NIAH grids and lacq bench table;
#        measure-setup, wait, turbo-check test and time the warp-per-block turbo SET_ROWS (patch 0004).
#        The host's default CC/CXX (/opt/gcc) copy libstdc++ into every shared library, which
#        crashes the in-process NIAH runner: build with CC=/usr/bin/gcc CXX=/usr/bin/g++
#        CUDAHOSTCXX=/usr/bin/g++ before measure-setup when the bindings runner is wanted)
set -uo pipefail
export LACQ_HOME=/tmp/lh PYTHONUNBUFFERED=1
export PYTHONPATH=/tmp/site:$PWD
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
SRC=/tmp/g/llama.cpp
MODEL=/tmp/g/model.gguf
bin() { python3 -m lacq build --backend cuda --source "$SRC" --target test-backend-ops --print-path; }

unpack() {  # the wheels, the source tree and the model's first part
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  mkdir -p /tmp/g && tar -C /tmp/g -xJf .gpu/src/llama-src.tar.xz && cp .gpu/m1/* /tmp/g/
}
start_build() {  # detached: a build outlasts the call; `wait` collects it
  setsid nohup bash -c "python3 -m lacq build --source $SRC $*; echo rc=\$?" > /tmp/build.log 2>&1 < /dev/null &
}

case "$1" in
setup)
  unpack; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
  start_build --backend cuda --target test-backend-ops; sleep 30; tail -n 3 /tmp/build.log ;;
wait)
  [ -f .gpu/m2/model.part.01 ] && cp .gpu/m2/* /tmp/g/ && cat /tmp/g/model.part.* > "$MODEL"
  for _ in $(seq 1 "${2:-55}"); do grep -q '^rc=' /tmp/build.log && break; sleep 10; done
  tail -n 4 /tmp/build.log
  if ! grep -q '^rc=0' /tmp/build.log; then
    grep -h -B2 -A6 'error' $(find "$LACQ_HOME" -name lacq-build.log) | head -80; exit 1
  fi ;;
tests)
  B=${B:-$(bin)}
  for op in SET_ROWS GET_ROWS CPY FLASH_ATTN_EXT; do
    "$B/test-backend-ops" test -b CUDA0 -o "$op" -p turbo > "$OUT/test-backend-ops-$op-turbo.log" 2>&1
    echo "$op turbo: $(grep -c 'OK' "$OUT/test-backend-ops-$op-turbo.log") OK," \
         "$(grep -c 'FAIL' "$OUT/test-backend-ops-$op-turbo.log") FAIL," \
         "$(grep -c 'not supported' "$OUT/test-backend-ops-$op-turbo.log") not supported; $(tail -n 1 "$OUT/test-backend-ops-$op-turbo.log")"
  done ;;
tests-all)
  # Every case of the four ops the patches touch, all types (after setup + wait).
  B=${B:-$(bin)}
  for op in SET_ROWS GET_ROWS CPY FLASH_ATTN_EXT; do
    "$B/test-backend-ops" test -b CUDA0 -o "$op" > "$OUT/tbo-$op-all.log" 2>&1
    echo "$op: $(grep -cE '\): .*OK' "$OUT/tbo-$op-all.log") OK, $(grep -c 'FAIL' "$OUT/tbo-$op-all.log") FAIL," \
         "$(grep -c 'not supported' "$OUT/tbo-$op-all.log") not supported; $(grep 'backends passed' "$OUT/tbo-$op-all.log")"
  done ;;
ppl)
  C="q8_0/f16,q8_0/q8_0,q8_0/q4_0,q8_0/turbo4,q8_0/turbo3,q8_0/turbo2,q8_0/turbo2+b2,q8_0/turbo2+b4"
  C="$C,f16/turbo3,turbo4/turbo4,turbo3/turbo3,turbo2/turbo2"
  python3 bench/kv_table.py --configs "$C" --backend cuda --source "$SRC" --ngl 99 --model "$MODEL" \
    --chunks 40 --out "$OUT/kv_turbo_cuda.md" 2>/dev/null
  python3 bench/kv_table.py --configs "$C" --backend cuda --source "$SRC" --ngl 99 --model "$MODEL" \
    --ctx 4096 --chunks 8 --out "$OUT/kv_turbo_cuda.md" 2>/dev/null | tail -n 16 ;;
measure-setup)
  unpack; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
  start_build --backend cuda; sleep 20; tail -n 3 /tmp/build.log ;;
niah)
  # Detached (the grids outlast one call): the five configurations run as parallel processes,
  # one file each; later calls print progress and copy the results.
  R=${NIAH_RUNNER:-bindings}
  mkdir -p /tmp/res
  for c in f16/f16 q8_0/q4_0 q8_0/q4_0+b2 q8_0/turbo3 q8_0/turbo2+b2; do
    f=$(echo $c | tr '/+' '__'); [ -f /tmp/niah_$f.log ] && continue
    setsid nohup python3 bench/niah_grid.py --configs $c --runner $R --backend cuda --source $SRC --ngl 99 \
      --model $MODEL --trials 5 --out /tmp/res/niah_$f.md > /tmp/niah_$f.log 2>&1 < /dev/null &
  done
  for _ in $(seq 1 "${2:-1}"); do sleep 5; [ $(ls /tmp/res/*.md 2>/dev/null | wc -l) = 5 ] && break; done
  for f in /tmp/niah_*.log; do echo "$(tr '\r' '\n' < $f | tail -n 1)"; done; cp /tmp/res/* "$OUT"/ 2>/dev/null ;;
turbo-check)
  # After measure-setup + wait: test-backend-ops built inside the default build, the turbo
  # cases of four ops, then PPL (bytes unchanged => same PPL) and speed of the turbo V types.
  export B=$(python3 -m lacq build --backend cuda --source "$SRC" --print-path)
  cmake --build "$B/.." --target test-backend-ops -j 16 > /tmp/tbo.log 2>&1 || { tail -n 20 /tmp/tbo.log; exit 1; }
  bash "$0" tests
  C=q8_0/q4_0,q8_0/turbo4,q8_0/turbo3,q8_0/turbo2,q8_0/turbo2+b2
  python3 bench/kv_table.py --configs "$C" --backend cuda --source "$SRC" --ngl 99 --model "$MODEL" \
    --chunks 40 --out "$OUT/kv_turbo_cuda.md" 2>/dev/null | tail -n 8
  python3 bench/speed.py --configs "$C" --backend cuda --source "$SRC" --ngl 99 --model "$MODEL" \
    --depth 0,7680 -r 5 --out "$OUT/speed_turbo_cuda.md" 2>&1 | tail -n 14 ;;
kvbench)
  python3 bench/speed.py --configs f16/f16,q8_0/q4_0,q8_0/q4_0+b2,q8_0/turbo3,q8_0/turbo2+b2 \
    --backend cuda --source "$SRC" --ngl 99 --model "$MODEL" --depth 0,8192 -r 5 \
    --out "$OUT/speed_cuda.md" --plot "$OUT/speed_cuda.png" 2>&1 | tail -n 20 ;;
cpu-setup)
  unpack; start_build --backend cpu; sleep 20; lscpu | grep -E 'Model name|^CPU\(s\)' ;;
cpu-ppl)
  C="q8_0/f16,q8_0/q8_0,q8_0/q4_0,q8_0/turbo4,q8_0/turbo3,q8_0/turbo2,q8_0/turbo2+b2,q8_0/turbo2+b4"
  C="$C,f16/turbo3,turbo4/turbo4,turbo3/turbo3,turbo2/turbo2"
  python3 bench/kv_table.py --configs "$C" --source "$SRC" --threads 16 --model "$MODEL" \
    --chunks 40 --out "$OUT/kv_turbo_cpu16.md" 2>/dev/null | tail -n 16
  python3 bench/kv_table.py --preset boundary --source "$SRC" --threads 16 --model "$MODEL" \
    --chunks 40 --out "$OUT/kv_boundary_cpu16.md" 2>/dev/null | tail -n 12
  python3 bench/kv_table.py --configs "$C" --source "$SRC" --threads 16 --model "$MODEL" \
    --ctx 4096 --chunks 8 --out "$OUT/kv_turbo_cpu16.md" 2>/dev/null | tail -n 16 ;;
speed)
  B=$(bin)
  {
    echo "llama-bench on $(nvidia-smi --query-gpu=name --format=csv,noheader), $MODEL (Q4_1), -ngl 99 -fa 1 -r 5"
    for cfg in q4_0 turbo4 turbo3 turbo2 turbo2+b2; do
      v=${cfg%+b2}; env=()
      [ "$cfg" != "$v" ] && env=(LLAMA_KV_TYPES_V="0..1=q8_0,-2..-1=q8_0")
      echo; echo "K q8_0, V $cfg: \`${env[*]} llama-bench -m model.gguf -ngl 99 -fa 1 -ctk q8_0 -ctv $v -p 512 -n 128 -d 0,8192 -r 5 -o md\`"
      env "${env[@]}" "$B/llama-bench" -m "$MODEL" -ngl 99 -fa 1 -ctk q8_0 -ctv "$v" -p 512 -n 128 -d 0,8192 -r 5 -o md 2>/dev/null
    done
  } | tee "$OUT/kv_turbo_speed_cuda.md" ;;
esac
