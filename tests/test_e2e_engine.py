"""The evaluation engine on the real models: the numbers of llama-perplexity on assembled files, bad input
refused, a killed engine costing only the variant in flight."""

from __future__ import annotations

import os
import signal
import subprocess

import pytest
from procutil import descendants, gone_within

from lacq import paths
from lacq.errors import ToolError
from lacq.llama.tools import engine as tool
from lacq.llama.tools import kld
from lacq.llama.tools.base import message_lines
from lacq.measure.common import prepare_kv
from lacq.measure.kld import base_logits
from lacq.model.assemble import assemble
from lacq.model.info import inspect_model
from lacq.results.store import open_store
from lacq.studies.engine import engine_available
from lacq.studies.scan import WeightVariant, candidate_files, engine_tensors, kv_variant_config, scan_weights

pytestmark = pytest.mark.e2e
CTX, CHUNKS = 128, 2
ENGINE_NAME = "llama-perplexit"  # /proc's command name: the first 15 characters


@pytest.fixture(autouse=True)
def _engine_built(cpu_build):
    if not engine_available(cpu_build):
        pytest.skip("this build lacks the evaluation engine patch (*-evaluation-engine-*)")


def _statistics(text: str) -> list[str]:
    """The statistics block llama-perplexity --kl-divergence prints, and its per-chunk rows."""
    lines = message_lines(text)
    start = next(i for i, line in enumerate(lines) if line.startswith("chunk ") and "KL Divergence" in line)
    end = next(i for i, line in enumerate(lines) if line.startswith("Same top p:"))
    return [line.rstrip() for line in lines[start:end + 1] if line.strip()]


def _printed(r: kld.KldResult) -> list[str]:
    """The engine's numbers in perplexity.cpp's formats: equal strings mean equal printed statistics."""
    return ([f"Mean PPL(Q)                   : {r.ppl_q:10.6f} ± {r.ppl_q_error:10.6f}",
             f"Mean PPL(base)                : {r.ppl_base:10.6f} ± {r.ppl_base_error:10.6f}",
             f"Mean ln(PPL(Q)/PPL(base))     : {r.ln_ppl_ratio:10.6f} ± {r.ln_ppl_ratio_error:10.6f}",
             f"Mean    KLD: {r.kld_mean:10.6f} ± {r.kld_mean_error:10.6f}",
             f"Maximum KLD: {r.kld_quantiles['max']:10.6f}",
             f"99.9%   KLD: {r.kld_quantiles['p99.9']:10.6f}",
             f"Median  KLD: {r.kld_quantiles['p50']:10.6f}",
             f"RMS Δp    : {r.dp_rms_pct:6.3f} ± {r.dp_rms_error_pct:5.3f} %",
             f"Same top p: {r.same_top_p_pct:6.3f} ± {r.same_top_p_error_pct:5.3f} %"]
            + [f"{c.chunk:4d}    {c.ppl:9.4f}" for c in r.chunks])


def _assert_same(outcome: tool.VariantOutcome, text: str, reference: str) -> None:
    assert outcome.ok, outcome.error
    ref = _statistics(reference)
    assert _statistics(text) == ref  # the engine printed what llama-perplexity printed, digit for digit
    printed = set(ref) | {line[:17] for line in ref}
    missing = [line for line in _printed(outcome.result) if line not in printed]
    assert not missing  # and its JSON holds those numbers
    assert [c.kld for c in outcome.result.chunks] == pytest.approx([c.kld for c in kld.parse(reference).chunks],
                                                                   abs=5e-6)


def test_weight_variants_equal_llama_perplexity_on_the_assembled_files(cpu_build, smollm2_f16, tmp_path):
    """Block, group, tensor, tied-embedding and uniform variants, raised from q4_0 and lowered from q8_0 (q4_0
    tensors are repacked for AVX2 CPUs, q8_0 ones are not: both layouts swap in and out)."""
    store, info = open_store(), inspect_model(smollm2_f16)
    files = candidate_files(cpu_build, store, smollm2_f16, info, ["q4_0", "q8_0"], tmp_path)
    cinfo = {t: inspect_model(p) for t, p in files.items()}
    logits, _ = base_logits(cpu_build, store, smollm2_f16, info, paths.default_corpus(), ctx=CTX, chunks=CHUNKS)
    blk3 = tuple(t.name for t in info.tensors if t.block == 3 and len(t.shape) > 1)
    attn_v = tuple(t.name for t in info.tensors if t.group == "attn_v")
    variants = [WeightVariant("q4_0", blk3, "q8_0"), WeightVariant("q4_0", attn_v, "q8_0"),
                WeightVariant("q8_0", ("blk.5.ffn_down.weight",), "q4_0"),
                WeightVariant("q4_0", ("token_embd.weight",), "q8_0"), WeightVariant("q8_0", (), "q8_0"),
                WeightVariant("q4_0", (), "q4_0")]  # last: everything swapped back
    binary = cpu_build.tool("llama-perplexity")
    engine = tool.Engine(tool.argv(binary, files["q4_0"], logits, {"q8_0": files["q8_0"]}, ctx=CTX))
    engine.start()
    try:
        for i, v in enumerate(variants):
            outcome, text, _ = engine.evaluate(f"v{i}", engine_tensors(v, cinfo, "q4_0"))
            path = (assemble(files[v.default], {v.type: files[v.type]}, {n: v.type for n in v.tensors},
                             tmp_path / f"v{i}.gguf") if v.tensors else files[v.default])
            run, _ = kld.run(kld.argv(binary, path, logits, ctx=CTX))
            _assert_same(outcome, text, run.output)
    finally:
        engine.close()


def test_kv_variants_on_both_of_gemma_s_caches_equal_llama_perplexity(cpu_build, gemma3):
    """A V policy over a sliding-window layer (ordinal 0) and a global one (ordinal 5), then a K policy:
    each context re-created with the options and the per-layer environment of a plain run."""
    store, info = open_store(), inspect_model(gemma3)
    logits, _ = base_logits(cpu_build, store, gemma3, info, paths.default_corpus(), ctx=CTX, chunks=CHUNKS)
    binary = cpu_build.tool("llama-perplexity")
    kvs = [prepare_kv(cpu_build, kv_variant_config("v", "q8_0", "q4_0", {0: "q8_0", 5: "q8_0"}), info),
           prepare_kv(cpu_build, kv_variant_config("k", "f16", "q8_0", {5: "q4_0"}), info)]
    engine = tool.Engine(tool.argv(binary, gemma3, logits, {}, ctx=CTX))
    engine.start()
    try:
        for i, kv in enumerate(kvs):
            outcome, text, _ = engine.evaluate(f"kv{i}", {}, kv.argv(), kv.env())
            run, _ = kld.run(kld.argv(binary, gemma3, logits, ctx=CTX, kv_args=kv.argv()), env=kv.env())
            assert "llama_kv_types: layer blk=5 ord=5" in run.output and "llama_kv_types: layer blk=5 ord=5" in text
            _assert_same(outcome, text, run.output)
    finally:
        engine.close()


def test_bad_input_is_refused_in_one_line(cpu_build, smollm2, smollm2_f16, gemma3, tmp_path):
    store, info = open_store(), inspect_model(smollm2_f16)
    binary = cpu_build.tool("llama-perplexity")
    logits, _ = base_logits(cpu_build, store, smollm2_f16, info, paths.default_corpus(), ctx=CTX, chunks=CHUNKS)
    with pytest.raises(ToolError, match=r"^engine: candidate other .* is not the model quantized otherwise: "
                                        r"architecture gemma3") as e:
        tool.Engine(tool.argv(binary, smollm2, logits, {"other": gemma3}, ctx=CTX)).start()
    assert "\n" not in str(e.value)
    ginfo = inspect_model(gemma3)
    glogits, _ = base_logits(cpu_build, store, gemma3, ginfo, paths.default_corpus(), ctx=CTX, chunks=CHUNKS)
    with pytest.raises(ToolError, match=r"^engine: .* vocabulary of 262144 tokens, the model has 49152") as e:
        tool.Engine(tool.argv(binary, smollm2, glogits, {}, ctx=CTX)).start()
    assert "\n" not in str(e.value)
    engine = tool.Engine(tool.argv(binary, smollm2, logits, {"f16": smollm2_f16}, ctx=CTX))
    engine.start()
    try:
        bad, _, _ = engine.evaluate("missing", {"blk.99.ffn_down.weight": "f16"})
        assert not bad.ok and bad.error == "the model has no tensor blk.99.ffn_down.weight"
        bad, _, _ = engine.evaluate("nameless", {"blk.0.ffn_down.weight": "q2_k"})
        assert not bad.ok and bad.error == "no candidate named q2_k (--engine-candidate)"
        good, _, _ = engine.evaluate("after", {"blk.0.ffn_down.weight": "f16"})  # the engine went on
        assert good.ok and good.result.kld_mean > 0
    finally:
        engine.close()


def test_a_refusal_is_printed_before_the_engine_exits_under_load(cpu_build, smollm2, smollm2_f16, gemma3):
    """llama.cpp's log prints from a worker thread: an engine that refused its input and exited at once lost the
    "engine: ..." line in 12 of 60 runs with four busy loops beside it (a clean-clone CI run saw "the engine
    stopped before it was ready" with no reason). The engine now drains the log before it exits."""
    store, info = open_store(), inspect_model(smollm2_f16)
    logits, _ = base_logits(cpu_build, store, smollm2_f16, info, paths.default_corpus(), ctx=CTX, chunks=CHUNKS)
    args = tool.argv(cpu_build.tool("llama-perplexity"), smollm2, logits, {"other": gemma3}, ctx=CTX)
    busy = [subprocess.Popen(["sh", "-c", "while :; do :; done"]) for _ in range(4)]
    try:
        for _ in range(40):
            with pytest.raises(ToolError, match=r"^engine: candidate other .* architecture gemma3"):
                tool.Engine(args).start()
    finally:
        for p in busy:
            p.kill()
            p.wait()


def test_a_killed_engine_costs_only_the_variant_in_flight(cpu_build, smollm2, smollm2_f16):
    """SIGKILL the engine after the third variant: it is restarted, and the scan stores every variant
    once; Ctrl-C later stops the engine, and the same scan again measures only the rest."""
    store = open_store()
    seen, killed = [], []

    def step(stage, frac, detail):
        if stage != "variants" or "/" not in detail:
            return
        seen.append(detail)
        if len(seen) == 4:  # three done (the first report is the count before any)
            engines = [p for p, name in descendants(os.getpid()).items() if name == ENGINE_NAME]
            assert len(engines) == 1
            os.kill(engines[0], signal.SIGKILL)
            killed.extend(engines)
        if len(seen) == 8:
            raise KeyboardInterrupt

    kw = {"types": ["q4_0", "q8_0"], "units": ("group",), "chunks": CHUNKS, "ctx": CTX}
    with pytest.raises(KeyboardInterrupt):
        scan_weights(cpu_build, store, smollm2, smollm2_f16, paths.default_corpus(), step=step, **kw)
    assert killed and gone_within(killed, 5)
    assert not [p for p, name in descendants(os.getpid()).items() if name == ENGINE_NAME]  # none left running
    first = [r.label for r in store.results(kind="kld")]
    assert len(first) == 7 and len(set(first)) == 7
    scan = scan_weights(cpu_build, store, smollm2, smollm2_f16, paths.default_corpus(), **kw)
    labels = [r.label for r in store.results(kind="kld")]
    assert labels[:7] == first and len(labels) == len(set(labels)) == 2 + 2 * len(scan.units)


def test_the_kld_on_a_device_agrees_with_the_host_s(cpu_build, smollm2, smollm2_f16):
    """The engine's KL-divergence graph (where a GPU holds the model; LLAMA_ENGINE_KLD=device runs it on the CPU
    backend here) against llama-perplexity's host arithmetic on the same variants: the same statistics up to
    float rounding (on an H100, 1.5e-6 relative in mean KLD; bench/results/engine_cuda.md)."""
    store, info = open_store(), inspect_model(smollm2_f16)
    logits, _ = base_logits(cpu_build, store, smollm2_f16, info, paths.default_corpus(), ctx=CTX, chunks=CHUNKS)
    args = tool.argv(cpu_build.tool("llama-perplexity"), smollm2, logits, {"f16": smollm2_f16}, ctx=CTX)
    variants = [("uniform", {}, []), ("ffn_down", {"blk.3.ffn_down.weight": "f16"}, []),
                ("kv", {}, ["-ctk", "q8_0", "-ctv", "q4_0", "-fa", "on"])]
    results = {}
    for where in ("device", "host"):
        engine = tool.Engine(args, env={"LLAMA_ENGINE_KLD": where})
        ready = engine.start()
        try:
            assert ready.kld_on == ("CPU" if where == "device" else "host")
            outcomes = [engine.evaluate(vid, tensors, kv)[0] for vid, tensors, kv in variants]
        finally:
            engine.close()
        assert all(o.ok and o.kld_on == ready.kld_on for o in outcomes)
        results[where] = [o.result for o in outcomes]
    for dev, host in zip(results["device"], results["host"], strict=True):
        assert dev.kld_mean == pytest.approx(host.kld_mean, rel=1e-4)
        assert dev.kld_mean_error == pytest.approx(host.kld_mean_error, rel=1e-3)
        assert dev.ppl_q == pytest.approx(host.ppl_q, rel=1e-5) and dev.ppl_base == pytest.approx(host.ppl_base)
        assert dev.kld_quantiles["p99.9"] == pytest.approx(host.kld_quantiles["p99.9"], rel=1e-3)
        assert dev.same_top_p_pct == host.same_top_p_pct
        assert dev.dp_rms_pct == pytest.approx(host.dp_rms_pct, rel=1e-3)
        assert [c.kld for c in dev.chunks] == pytest.approx([c.kld for c in host.chunks], rel=1e-4)
    assert len({r.kld_mean for r in results["host"]}) == 3  # three different variants, not one measured thrice
    with pytest.raises(ToolError, match=r"^engine: LLAMA_ENGINE_KLD is host or device, not 'gpu'$"):
        tool.Engine(args, env={"LLAMA_ENGINE_KLD": "gpu"}).start()
