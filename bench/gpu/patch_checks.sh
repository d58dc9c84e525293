#!/usr/bin/env bash
# Issue 11, patch item 2 on a CUDA host: the per-layer backend check of patch 0003.
#   bench/gpu/patch_checks.sh build   TREE.tgz              # CUDA build of llama-perplexity into .gpu/build
#   bench/gpu/patch_checks.sh run     MODEL.gguf            # the checks below; logs under $OUT (or .gpu/out)
# TREE.tgz: the patched source prepared by `lacq build --print-source` (tar of CMakeLists.txt cmake ggml src
# include common tools vendor licenses LICENSE). MODEL: any model with head size 64 on one GPU (the tiny
# gemma3 fixture of tests/hybrid_fixture.py does: iSWA, 12 KV layers).
set -u
mode=$1; arg=$2
root=$(pwd)/.gpu
out=${OUT:-$root/out}
mkdir -p "$out"
if [ "$mode" = build ]; then
    rm -rf "$root/src" && mkdir -p "$root/src" && tar -xzf "$arg" -C "$root/src"
    gen=Ninja; command -v ninja > /dev/null || gen="Unix Makefiles"
    cmake -S "$root/src" -B "$root/build" -G "$gen" -DCMAKE_BUILD_TYPE=Release -DGGML_CUDA=ON \
        -DCMAKE_CUDA_ARCHITECTURES=90 -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF \
        -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF -DBUILD_SHARED_LIBS=ON \
        > "$out/configure.log" 2>&1 || { tail -30 "$out/configure.log"; exit 1; }
    cmake --build "$root/build" --target llama-perplexity -j 16 > "$out/build.log" 2>&1 || { tail -40 "$out/build.log"; exit 1; }
    echo built; exit 0
fi
bin=$root/build/bin
corpus=data/wikitext-2-raw/wiki.test.raw
ppl() {  # NAME ENV... -- ARGS...
    local name=$1; shift
    local envs=()
    while [ "$1" != "--" ]; do envs+=("$1"); shift; done; shift
    env "${envs[@]}" "$bin/llama-perplexity" -m "$arg" -f "$corpus" -c 256 --chunks 2 -fa on -lv 4 "$@" > "$out/$name.log" 2>&1
    local rc=$?
    echo "== $name: exit $rc"
    grep -E "KV cache layer blk|Final estimate|GGML_ABORT|pre-allocated|llama_kv_types: summary|failed to create" "$out/$name.log" | head -5
}
nvidia-smi --query-gpu=name --format=csv,noheader
ppl q2_0_v_layer0_gpu   LLAMA_KV_TYPES_V=0=q2_0 -- -ngl 99 -ctk q8_0 -ctv q8_0
ppl q2_0_v_layer0_nkvo  LLAMA_KV_TYPES_V=0=q2_0 -- -ngl 99 -nkvo -ctk q8_0 -ctv q8_0
ppl q2_0_ctv_no_policy  X=1 -- -ngl 99 -ctk q8_0 -ctv q2_0
ppl turbo3_boundary     LLAMA_KV_TYPES_V=0..1=q8_0,-2..-1=q8_0 -- -ngl 99 -ctk q8_0 -ctv turbo3
ppl turbo3_kv_boundary  LLAMA_KV_TYPES_K=0..1=q8_0,-2..-1=q8_0 LLAMA_KV_TYPES_V=0..1=q8_0,-2..-1=q8_0 -- -ngl 99 -ctk turbo3 -ctv turbo3
ppl q4_0_v_f16_layers   LLAMA_KV_TYPES_V=0..1=f16 -- -ngl 99 -ctk q8_0 -ctv q4_0
ppl q8_0_k_f16_layers   LLAMA_KV_TYPES_K=0..1=f16,-2..-1=f16 -- -ngl 99 -ctk q8_0 -ctv q8_0
ppl no_policy_q8_q4     X=1 -- -ngl 99 -ctk q8_0 -ctv q4_0
