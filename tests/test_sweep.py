"""`lacq sweep` without a build: the TOML format, run keys, resume bookkeeping, executors' bad input."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from cliutil import assert_clean_error, run_cli

from lacq.errors import SweepError
from lacq.llama.build import Build
from lacq.results.store import open_store
from lacq.studies.sweep import WorkerSetup, load_sweep, plan_runs, progress_of, run_sweep, stored_keys
from lacq.studies.sweep_exec import LocalExecutor, make_executor

TINY = """
name = "tiny"
models = ["smollm2"]
kv = ["f16/f16", {ctk = "q8_0", ctv = "q4_0"}]
contexts = [128, 256]
measurements = ["ppl"]

[ppl]
chunks = 1
"""
BUILD = Build(key="k0", bin_dir=Path("/nonexistent"), source_hash="s", source_origin="o", series_hash="h",
              patches=(), backend="cpu")


def _sweep_file(tmp_path, text=TINY):
    p = tmp_path / "sweep.toml"
    p.write_text(text)
    return p


def _plan(tmp_path, store, build=BUILD):
    model = tmp_path / "m.gguf"
    if not model.exists():
        model.write_bytes(b"GGUF" + bytes(60))
    sweep = load_sweep(_sweep_file(tmp_path))
    return sweep, plan_runs(sweep, build, store, lambda spec, recipe: model, lambda m, c, n: tmp_path / "l")


class FakeExecutor:
    """Runs nothing: makes a stored-row dict per run, and can stop after `stop_after` runs (Ctrl-C)."""
    name = "fake"

    def __init__(self, model: Path, stop_after: int | None = None):
        self.model, self.stop_after, self.executed = model, stop_after, []

    def run(self, runs, setup, on_done, on_progress):
        for run in runs:
            if self.stop_after is not None and len(self.executed) == self.stop_after:
                raise KeyboardInterrupt
            self.executed.append(run.key)
            row = dict(id=0, kind=run.measurement, created=0.0, label=run.label, study=None,
                       model_path=str(self.model), model_sha256="x", model_bytes=1, recipe=None, plan_hash=None,
                       kv=run.kv.to_dict(), corpus_sha256=None, ctx=run.ctx, chunks=1, build={}, command=[],
                       env=None, wall_seconds=1.0, host="h", metrics={"ppl": 10.0, "ppl_error": 1.0},
                       node={"host": "h"}, device="cpu")
            on_done(run, row, None)


def test_sweep_file_expands_to_four_runs_with_stable_distinct_keys(tmp_path):
    store = open_store()
    sweep, runs = _plan(tmp_path, store)
    assert sweep.name == "tiny" and len(runs) == 4
    assert len({r.key for r in runs}) == 4
    assert [r.key for r in _plan(tmp_path, store)[1]] == [r.key for r in runs]
    assert {r.label for r in runs} == {"smollm2 f16/f16 c128", "smollm2 f16/f16 c256",
                                       "smollm2 q8_0/q4_0 c128", "smollm2 q8_0/q4_0 c256"}
    # a new build is a new run (its key says which build measured it)
    other = Build(**{**BUILD.__dict__, "key": "k1"})
    assert not {r.key for r in _plan(tmp_path, store, other)[1]} & {r.key for r in runs}


def test_sweep_resumes_after_ctrl_c_running_only_the_missing_runs(tmp_path):
    store = open_store()
    sweep, runs = _plan(tmp_path, store)
    setup = WorkerSetup(home=str(tmp_path), build=BUILD, corpus=str(tmp_path))
    first = FakeExecutor(tmp_path / "m.gguf", stop_after=2)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(sweep, runs, setup, store, first)
    assert progress_of(store, "tiny")[:2] == (2, 4)
    second = FakeExecutor(tmp_path / "m.gguf")
    outcome = run_sweep(sweep, runs, setup, store, second)
    assert set(second.executed) == {r.key for r in runs} - set(first.executed)
    assert outcome.skipped == 2 and len(outcome.ran) == 2
    stored = [r for r in store.results(study="tiny") if r.kind == "ppl"]
    assert sorted(r.metrics["sweep_run"] for r in stored) == sorted(r.key for r in runs)  # each once
    assert all(r.metrics["node"] == {"host": "h"} and r.metrics["device"] == "cpu" for r in stored)
    third = FakeExecutor(tmp_path / "m.gguf")
    assert run_sweep(sweep, runs, setup, store, third).skipped == 4 and not third.executed
    assert progress_of(store, "tiny") == (4, 4, [])
    assert len(stored_keys(store, "tiny")) == 4


def test_report_shows_sweep_progress(tmp_path):
    store = open_store()
    sweep, runs = _plan(tmp_path, store)
    setup = WorkerSetup(home=str(tmp_path), build=BUILD, corpus=str(tmp_path))
    with pytest.raises(KeyboardInterrupt):
        run_sweep(sweep, runs, setup, store, FakeExecutor(tmp_path / "m.gguf", stop_after=3))
    r = run_cli("report", "--study", "tiny")
    assert r.exit_code == 0, r.output
    assert "3 of 4 runs stored" in r.output


def test_local_executor_pins_one_gpu_per_worker():
    ex = make_executor("local", backend="cpu")
    assert isinstance(ex, LocalExecutor) and ex.jobs == 1 and ex.gpus is None
    two = LocalExecutor(jobs=8, gpus=["0", "1"])
    assert two.jobs == 2 and two.gpus == ["0", "1"]


# ---------------------------------------------------------------- bad input: one line, non-zero, no results
def test_sweep_missing_file(tmp_path):
    assert_clean_error(run_cli("sweep", tmp_path / "nope.toml"), "does not exist")


def test_sweep_unknown_top_level_key(tmp_path):
    p = _sweep_file(tmp_path, TINY.replace('name = "tiny"', 'name = "tiny"\nmodel = "typo"'))
    assert_clean_error(run_cli("sweep", p), "unknown key(s) model")
    assert not open_store().results()


def test_sweep_unknown_key_in_a_kv_entry_and_a_section(tmp_path):
    p = _sweep_file(tmp_path, TINY.replace('ctv = "q4_0"', 'ctv = "q4_0", ctx = 3'))
    assert_clean_error(run_cli("sweep", p), "unknown key(s) in a kv entry: ctx")
    p = _sweep_file(tmp_path, TINY.replace("chunks = 1", "chunk = 1"))
    assert_clean_error(run_cli("sweep", p), "unknown key(s) in [ppl]: chunk")


def test_sweep_unknown_measurement_and_bad_kv_type(tmp_path):
    assert_clean_error(run_cli("sweep", _sweep_file(tmp_path, TINY.replace('["ppl"]', '["speed"]'))), "unknown measurement")
    assert_clean_error(run_cli("sweep", _sweep_file(tmp_path, TINY.replace('"q4_0"', '"q9_9"'))), "q9_9")


def test_sweep_unknown_executor(tmp_path):
    assert_clean_error(run_cli("sweep", _sweep_file(tmp_path), "--executor", "slurm"), "unknown executor 'slurm'")
    assert not open_store().results()


def test_sweep_ray_not_installed_is_one_clear_line(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    r = run_cli("sweep", _sweep_file(tmp_path), "--executor", "ray")
    assert_clean_error(r, "needs Ray", "pip install 'lacq[ray]'")
    assert len(r.output.strip().splitlines()) == 1
    assert not open_store().results()


def test_sweep_address_without_ray_is_refused():
    with pytest.raises(SweepError, match="--address"):
        make_executor("local", address="auto")
