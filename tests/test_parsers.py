"""Parsers on output captured from the real pinned tools (tests/captures)."""

import math

import pytest

from lacq.errors import ToolError
from lacq.llama.tools import perplexity, quantize


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


def test_perplexity_argv_has_kv_and_log_level(tmp_path):
    args = perplexity.argv(tmp_path / "llama-perplexity", tmp_path / "m.gguf", tmp_path / "c.txt", chunks=3,
                           kv_args=["-ctk", "q8_0", "-ctv", "q4_0", "-fa", "on"])
    assert args[args.index("--chunks") + 1] == "3"
    assert "-lv" in args and args[args.index("-ctv") + 1] == "q4_0"


@pytest.mark.parametrize("name,blocks,upgraded,k_bpv,v_bpv", [
    # SmolLM2, pure attention: ordinal = block; boundary 2 by ordinal -> blocks 0, 1, 28, 29
    ("kv_policy_smollm2.log", list(range(30)), [0, 1, 28, 29], 8.5, 5.0333),
    # lfm2 hybrid: attention only in blocks 2, 5, 6, 9, 12, 14 -> ordinals 0..5
    ("kv_policy_hybrid.log", [2, 5, 6, 9, 12, 14], [2, 5, 12, 14], 8.5, 7.1667),
    # gemma3 iSWA: two caches, ordinals over both in block order
    ("kv_policy_iswa_gemma3.log", list(range(12)), [0, 1, 10, 11], 8.5, 5.8333),
])
def test_per_layer_kv_lines(capture, name, blocks, upgraded, k_bpv, v_bpv):
    r = perplexity.parse(capture(name))
    assert [l.block for l in r.kv_layers] == blocks
    assert [l.ordinal for l in r.kv_layers] == list(range(len(blocks)))
    assert [l.block for l in r.kv_layers if l.v_type == "q8_0"] == upgraded
    assert {l.v_type for l in r.kv_layers if l.block not in upgraded} == {"q4_0"}
    assert {l.k_type for l in r.kv_layers} == {"q8_0"}
    assert r.k_bits_per_value == pytest.approx(k_bpv) and r.v_bits_per_value == pytest.approx(v_bpv)
    assert r.v_type == "mixed" and r.k_type == "q8_0"


def test_iswa_cache_sizes_add_up(capture):
    r = perplexity.parse(capture("kv_policy_iswa_gemma3.log"))
    assert r.k_mib == pytest.approx(0.27 + 1.33)
    assert r.v_mib == pytest.approx(0.20 + 0.89)
