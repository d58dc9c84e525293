"""turbo2/3/4 (patch 0004) and tqs2/3/4 (patch 0008) KV-cache types on the real patched llama.cpp, CPU."""

from __future__ import annotations

import os
import subprocess

import pytest
from click.testing import CliRunner
from hybrid_fixture import make_hybrid_gguf

from lacq import paths
from lacq.cli import cli
from lacq.results.store import open_store

pytestmark = pytest.mark.e2e


def lacq(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def test_turbo_v_allocates_its_bits(cpu_build, smollm2):
    r = lacq("ppl", smollm2, "--chunks", "2", "--ctk", "q8_0", "--ctv", "turbo3")
    assert r.exit_code == 0, r.output
    res = open_store().results(kind="ppl")[-1]
    m = res.metrics
    assert (m["k_type"], m["v_type"]) == ("q8_0", "turbo3")
    assert m["v_mib"] / m["k_mib"] == pytest.approx(3.5 / 8.5, rel=0.01)  # bytes really allocated
    assert 10 < m["ppl"] < 60


def test_turbo_k_switches_flash_attention_on_with_a_notice(cpu_build, smollm2):
    r = lacq("ppl", smollm2, "--chunks", "1", "--ctk", "turbo4", "--ctv", "f16")
    assert r.exit_code == 0, r.output
    assert "flash attention switched on" in r.output
    assert open_store().results(kind="ppl")[-1].metrics["flash_attn"] == "enabled"


def test_boundary_v2_turbo_policy(cpu_build, smollm2):
    r = lacq("ppl", smollm2, "--chunks", "1", "--kv-policy", "boundary_v2_turbo")
    assert r.exit_code == 0, r.output
    m = open_store().results(kind="ppl")[-1].metrics
    assert [l["block"] for l in m["kv_layers"] if l["v_type"] == "q8_0"] == [0, 1, 28, 29]
    assert {l["v_type"] for l in m["kv_layers"] if l["block"] not in (0, 1, 28, 29)} == {"turbo2"}
    assert m["v_bits_per_value"] == pytest.approx((26 * 2.5 + 4 * 8.5) / 30, abs=1e-3)


@pytest.mark.parametrize("v", ["tqs2", "tqs3", "tqs4", "tql2", "tql3", "tql4"])
def test_tqs_v_allocates_its_bits(cpu_build, smollm2, v):
    r = lacq("ppl", smollm2, "--chunks", "2", "--ctk", "q8_0", "--ctv", v)
    assert r.exit_code == 0, r.output
    m = open_store().results(kind="ppl")[-1].metrics
    assert (m["k_type"], m["v_type"]) == ("q8_0", v)
    bits = {"tqs2": 2.5, "tqs3": 3.5, "tqs4": 4.5, "tql2": 2.5, "tql3": 3.5, "tql4": 4.5}[v]
    assert m["v_mib"] / m["k_mib"] == pytest.approx(bits / 8.5, rel=0.01)  # bytes really allocated
    assert 10 < m["ppl"] < 60


@pytest.mark.parametrize("t", ["tqs4", "tql3"])
def test_tqs_k_runs_in_flash_attention(cpu_build, smollm2, t):
    r = lacq("ppl", smollm2, "--chunks", "1", "--ctk", t, "--ctv", t)
    assert r.exit_code == 0, r.output
    m = open_store().results(kind="ppl")[-1].metrics
    assert m["flash_attn"] == "enabled" and 10 < m["ppl"] < 80


@pytest.mark.parametrize("v", ["turbo3", "tqs3", "tql2"])
def test_head_size_not_multiple_of_64_is_refused(cpu_build, tmp_path, e2e_home, v):
    from conftest import _lacq_home
    with _lacq_home(e2e_home):
        fx = make_hybrid_gguf(tmp_path / "hd32.gguf", arch="lfm2", n_embd=64, n_head=2, n_head_kv=1)
    assert fx["head_dim"] == 32
    r = lacq("ppl", fx["path"], "--chunks", "1", "--ctv", v)
    assert r.exit_code != 0 and "multiple of 64" in r.output and "Traceback" not in r.output
    # the patch refuses it too, for users who call llama.cpp directly
    proc = subprocess.run([str(cpu_build.tool("llama-perplexity")), "-m", fx["path"], "-f",
                           str(paths.default_corpus()), "-c", "128", "--chunks", "1", "-fa", "on",
                           "-ctv", v], capture_output=True, text=True, env=dict(os.environ))
    assert proc.returncode != 0
    assert ("turbo, tqs and tql KV types need a head size that is a multiple of 64; this model has 32"
            in proc.stdout + proc.stderr)
