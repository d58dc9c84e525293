"""A KV scan's costs against the caches the patched llama.cpp allocates (gemma-3-270m: iSWA, window 512)."""

from __future__ import annotations

import re

import pytest

from lacq.llama.tools import perplexity
from lacq.llama.tools.base import run_tool
from lacq.measure.common import prepare_kv
from lacq.model.info import inspect_model
from lacq.plan.kv.cells import kv_cells, layer_values
from lacq.plan.kv.flags import kv_from_flags
from lacq.plan.kv.types import kv_type

pytestmark = pytest.mark.e2e

CTX = 4096
_CREATED = re.compile(r"llama_kv_cache_iswa: creating +(non-SWA|SWA) KV cache, size = (\d+) cells")
_SIZE = re.compile(r"llama_kv_cache: size = +[\d.]+ MiB \( *(\d+) cells, +(\d+) layers.*K \(\S+\): +([\d.]+) MiB, "
                   r"V \(\S+\): +([\d.]+) MiB")
_SUMMARY = re.compile(r"llama_kv_types: summary n_kv=\d+ k_bits_per_value=([\d.]+) v_bits_per_value=([\d.]+) "
                      r"k_bytes=(\d+) v_bytes=(\d+)")


def test_kv_scan_prices_each_cache_as_the_patched_llama_cpp_allocates_it(gemma3, cpu_build, tmp_path):
    info = inspect_model(gemma3)
    kv = prepare_kv(cpu_build, kv_from_flags("q8_0", "q4_0", kv_policy="boundary_v2"), info)
    corpus = tmp_path / "short.txt"  # too short for one chunk: the run stops once its context is made
    corpus.write_text("A few words, fewer than one chunk of the context.\n")
    args = perplexity.argv(cpu_build.tool("llama-perplexity"), gemma3, corpus, ctx=CTX, chunks=1, kv_args=kv.argv())
    log = run_tool(args, env=kv.env(), what="llama-perplexity").output
    created = dict(_CREATED.findall(log))
    caches = _SIZE.findall(log)  # the full-context cache first, then the sliding-window one
    summary = _SUMMARY.search(log)
    assert len(caches) == 2 and summary, log[-3000:]
    assert kv_cells(info, CTX) == (int(created["non-SWA"]), int(created["SWA"]))

    types = kv.per_layer(len(info.kv_blocks))
    values = {c: layer_values(info, CTX, c) for c in ("k", "v")}
    bits = {c: [kv_type(t[i]).bits_per_value for t in types] for i, c in enumerate(("k", "v"))}
    cost = {c: [b * n for b, n in zip(bits[c], values[c])] for c in ("k", "v")}  # as scan_kv prices a layer
    sliding = [b in info.swa_blocks for b in info.kv_blocks]
    for (cells, n_layers, k_mib, v_mib), in_window in zip(caches, (False, True)):
        layers = [o for o, s in enumerate(sliding) if s == in_window]
        assert int(n_layers) == len(layers)
        for c, mib in (("k", k_mib), ("v", v_mib)):
            priced = sum(cost[c][o] for o in layers) / 8 / 2**20
            assert priced == pytest.approx(float(mib), abs=0.006), (c, cells, priced, mib)
    # the patch's own count, to the byte, and its bits/value: the scan's cost over its values
    assert (int(summary.group(3)), int(summary.group(4))) == (sum(cost["k"]) / 8, sum(cost["v"]) / 8)
    for i, c in enumerate(("k", "v")):
        assert float(summary.group(1 + i)) == pytest.approx(sum(cost[c]) / sum(values[c]), abs=1e-4)
