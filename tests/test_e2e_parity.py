"""`lacq parity` and `lacq compare` on the real CPU build and SmolLM2 (one chunk of 512), and
test-backend-ops counted on the real binary."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from lacq.cli import cli
from lacq.errors import ToolError
from lacq.llama.build import BuildSpec, build
from lacq.llama.tools import backend_ops, kv_bytes
from lacq.studies import parity

pytestmark = pytest.mark.e2e


def test_parity_on_cpu_writes_the_document_and_compares_through_the_same_reference(cpu_build, smollm2, tmp_path,
                                                                                    monkeypatch):
    out = tmp_path / "parity-cpu.json"
    r = CliRunner().invoke(cli, ["parity", "--backend", "cpu", "--chunks", "1", "--no-backend-ops", "--out", str(out)])
    assert r.exit_code == 0, r.output
    doc = json.loads(out.read_text())
    assert doc["suite_version"] == parity.SUITE_VERSION and doc["backend"] == "cpu" and doc["device"]
    assert doc["build_key"] == cpu_build.key and doc["patch_series"]["patches"] == list(cpu_build.patches)
    assert doc["provenance"]["host"] and doc["chunks"] == 1 and doc["ctx"] == 512
    rows = {c["name"]: c for c in doc["configs"]}
    assert [c.name for c in parity.suite_configs()] == list(rows)
    assert all(c["status"] == "ok" for c in rows.values())  # the CPU runs every configuration
    assert abs(rows["f16/f16"]["kld"]) < 1e-4 and rows["f16/f16"]["same_top_p_pct"] == 100.0
    assert rows["q8_0/turbo2 +boundary 2"]["kld"] > rows["q8_0/turbo4"]["kld"] > 0
    ref = doc["reference"]
    assert ref["made_by_build"] == cpu_build.key and len(ref["sha256"]) == 64

    # Another backend takes the reference with --base-logits (here the CPU again, f16 only: fast).
    monkeypatch.setattr(parity, "suite_configs", lambda: [parity.SuiteConfig("f16/f16", parity.kv_from_flags())])
    second = tmp_path / "parity-again.json"
    r = CliRunner().invoke(cli, ["parity", "--backend", "cpu", "--base-logits", ref["path"], "--no-backend-ops",
                                 "--out", str(second)])
    assert r.exit_code == 0, r.output
    again = json.loads(second.read_text())
    assert again["reference"]["sha256"] == ref["sha256"] and again["reference"]["made_by_build"] is None
    assert again["configs"][0]["ppl"] == rows["f16/f16"]["ppl"]  # same tokens, same build: identical
    r = CliRunner().invoke(cli, ["compare", str(out), str(second), "--format", "md"])
    assert r.exit_code == 3 and "6 configuration(s) ran on only one of" in r.output, r.output  # a partial second
    r = CliRunner().invoke(cli, ["compare", str(out), str(second), "--format", "md", "--allow-partial"])
    assert r.exit_code == 0, r.output
    assert "| f16/f16 |" in r.output


def test_backend_ops_counts_set_rows_on_the_cpu_build_and_refuses_a_wrong_device_name(e2e_home, tmp_path):
    tools = build(BuildSpec(backend="cpu", extra_targets=backend_ops.CHECK_TARGETS))
    tool = tools.tool("test-backend-ops")
    r = backend_ops.run(tool, "CPU", "SET_ROWS", tmp_path / "set_rows.log")
    c = r.per_op["SET_ROWS"]
    assert r.tested and c["ran"] == c["passed"] > 0 and c["failed"] == 0
    assert c["turbo passed"] > 0  # patch 0004's turbo SET_ROWS cases ran
    with pytest.raises(ToolError, match="tested nothing"):
        backend_ops.run(tool, "MTL0", "SET_ROWS", tmp_path / "wrong.log")


def test_kv_bytes_on_the_cpu_build_equal_the_reference_quantizer(e2e_home, tmp_path):
    """Patch 0011: the CPU's (vectorized) SET_ROWS and CPY write the scalar reference's bytes for all nine types."""
    tools = build(BuildSpec(backend="cpu", extra_targets=backend_ops.CHECK_TARGETS))
    r = kv_bytes.run(tools.tool(kv_bytes.TARGET), "CPU", tmp_path / "kv_bytes.log")
    assert r["types"] == ["tql2", "tql3", "tql4", "tqs2", "tqs3", "tqs4", "turbo2", "turbo3", "turbo4"]
    assert (r["cases"], r["unsupported"], r["differ"]) == (27, 0, 0) and r["blocks"] > 0, r
    # issue 19, item 7: the counts, with "not supported" apart, and what the CPU's rows can show
    log = (tmp_path / "kv_bytes.log").read_text()
    assert "27 cases compared, 0 not supported (not compared)" in log
    assert "CPU: turbo types are written with the reference quantizer itself" in log
    with pytest.raises(ToolError, match="compared nothing"):
        kv_bytes.run(tools.tool(kv_bytes.TARGET), "MTL0", tmp_path / "wrong.log")
