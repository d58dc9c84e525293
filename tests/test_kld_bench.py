"""KL-divergence and llama-bench: parsers on captured output, logits-file checks, e2e runs."""

from __future__ import annotations

import struct

import pytest
from click.testing import CliRunner
from conftest import REPO

from lacq.cli import cli
from lacq.errors import LacqError, ToolError
from lacq.llama.tools import bench, kld, perplexity
from lacq.results.tables import bench_frame, kld_frame, spearman

# ---------------------------------------------------------------- KLD parser
KLD_CASES = [
    # capture, field, expected
    ("kld_q4_1_q8_0_q4_0_c128.log", "kld_mean", 0.012104),
    ("kld_q4_1_q8_0_q4_0_c128.log", "kld_mean_error", 0.001827),
    ("kld_q4_1_q8_0_q4_0_c128.log", "dp_mean_pct", -0.330),
    ("kld_q4_1_q8_0_q4_0_c128.log", "dp_rms_pct", 1.807),
    ("kld_q4_1_q8_0_q4_0_c128.log", "same_top_p_pct", 92.593),
    ("kld_q4_1_q8_0_q4_0_c128.log", "same_top_p_error_pct", 1.910),
    ("kld_q4_1_q8_0_q4_0_c128.log", "ppl_q", 32.506039),
    ("kld_q4_1_q8_0_q4_0_c128.log", "ppl_base", 32.102033),
    ("kld_q4_1_q8_0_q4_0_c128.log", "ppl_ratio", 1.012585),
    ("kld_q4_1_q8_0_q4_0_c128.log", "ln_ppl_ratio", 0.012507),
    ("kld_q4_1_q8_0_q4_0_c128.log", "ppl_diff", 0.404006),
    ("kld_q4_1_q8_0_q4_0_c128.log", "ln_ppl_correlation_pct", 99.88),
    ("kld_q4_1_q8_0_q4_0_c128.log", "n_chunks", 3),
    ("kld_q4_1_q8_0_q4_0_c128.log", "n_ctx", 128),
]


@pytest.mark.parametrize("name,field,expected", KLD_CASES)
def test_kld_parse_statistics(capture, name, field, expected):
    assert getattr(kld.parse(capture(name)), field) == pytest.approx(expected)


@pytest.mark.parametrize("which,key,expected", [
    ("kld_quantiles", "max", 0.281443), ("kld_quantiles", "p99.9", 0.244770), ("kld_quantiles", "p99", 0.085613),
    ("kld_quantiles", "p95", 0.048034), ("kld_quantiles", "p90", 0.023494), ("kld_quantiles", "p50", 0.005562),
    ("kld_quantiles", "p10", 0.000582), ("kld_quantiles", "p0.1", 0.000001), ("kld_quantiles", "min", 0.0),
    ("dp_quantiles_pct", "max", 5.004), ("dp_quantiles_pct", "p75", 0.243), ("dp_quantiles_pct", "p50", 0.0),
    ("dp_quantiles_pct", "p25", -0.560), ("dp_quantiles_pct", "p1", -6.712), ("dp_quantiles_pct", "min", -7.405),
])
def test_kld_parse_quantiles(capture, which, key, expected):
    assert getattr(kld.parse(capture("kld_q4_1_q8_0_q4_0_c128.log")), which)[key] == pytest.approx(expected)


def test_kld_parse_per_chunk_rows(capture):
    r = kld.parse(capture("kld_q4_1_q8_0_q4_0_c128.log"))
    assert [c.chunk for c in r.chunks] == [1, 2, 3]
    assert r.chunks[-1].kld == pytest.approx(0.01210) and r.chunks[0].same_top_p_pct == pytest.approx(98.413)
    assert len(r.kld_quantiles) == 11 and len(r.dp_quantiles_pct) == 13


@pytest.mark.parametrize("name,message", [
    ("kld_not_logits.log", "does not look like a file containing log-probabilities"),
    ("kld_vocab_mismatch.log", "inconsistent vocabulary (32000 vs 49152)"),
])
def test_kld_errors_logged_with_exit_0_are_failures(capture, name, message):
    with pytest.raises(ToolError, match="could not compare") as exc:
        kld.parse(capture(name))
    assert message in str(exc.value)


def test_kld_parse_refuses_a_plain_perplexity_log(capture):
    with pytest.raises(ToolError, match="statistics"):
        kld.parse(capture("perplexity_q8_0_q4_0_fa.log"))


def test_base_run_log_is_a_perplexity_log(capture):
    text = capture("kld_base_f16_c128.log")
    kld.check_base_run(text)
    assert perplexity.parse(text).ppl == pytest.approx(32.2376)


# ---------------------------------------------------------------- logits file
def _header(n_ctx=128, n_vocab=49152, n_chunk=3):
    return struct.pack("<8sIii", b"_logits_", n_ctx, n_vocab, n_chunk)


def test_logits_file_size_matches_the_real_file():
    # the captured base run (-c 128, 3 chunks, SmolLM2's 49152-token vocabulary) wrote 18,582,524 bytes
    assert kld.logits_file_bytes(128, 49152, 3) == 18_582_524
    # a real 20-chunk base run of SmolLM2 at -c 512 (the kld defaults) wrote a 479 MiB logits file
    assert kld.logits_file_bytes(512, 49152, 20) / 2**20 == pytest.approx(478.6, abs=0.5)


def test_logits_header_round_trip_and_garbage():
    h = kld.parse_logits_header(_header() + b"\0" * 10)
    assert (h.n_ctx, h.n_vocab, h.n_chunk) == (128, 49152, 3)
    with pytest.raises(ValueError, match="_logits_"):
        kld.parse_logits_header(b"not logits at all, really")
    with pytest.raises(ValueError, match="corrupt"):
        kld.parse_logits_header(_header(n_chunk=0))


def test_logits_file_that_does_not_match_the_model_is_refused(tmp_path):
    from types import SimpleNamespace

    from lacq.measure.kld import check_logits_matches
    f = tmp_path / "x.logits"
    f.write_bytes(_header(n_vocab=32000))
    info = SimpleNamespace(n_vocab=49152, path=str(tmp_path / "m.gguf"))
    with pytest.raises(LacqError, match="vocabulary of 32000 tokens"):
        check_logits_matches(kld.read_logits_header(f), f, info)
    f.write_bytes(_header() + b"\0" * 100)
    with pytest.raises(LacqError, match="truncated"):
        check_logits_matches(kld.read_logits_header(f), f, info)


def test_kld_argv():
    args = kld.argv("llama-perplexity", "m.gguf", "b.logits", ctx=512, threads=2, kv_args=["-ctk", "q8_0"])
    assert args[args.index("-c") + 1] == "512" and "--kl-divergence" in args and "-f" not in args
    base = kld.base_argv("llama-perplexity", "b.gguf", "c.txt", "o.logits", ctx=512, chunks=20)
    assert base[base.index("--kl-divergence-base") + 1] == "o.logits" and "--kl-divergence" not in base


def test_spearman():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)


# ---------------------------------------------------------------- llama-bench parser
def test_bench_parse_rows(capture):
    rows = bench.parse(capture("bench_cpu_q8_0_q4_0.json"))
    assert [(r.test, r.n_depth) for r in rows] == [("pp64", 0), ("tg16", 0), ("pp64", 256), ("tg16", 256)]
    r = rows[0]
    assert r.avg_ts == pytest.approx(8.82695) and r.stddev_ts == pytest.approx(0.2719)
    assert r.samples_ts == (8.63469, 9.01921)
    assert (r.type_k, r.type_v, r.flash_attn) == ("q8_0", "q4_0", True)
    assert r.device == "Intel(R) Xeon(R) Processor" and r.backends == "CPU"


def test_bench_parse_with_log_lines_around(capture):
    text = "load_backend: [x] loaded CPU backend\n" + capture("bench_cpu_q8_0_q4_0.json") + "\nllama_perf: done\n"
    assert len(bench.parse(text)) == 4


def test_bench_parse_with_stderr_between_test_objects(capture):
    # llama-bench ends a test object with "  }" and no newline and writes the "," before the next;
    # --progress and libllama's log go to stderr, which run_tool interleaves: seen in between.
    lines = capture("bench_cpu_q8_0_q4_0.json").splitlines()
    first_end = lines.index("  },")
    lines[first_end:first_end + 1] = ["  }llama-bench: benchmark 2/4: starting",
                                      "0.00.213.511 I llama_kv_types: layer blk=0 ord=0 k=q8_0 v=q8_0", ","]
    assert len(bench.parse("\n".join(lines))) == 4


@pytest.mark.parametrize("text,match", [
    ("error: unknown argument: -o\n", "no JSON"),
    ("[\n  {\"n_prompt\": 1,\n", "malformed"),
    ("[\n]\n", "no tests"),
    ("[\n  {\"n_prompt\": 512}\n]\n", "lacks a field"),
])
def test_bench_parse_errors(text, match):
    with pytest.raises(ToolError, match=match):
        bench.parse(text)


def test_bench_argv():
    args = bench.argv("llama-bench", "m.gguf", pp=512, tg=128, depths=(0, 8192), ngl=99, kv_args=["-fa", "on"])
    assert args[args.index("-d") + 1] == "0,8192" and args[args.index("-o") + 1] == "json"
    assert args[args.index("-ngl") + 1] == "99"


def test_bench_frame_pairs_prefill_and_decode(capture):
    from dataclasses import asdict
    from types import SimpleNamespace
    rows = [asdict(r) for r in bench.parse(capture("bench_cpu_q8_0_q4_0.json"))]
    res = SimpleNamespace(kind="bench", label="q8_0/q4_0", metrics={"rows": rows, "device": "cpu", "build_key": "k"})
    df = bench_frame([res])
    assert list(df.depth) == [0, 256]
    assert df.loc[0, "pp_ts"] == 8.83 and df.loc[1, "tg_ts"] == 2.91 and df.loc[0, "pp_sd"] == 0.27


# ---------------------------------------------------------------- bad input (no tools needed)
def test_kld_base_with_another_vocabulary_is_refused(tmp_path):
    from synth import write_synthetic_gguf

    from lacq.measure.kld import check_same_model
    from lacq.model.info import inspect_model
    a = write_synthetic_gguf(tmp_path / "a.gguf", n_blocks=2)
    b = write_synthetic_gguf(tmp_path / "b.gguf", n_blocks=3)
    with pytest.raises(LacqError, match="not a quantization of"):
        check_same_model(inspect_model(a), inspect_model(b), a, b)


def test_kld_refuses_when_the_disk_cannot_hold_the_logits(tmp_path, monkeypatch):
    import shutil
    from types import SimpleNamespace

    from lacq.measure import kld as measure
    from lacq.results.store import Store
    corpus = tmp_path / "c.txt"
    corpus.write_text("x")
    base = tmp_path / "b.gguf"
    base.write_bytes(b"GGUF")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: SimpleNamespace(total=1, used=0, free=100_000_000))
    build = SimpleNamespace(key="k", tool=lambda n: n)
    with pytest.raises(LacqError, match=r"take 501 MB .* 100 MB free"):
        measure.base_logits(build, Store(tmp_path / "r.sqlite"), base, SimpleNamespace(n_vocab=49152), corpus,
                            ctx=512, chunks=20)


# ---------------------------------------------------------------- e2e
@pytest.mark.e2e
def test_kld_cli_caches_base_logits_and_stores_statistics(cpu_build, smollm2):
    # The base is the model itself with an f16 KV cache: the KV configurations are what differ.
    from lacq.results.store import open_store
    args = ["kld", str(smollm2), "--base", str(smollm2), "-c", "128", "--chunks", "2", "-t", "1"]
    r = CliRunner().invoke(cli, args + ["--label", "f16 kv"])
    assert r.exit_code == 0, r.output
    assert "Mean KLD = " in r.output
    r = CliRunner().invoke(cli, args + ["--ctk", "q8_0", "--ctv", "q4_0", "--boundary", "2", "--label", "q4 kv"])
    assert r.exit_code == 0, r.output
    assert "base logits cached" in r.output
    res = {x.label: x for x in open_store().results(kind="kld")}
    m = res["q4 kv"].metrics
    assert m["n_chunks"] == 2 and res["q4 kv"].chunks == 2 and res["q4 kv"].ctx == 128
    assert res["f16 kv"].metrics["kld_mean"] == pytest.approx(0, abs=1e-4)  # same model, same cache types
    assert 0 < m["kld_mean"] < 1 and "p99" in m["kld_quantiles"] and 0 < m["same_top_p_pct"] <= 100
    assert m["ppl_base"] == pytest.approx(res["f16 kv"].metrics["ppl_base"])
    assert res["q4 kv"].env == {"LLAMA_KV_TYPES_V": "0..1=q8_0,-2..-1=q8_0"}
    df = kld_frame(open_store().results(kind="kld"))
    assert set(df.configuration) == {"f16 kv", "q4 kv"}


@pytest.mark.e2e
def test_kld_cli_refuses_a_base_that_is_another_model(cpu_build, smollm2, tmp_path):
    from synth import write_synthetic_gguf
    other = write_synthetic_gguf(tmp_path / "other.gguf", n_blocks=2)
    r = CliRunner().invoke(cli, ["kld", str(smollm2), "--base", str(other), "-c", "128", "--chunks", "1"])
    assert r.exit_code != 0 and "not a quantization of" in r.output and "Traceback" not in r.output


@pytest.mark.e2e
def test_bench_cli_parses_and_stores(cpu_build, smollm2):
    from lacq.results.store import open_store
    r = CliRunner().invoke(cli, ["bench", str(smollm2), "--pp", "32", "--tg", "4", "--depth", "0,64", "-r", "1",
                                 "-t", "1", "--ctk", "q8_0", "--ctv", "q4_0", "--boundary", "2", "--format", "csv"])
    assert r.exit_code == 0, r.output
    (res,) = open_store().results(kind="bench")
    rows = res.metrics["rows"]
    assert [(x["test"], x["n_depth"]) for x in rows] == [("pp32", 0), ("tg4", 0), ("pp32", 64), ("tg4", 64)]
    assert all(x["avg_ts"] > 0 and x["type_v"] == "q4_0" for x in rows)
    assert res.metrics["build_key"] == cpu_build.key and res.metrics["device"]
    assert res.env == {"LLAMA_KV_TYPES_V": "0..1=q8_0,-2..-1=q8_0"}


@pytest.mark.parametrize("kw,match", [
    ({"n_vocab": 300}, "n_vocab 300 vs 256"),
    ({"extra_kv": {"tokenizer.ggml.model": "llama"}}, "tokenize differently .*tokenizer.ggml.model"),
])
def test_kld_base_with_another_tokenizer_is_refused(tmp_path, kw, match):
    from synth import write_synthetic_gguf

    from lacq.measure.kld import check_same_model
    from lacq.model.info import inspect_model
    base = write_synthetic_gguf(tmp_path / "base.gguf", n_blocks=2, extra_kv={"tokenizer.ggml.model": "gpt2"})
    model = write_synthetic_gguf(tmp_path / "m.gguf", n_blocks=2, **{"extra_kv": {"tokenizer.ggml.model": "gpt2"}, **kw})
    check_same_model(inspect_model(base), inspect_model(base), base, base)
    with pytest.raises(LacqError, match=match):
        check_same_model(inspect_model(base), inspect_model(model), base, model)


def test_bench_scripts_turn_lacq_errors_into_one_line(capsys):
    import sys
    sys.path.insert(0, str(REPO / "bench"))
    from common import run_script
    def bad():
        raise LacqError("depth 8192 + 512 tokens is longer than the model supports (8192 tokens)")

    def interrupted():
        raise KeyboardInterrupt

    assert run_script(lambda: None) == 0
    assert run_script(bad) == 1
    assert capsys.readouterr().err == "error: depth 8192 + 512 tokens is longer than the model supports (8192 tokens)\n"
    assert run_script(interrupted) == 130


def test_too_few_scored_tokens_for_kld_statistics_are_refused_up_front():
    from lacq.measure.kld import check_kld_tokens
    check_kld_tokens(512, 1)  # 255 scored tokens
    check_kld_tokens(128, 2)  # 126
    with pytest.raises(LacqError, match=r"1 chunk\(s\) of 128 tokens score 63 tokens .* from 100 on"):
        check_kld_tokens(128, 1)
