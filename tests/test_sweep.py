"""`lacq sweep` without a build: the TOML format, run keys, resume bookkeeping, executors' bad input, and
that no tool outlives a stopped sweep (on a stand-in llama-perplexity)."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cliutil import assert_clean_error, run_cli
from conftest import CAPTURES, REPO
from procutil import alive, descendants, gone_within, kill_survivors
from synth import write_synthetic_gguf

from lacq.errors import SweepError
from lacq.llama.build import Build
from lacq.results.store import open_store
from lacq.studies.sweep import CRASH_ONCE_ENV, WorkerSetup, load_sweep, plan_runs, progress_of, run_sweep, stored_keys
from lacq.studies.sweep_exec import LocalExecutor, RayExecutor, make_executor

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
    return sweep, plan_runs(sweep, build, store, lambda spec, recipe: (model, model),
                            lambda m, c, n: tmp_path / "l")


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


def test_kld_runs_measure_a_recipe_against_its_unquantized_parent(tmp_path):
    store = open_store()
    parent, quantized = tmp_path / "parent.gguf", tmp_path / "parent.first8_q8.gguf"
    parent.write_bytes(b"GGUF" + bytes(60))
    quantized.write_bytes(b"GGUF" + bytes(59) + b"q")
    sweep = load_sweep(_sweep_file(tmp_path, TINY.replace('["ppl"]', '["kld"]').replace(
        'models = ["smollm2"]', 'models = ["smollm2"]\nrecipes = ["none", "first8_q8"]').replace("[ppl]", "[kld]")))
    logits_of = []

    def prepare_model(spec, recipe):
        return (quantized, parent) if recipe else (parent, parent)

    def prepare_logits(model, ctx, chunks):
        logits_of.append(model)
        return tmp_path / f"{model.stem}.c{ctx}.logits"

    runs = plan_runs(sweep, BUILD, store, prepare_model, prepare_logits)
    with_recipe = [r for r in runs if r.recipe]
    assert with_recipe and all(r.model == str(quantized) and r.base == str(parent) for r in with_recipe)
    assert all(r.logits.startswith(str(tmp_path / "parent.c")) for r in runs)  # never the quantized file's
    assert set(logits_of) == {parent}
    # without a recipe there is no parent: the base is the model itself (the KV cache's KLD alone)
    assert all(r.model == r.base == str(parent) for r in runs if not r.recipe)


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


def test_sweep_takes_backend_and_source_from_the_shared_build_options(tmp_path, monkeypatch):
    from lacq.errors import BuildError
    seen = []

    def build(spec, source, progress=None):  # the build is where the choice arrives; stop there
        seen.append((spec.backend, source))
        raise BuildError("no build in this test")

    monkeypatch.setattr("lacq.llama.build.build", build)
    sweep = _sweep_file(tmp_path, TINY.replace('name = "tiny"', 'name = "tiny"\nbackend = "cuda"'))
    assert_clean_error(run_cli("sweep", sweep), "no build in this test")
    assert_clean_error(run_cli("sweep", sweep, "--backend", "metal", "--source", tmp_path), "no build in this test")
    assert seen == [("cuda", None), ("metal", str(tmp_path))]  # the file's, then the command line's
    assert load_sweep(sweep, backend="cpu").gpus_per_run == 0  # a default that follows the backend
    assert_clean_error(run_cli("sweep", sweep, "--backend", "tpu"), "'tpu' is not one of")


def test_sweep_address_without_ray_is_refused():
    with pytest.raises(SweepError, match="--address"):
        make_executor("local", address="auto")


# ---------------------------------------------------------------- tools die with their sweep
# A stand-in llama-perplexity: its first call prints a progress line and hangs, as a long chunk
# does (no output, so no SIGPIPE ends it either); later calls print a real run's log and exit.
FAKE_PERPLEXITY = """#!/bin/sh
if mkdir "{first}" 2>/dev/null; then echo "[1]"; exec sleep 60; fi
cat "{capture}"
"""


def _fake_sweep(tmp_path):
    """A one-run ppl sweep of a synthetic model on a build whose llama-perplexity is FAKE_PERPLEXITY."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    tool = bin_dir / "llama-perplexity"
    tool.write_text(FAKE_PERPLEXITY.format(first=tmp_path / "first-call",
                                           capture=CAPTURES / "perplexity_q8_0_q4_0_fa.log"))
    tool.chmod(0o755)
    build = Build(**{**BUILD.__dict__, "bin_dir": bin_dir})
    model = write_synthetic_gguf(tmp_path / "m.gguf")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("words " * 1000)
    sweep = load_sweep(_sweep_file(tmp_path, TINY.replace('["smollm2"]', f'["{model}"]')
                                   .replace('kv = ["f16/f16", {ctk = "q8_0", ctv = "q4_0"}]', "")
                                   .replace("[128, 256]", "[128]")))
    runs = plan_runs(sweep, build, open_store(), lambda spec, recipe: (model, model), lambda m, c, n: None)
    setup = WorkerSetup(home=os.environ["LACQ_HOME"], build=build, corpus=str(corpus))
    return sweep, runs, setup


# The driver of a sweep as `lacq sweep` runs it (its signal handlers, its error handling), on the fake build.
DRIVER = """
import pickle, sys
from lacq.cli.common import install_signal_handlers, user_errors
from lacq.results.store import Store
from lacq.studies.sweep import run_sweep
from lacq.studies.sweep_exec import LocalExecutor
sweep, runs, setup, db = pickle.loads(open(sys.argv[1], "rb").read())
install_signal_handlers()
with user_errors():
    run_sweep(sweep, runs, setup, Store(db), LocalExecutor(jobs=1))
"""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_a_stopped_sweep_driver_leaves_no_tool_running(tmp_path, sig):
    sweep, runs, setup = _fake_sweep(tmp_path)
    args = tmp_path / "driver.pickle"
    args.write_bytes(pickle.dumps((sweep, runs, setup, str(tmp_path / "results.sqlite"))))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    driver = subprocess.Popen([sys.executable, "-c", DRIVER, str(args)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True,
                              preexec_fn=lambda: signal.signal(signal.SIGTERM, signal.SIG_DFL))  # noqa: PLW1509
    procs: dict[int, str] = {}
    try:
        deadline = time.monotonic() + 60
        while "sleep" not in procs.values() and time.monotonic() < deadline and driver.poll() is None:
            procs = descendants(driver.pid)
            time.sleep(0.05)
        assert "sleep" in procs.values(), driver.communicate()[0]
        driver.send_signal(sig)
        driver.wait(timeout=20)  # the tool would hang for 60 s: the driver must not wait for it
        assert gone_within(procs, 10), f"still running: {[(p, n) for p, n in procs.items() if alive(p)]}"
        out = driver.communicate(timeout=10)[0]
        if sig == signal.SIGTERM:
            assert driver.returncode == 143 and "terminated by SIGTERM" in out and "Traceback" not in out, out
    finally:
        driver.kill()
        kill_survivors(procs)
    assert not open_store(tmp_path / "results.sqlite").results(kind="ppl")


def test_a_ray_worker_killed_mid_run_leaves_no_tool_behind(tmp_path, monkeypatch):
    ray = pytest.importorskip("ray")
    sweep, runs, setup = _fake_sweep(tmp_path)
    marker = tmp_path / "crash.marker"
    monkeypatch.setenv(CRASH_ONCE_ENV, str(marker))  # before the cluster starts, so its workers inherit it
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    tools: list[int] = []
    try:
        outcome = run_sweep(sweep, runs, setup, open_store(), RayExecutor(jobs=1))
        assert marker.exists(), "no worker was killed: the fault hook did not fire"
        tools = json.loads(marker.read_text())["tools"]
        assert tools, "the killed worker was running no tool"
        assert gone_within(tools, 5), "the killed worker's tool is still running"  # checked before Ray shuts down
    finally:
        ray.shutdown()
        kill_survivors(tools)
    assert len(outcome.ran) == 1 and not outcome.failed  # the retry stored the run
