"""Parsers on output captured from the real pinned tools (tests/captures)."""

import math

import pytest

from lacq.errors import ToolError
from lacq.tools import perplexity, quantize, wrapper


def test_perplexity_final_chunks_and_kv(capture):
    r = perplexity.parse(capture("perplexity_q8_0_q4_0_fa.log"))
    assert r.ppl == pytest.approx(22.0791)
    assert r.ppl_error == pytest.approx(2.20535)
    assert r.chunks == (12.6073, 21.4714, 22.1817, 22.0791)
    assert (r.n_chunks, r.n_ctx) == (4, 512)
    assert r.flash_attn == "enabled"
    assert (r.k_type, r.v_type) == ("q8_0", "q4_0")
    assert r.kv_buffer_mib == pytest.approx(18.28)
    assert (r.k_mib, r.v_mib) == (pytest.approx(11.95), pytest.approx(6.33))
    assert r.seconds_per_pass == pytest.approx(34.4)
    assert r.total_ms > 0
    assert r.kv_layers == ()


def test_perplexity_without_final_estimate_is_an_error(capture):
    with pytest.raises(ToolError, match="without a final estimate"):
        perplexity.parse(capture("perplexity_missing_model.log"))


def test_perplexity_corpus_too_short_explains_why(capture):
    with pytest.raises(ToolError, match="you need at least 1024 tokens"):
        perplexity.parse(capture("perplexity_corpus_too_short.log"))


def test_perplexity_handles_nan_chunks():
    text = "[1]nan,[2]-nan,\nI Final estimate: PPL = nan +/- nan\n"
    r = perplexity.parse(text)
    assert math.isnan(r.ppl) and len(r.chunks) == 2


def test_quantize_dry_run_report(capture):
    rep = quantize.parse(capture("quantize_dryrun_q4_0.log"))
    types = rep.types()
    assert len(rep.tensors) == 272
    assert types["blk.0.attn_q.weight"] == "q8_0"  # the manual override
    assert types["blk.1.ffn_down.weight"] == "q8_0"
    assert types["blk.0.attn_k.weight"] == "q4_0"
    assert types["output_norm.weight"] == "f32"  # 1-D: left alone
    assert rep.fallbacks == {"token_embd.weight": "q8_0"}  # q6_K needs 256 columns
    assert rep.quant_mib == pytest.approx(86.35)
    assert rep.model_mib == pytest.approx(256.63)


def test_quantize_real_run_matches_dry_run(capture):
    dry = quantize.parse(capture("quantize_dryrun_q4_0.log")).types()
    real = quantize.parse(capture("quantize_q4_0.log")).types()
    assert dry == real


def test_quantize_without_report_is_an_error():
    with pytest.raises(ToolError):
        quantize.parse("llama_quantize: failed to quantize\n")


def test_registry_names_valid_tools():
    assert wrapper("llama-perplexity") is perplexity
    with pytest.raises(KeyError, match="llama-quantize"):
        wrapper("llama-nope")


def test_perplexity_argv_has_kv_and_log_level(tmp_path):
    args = perplexity.argv(tmp_path / "llama-perplexity", tmp_path / "m.gguf", tmp_path / "c.txt", chunks=3,
                           kv_args=["-ctk", "q8_0", "-ctv", "q4_0", "-fa", "on"])
    assert args[args.index("--chunks") + 1] == "3"
    assert "-lv" in args and args[args.index("-ctv") + 1] == "q4_0"
