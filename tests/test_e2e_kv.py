"""Per-layer KV types by KV-layer ordinal, on the real patched llama.cpp."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
from click.testing import CliRunner
from hybrid_fixture import make_hybrid_gguf

from lacq import paths
from lacq.cli import cli
from lacq.llama.build import BuildSpec, build
from lacq.measure.ppl import measure_ppl
from lacq.model.info import inspect_model
from lacq.plan.kv.config import KvConfig
from lacq.results.store import open_store

pytestmark = pytest.mark.e2e


def lacq(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def _last_ppl():
    return open_store().results(kind="ppl")[-1]


def test_boundary_2_on_smollm2_upgrades_blocks_0_1_28_29(cpu_build, smollm2):
    r = lacq("ppl", smollm2, "--chunks", "2", "--ctk", "q8_0", "--ctv", "q4_0", "--boundary", "2")
    assert r.exit_code == 0, r.output
    res = _last_ppl()
    layers = res.metrics["kv_layers"]
    assert [l["block"] for l in layers] == list(range(30))
    assert [l["block"] for l in layers if l["v_type"] == "q8_0"] == [0, 1, 28, 29]
    assert {l["k_type"] for l in layers} == {"q8_0"}
    # bits/value measured from the bytes the cache allocated
    assert res.metrics["v_bits_per_value"] == pytest.approx((26 * 4.5 + 4 * 8.5) / 30, abs=1e-3)
    assert res.kv["v_overrides"] == ["0..1=q8_0", "-2..-1=q8_0"]
    assert "per-layer types: blk 0 (ord 0)" in r.output


def test_kv_policy_file_layer0_high(cpu_build, smollm2):
    r = lacq("ppl", smollm2, "--chunks", "2", "--ctk", "q4_0", "--ctv", "q4_0", "--kv-policy", "layer0_high")
    assert r.exit_code == 0, r.output
    layers = _last_ppl().metrics["kv_layers"]
    assert (layers[0]["k_type"], layers[0]["v_type"]) == ("f16", "f16")
    assert {(l["k_type"], l["v_type"]) for l in layers[1:]} == {("q4_0", "q4_0")}


@pytest.fixture(scope="module")
def lfm2(tmp_path_factory, e2e_home):
    from conftest import _lacq_home
    with _lacq_home(e2e_home):
        return make_hybrid_gguf(tmp_path_factory.mktemp("hybrid") / "lfm2.gguf", arch="lfm2")


def test_hybrid_boundary_uses_attention_blocks_only(cpu_build, lfm2):
    info = inspect_model(lfm2["path"])
    assert list(info.kv_blocks) == lfm2["kv_blocks"] == [2, 5, 6, 9, 12, 14]
    r = lacq("inspect", lfm2["path"], "--json")
    assert json.loads(r.output)["kv_blocks"] == lfm2["kv_blocks"]
    r = lacq("ppl", lfm2["path"], "--chunks", "1", "--ctk", "q8_0", "--ctv", "q4_0", "--boundary", "2")
    assert r.exit_code == 0, r.output
    layers = _last_ppl().metrics["kv_layers"]
    assert [l["block"] for l in layers] == [2, 5, 6, 9, 12, 14]
    assert [l["block"] for l in layers if l["v_type"] == "q8_0"] == [2, 5, 12, 14]
    assert [l["block"] for l in layers if l["v_type"] == "q4_0"] == [6, 9]


def test_hybrid_ordinal_beyond_kv_layers_is_refused_before_work(lfm2):
    r = lacq("ppl", lfm2["path"], "--ctv", "q4_0", "--boundary", "7")
    assert r.exit_code != 0 and "this model has 6 KV layers" in r.output


def test_iswa_ordinals_span_both_caches(cpu_build, tmp_path, e2e_home):
    from conftest import _lacq_home
    with _lacq_home(e2e_home):
        g = make_hybrid_gguf(tmp_path / "gemma3.gguf", arch="gemma3")
    r = lacq("ppl", g["path"], "--chunks", "1", "--ctk", "q8_0", "--ctv", "q4_0", "--boundary", "2")
    assert r.exit_code == 0, r.output
    layers = _last_ppl().metrics["kv_layers"]
    assert [l["block"] for l in layers] == list(range(12))
    assert [l["block"] for l in layers if l["v_type"] == "q8_0"] == [0, 1, 10, 11]


def test_patch_itself_rejects_bad_policies(cpu_build, smollm2):
    """The C++ side's own checks (for users who set the variables by hand)."""
    corpus = paths.default_corpus()
    for env_value, needle in (("31=q8_0", "ordinal 31 is out of range: this model has 30 KV layers"),
                              ("0=q9_0", "unknown KV cache type 'q9_0'"),
                              ("3..1=q8_0", "empty")):
        proc = subprocess.run([str(cpu_build.tool("llama-perplexity")), "-m", str(smollm2), "-f", str(corpus),
                               "-c", "128", "--chunks", "1", "-fa", "on", "-ctv", "q4_0"],
                              env=dict(os.environ, LLAMA_KV_TYPES_V=env_value), capture_output=True, text=True)
        assert proc.returncode != 0
        assert needle in proc.stdout + proc.stderr


def test_no_policy_is_identical_to_the_stock_build(cpu_build, smollm2, tmp_path):
    """The patch series changes nothing when no policy is given."""
    stock = build(BuildSpec(backend="cpu", patches=False))
    assert stock.patches == () and stock.key != cpu_build.key
    store = open_store()
    info = inspect_model(smollm2)
    for kv in (KvConfig("f16", "f16", "on"), KvConfig("q8_0", "q4_0", "on")):
        a = measure_ppl(cpu_build, store, smollm2, info, kv, paths.default_corpus(), chunks=2)
        b = measure_ppl(stock, store, smollm2, info, kv, paths.default_corpus(), chunks=2)
        assert a.result.chunks == b.result.chunks and a.result.ppl == b.result.ppl
        assert a.result.kv_layers == () and a.result.kv_buffer_mib == b.result.kv_buffer_mib
