"""`optimize --verify` judges the answer as refine judges its proposals: on the judge text, at --judge-chunks chunks
(never fewer than the scan's), not at the scan's own chunk count."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from click.testing import CliRunner

from lacq.cli import cli
from lacq.errors import LacqError
from lacq.studies import verify
from lacq.studies.optimize import optimize
from tests.test_optimize import TINY
from tests.test_optimize_writes import _kv_scan, _scan

POLICY = 'name = "p"\ndescription = "test"\nv = "q4_0"\n[[v_layers]]\nlayers = "0"\ntype = "q8_0"\n'


@pytest.fixture
def measured(monkeypatch, tmp_path):
    """verify's measurement and what it stands on, faked: the chunk counts measure_kld was asked for."""
    asked = []

    def fake_kld(*a, chunks, **kw):
        asked.append(chunks)
        return SimpleNamespace(result_id=1, result=SimpleNamespace(kld_mean=0.01))

    monkeypatch.setattr(verify, "measure_kld", fake_kld)
    monkeypatch.setattr(verify, "inspect_model", lambda path: SimpleNamespace(path=path))
    monkeypatch.setattr(verify, "load_recipe", lambda path: None)
    monkeypatch.setattr(verify, "resolve_recipe", lambda *a, **kw: SimpleNamespace(recipe="r", plan_hash="h"))
    monkeypatch.setattr(verify, "quantize_with_plan", lambda *a, **kw: SimpleNamespace(output=tmp_path / "q.gguf"))
    return asked


@pytest.mark.parametrize("judge, chunks", [(None, 4), (20, 20), (2, 4)])  # the scans here have 4 chunks
def test_verify_measures_at_the_judge_chunk_count(tmp_path, measured, judge, chunks):
    policy = tmp_path / "p.toml"
    policy.write_text(POLICY)
    kv = _kv_scan(str(tmp_path / "m.gguf"))
    assert TINY.chunks == kv.chunks == 4
    verify.verify_weights(None, None, TINY, optimize(TINY, TINY.fixed_cost + 7000), tmp_path / "r.toml",
                          tmp_path / "judge.txt", label="w", judge_chunks=judge)
    verify.verify_kv(None, None, kv, optimize(kv, 6.0), policy, tmp_path / "judge.txt", label="k",
                     judge_chunks=judge)
    assert measured == [chunks, chunks]


@pytest.mark.parametrize("kind", ["weights", "kv"])
@pytest.mark.parametrize("args, chunks", [([], 20), (["--judge-chunks", "7"], 7)])
def test_optimize_verify_hands_judge_chunks_to_the_verification(tmp_path, monkeypatch, kind, args, chunks):
    monkeypatch.setattr("lacq.cli.common.require_build", lambda spec, source=None: SimpleNamespace())
    monkeypatch.setattr("lacq.model.info.inspect_model", lambda path: None)
    path, budget = _scan(tmp_path, kind, file_there=True)
    asked = []

    def fake(*a, judge_chunks, **kw):
        asked.append(judge_chunks)
        raise LacqError("stop here")

    monkeypatch.setattr(f"lacq.studies.verify.verify_{kind}", fake)
    r = CliRunner().invoke(cli, ["optimize", kind, str(path), *budget, "--verify", "-o", str(tmp_path / "o.toml"),
                                 *args])
    assert "stop here" in r.output and asked == [chunks], r.output
