"""Qwen2.5-Coder-1.5B-Instruct Q4_K_M, the third real model (qwen2, 1.5B, 2 KV heads): a named model joined
from 22 PyPI chunk wheels, inspected and measured on 2 cores. Its K-cache scan is committed
(bench/results/kv-cpu/scan_kv_qwen25_coder_k.json) and read by tests/test_sensitivity_pattern.py."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from lacq.cli import cli
from lacq.model.resolve import QWEN25_CODER_SHA256, resolve_model
from lacq.results.store import open_store

pytestmark = pytest.mark.e2e


def test_qwen25_coder_is_a_named_model_and_inspects(qwen25_coder):
    assert resolve_model("qwen2.5-coder-1.5b") == qwen25_coder  # the fixture's file, not a second download
    assert qwen25_coder.stat().st_size == 1_117_320_768
    r = CliRunner().invoke(cli, ["inspect", str(qwen25_coder), "--json"])
    assert r.exit_code == 0, r.output
    m = json.loads(r.output)
    assert (m["architecture"], m["file_type"], m["n_blocks"], m["n_head"], m["n_head_kv"], m["head_dim"]) == \
        ("qwen2", "Q4_K_M", 28, 12, 2, 128)
    assert m["n_vocab"] == 151936 and m["kv_blocks"] == list(range(28))
    names = {t["name"] for t in m["tensors"]}
    assert {f"blk.0.attn_{x}.bias" for x in "qkv"} <= names  # qwen2's attention biases
    assert sum(t["n_elements"] for t in m["tensors"]) == pytest.approx(1.78e9, rel=0.01)


def test_qwen25_coder_kld_by_name(qwen25_coder, cpu_build):
    # one chunk of 256 tokens (127 scored: llama-perplexity's KLD statistics need 100) against the model's own
    # f16-cache logits: K q8_0 costs almost nothing
    r = CliRunner().invoke(cli, ["kld", "qwen2.5-coder-1.5b", "--base", "qwen2.5-coder-1.5b", "-c", "256",
                                 "--chunks", "1", "-t", "2", "--ctk", "q8_0", "--label", "qwen"])
    assert r.exit_code == 0, r.output
    (res,) = open_store().results(kind="kld")
    assert res.label == "qwen" and res.model_sha256 == QWEN25_CODER_SHA256
    assert 0 <= res.metrics["kld_mean"] < 0.05
    assert (res.kv["k"], res.kv["v"]) == ("q8_0", "f16")
