"""`lacq optimize --refine` through the evaluation engine on the real model: the numbers of the assembled files,
the journal kept across Ctrl-C, `--no-engine` starting no engine."""

from __future__ import annotations

import os
from dataclasses import replace

import pytest
from click.testing import CliRunner
from procutil import descendants

from lacq import paths
from lacq.cli import cli
from lacq.model.info import inspect_model
from lacq.results.store import Store, open_store
from lacq.studies import engine as engine_mod
from lacq.studies.engine import engine_available
from lacq.studies.scan import scan_weights

pytestmark = pytest.mark.e2e
CTX, CHUNKS, JUDGE = 128, 2, 3  # moves measured on 2 chunks, proposals judged on 3: two engine sessions
ENGINE_NAME = "llama-perplexit"  # /proc's command name: the first 15 characters


@pytest.fixture(autouse=True)
def _engine_built(cpu_build):
    if not engine_available(cpu_build):
        pytest.skip("this build lacks the evaluation engine patch (*-evaluation-engine-*)")


@pytest.fixture
def scan_file(cpu_build, smollm2, smollm2_f16, tmp_path):
    scan = scan_weights(cpu_build, open_store(), smollm2, smollm2_f16, paths.default_corpus(), types=["q4_0", "q8_0"],
                        units=("group",), chunks=CHUNKS, ctx=CTX)
    q80, q40 = (sum(u.cost[t] for u in scan.units) + scan.fixed_cost for t in ("q8_0", "q4_0"))
    return scan.write(tmp_path / "scan.json"), (q40 + (q80 - q40) / 2) / 1e6


def _refine(scan_file, tmp_path, *extra: str):
    path, budget_mb = scan_file
    return CliRunner().invoke(cli, ["optimize", "weights", str(path), "--size-mb", f"{budget_mb:.2f}", "-o",
                                    str(tmp_path / "opt.toml"), "--force", "--refine", "1", "--judge-chunks",
                                    str(JUDGE), *extra])


def _journal(store: Store) -> dict[tuple[str, str], dict]:
    """(study, label) -> metrics of every refinement measurement."""
    return {(r.study, r.label): r.metrics for r in store.results(kind="kld") if r.study.startswith("refine:")}


def _printed(m: dict) -> tuple[str, ...]:
    """The statistics at the precision llama-perplexity prints them (what its log gives the assembled path)."""
    kld = [m["kld_mean"], m["kld_mean_error"], m["ppl_q"], m["ppl_q_error"]]
    kld += [v for _, v in sorted(m["kld_quantiles"].items())]
    return (tuple(sorted(m["kld_quantiles"])) + tuple(f"{v:10.6f}" for v in kld) + (f"{m['same_top_p_pct']:6.3f}", f"{m['same_top_p_error_pct']:5.3f}")
            + tuple(f"{c['kld']:.5f}" for c in m["chunks"]))  # its per-chunk rows: 5 decimals


def test_refine_in_the_engine_measures_what_assembled_files_measure_and_no_engine_starts_none(
        scan_file, tmp_path, monkeypatch):
    """The same command twice, each on its own results database: with --no-engine (no engine may start) every
    choice is a file assembled and measured by llama-perplexity; then through the engine. Each refinement
    measurement the engine made is one the assembled path made under the same journal key (study and label),
    with the same statistics to the digit."""
    def no_engine(*a, **k):
        raise AssertionError("--no-engine started an engine")

    with monkeypatch.context() as m:
        m.setattr(engine_mod.EngineSession, "__init__", no_engine)
        result = _refine(scan_file, tmp_path, "--no-engine")
    assert result.exit_code == 0, result.output
    assembled = _journal(open_store())
    assert assembled and not any(m.get("engine") for m in assembled.values())
    assert {s.rsplit(":", 1)[1] for s, _ in assembled} == {str(CHUNKS), str(JUDGE)}

    monkeypatch.setenv("LACQ_DB", str(tmp_path / "engine.sqlite"))
    result = _refine(scan_file, tmp_path)
    assert result.exit_code == 0, result.output
    engine = _journal(open_store())
    assert engine and all(m.get("engine") is True for m in engine.values())
    assert {s.rsplit(":", 1)[1] for s, _ in engine} == {str(CHUNKS), str(JUDGE)}
    moves = [k for k in engine if k[0].endswith(f":{CHUNKS}")]
    both = set(engine) & set(assembled)
    assert len(both) >= len(moves) + 1  # every single-unit move and the start, at least
    for k in sorted(both):
        assert _printed(engine[k]) == _printed(assembled[k]), k
    assert not [p for p, name in descendants(os.getpid()).items() if name == ENGINE_NAME]  # the CLI stopped them


def test_refine_interrupted_then_rerun_measures_nothing_twice(scan_file, tmp_path, monkeypatch):
    """Ctrl-C after three engine measurements: the command stops its engines, the three are journaled, and the
    same command again measures only the rest."""
    measure, calls = engine_mod.EngineSession.measure, []

    def counted(self, *a, **k):
        if interrupt_at and len(calls) == interrupt_at:
            raise KeyboardInterrupt
        calls.append(k["label"])
        return measure(self, *a, **k)

    monkeypatch.setattr(engine_mod.EngineSession, "measure", counted)
    interrupt_at = 3
    result = _refine(scan_file, tmp_path)
    assert result.exit_code != 0 and not (tmp_path / "opt.toml").exists()
    assert not [p for p, name in descendants(os.getpid()).items() if name == ENGINE_NAME]  # none left running
    first = _journal(open_store())
    assert len(first) == 3
    interrupt_at, calls[:] = 0, []
    result = _refine(scan_file, tmp_path)
    assert result.exit_code == 0, result.output
    done = open_store().results(kind="kld")
    refined = [(r.study, r.label) for r in done if r.study.startswith("refine:")]
    assert len(refined) == len(set(refined)) == 3 + len(calls)  # nothing measured twice
    assert not set(first) & {k for k in refined[3:]}
    assert len(calls) > 3 and (tmp_path / "opt.toml").exists()


def test_kv_choices_in_the_engine_measure_what_their_own_runs_measure(cpu_build, smollm2, tmp_path):
    """A KV refinement's choices (per-layer V types on the scanned model) measured in one engine, and each by its
    own llama-perplexity run: the same statistics under the same journal keys."""
    from lacq.corpus import judge_text
    from lacq.studies.refine import kv_runner
    from tests.test_optimize import additive_scan
    n_kv = len(inspect_model(smollm2).kv_blocks)
    sens = {f"kv.{i}": 0.01 for i in range(n_kv)}
    s = additive_scan(sens, {u: {"q4_0": 4.5, "q8_0": 8.5} for u in sens}, kind="kv", types=("q4_0", "q8_0"),
                      err={"q4_0": 1.0, "q8_0": 0.1}, base={"cache": "v", "reference": "f16", "other": "q8_0"},
                      total_values=float(n_kv))
    scan = replace(s, model={"path": str(smollm2), "sha256": open_store().sha256(smollm2)}, chunks=CHUNKS, ctx=CTX,
                   provenance={"study": "scan-kv:test"})
    choices = [{u: "q8_0" if i < 3 else "q4_0" for i, u in enumerate(sens)},  # mostly q4_0, three layers q8_0
               {u: "q4_0" if i % 2 else "q8_0" for i, u in enumerate(sens)}]
    got = {}
    for engine, db in ((True, "engine.sqlite"), (False, "runs.sqlite")):
        store = Store(tmp_path / db)
        measure, key = kv_runner(cpu_build, store, scan, judge_text(), engine=engine)
        with measure:
            measure({key(c): c for c in choices}, CHUNKS)
        got[engine] = _journal(store)
    assert len(got[True]) == len(choices) and set(got[True]) == set(got[False])
    assert all(m.get("engine") is True for m in got[True].values())
    for k, m in got[True].items():
        assert _printed(m) == _printed(got[False][k]), k
