"""A sweep's KLD runs in the evaluation engine, on the real CPU build and SmolLM2: the statistics of a
llama-perplexity process per run, one engine per worker for a model's runs, and a killed engine or worker
costing only its run."""

from __future__ import annotations

import json
import os
import signal
import threading
from pathlib import Path

import pytest
from click.testing import CliRunner
from procutil import descendants, gone_within, kill_survivors
from test_e2e_refine_engine import ENGINE_NAME, _printed
from test_e2e_sweep import local_ray  # noqa: F401 (a fixture)

from lacq import paths
from lacq.cli import cli
from lacq.llama.tools import engine as tool
from lacq.measure.kld import base_logits
from lacq.model.info import inspect_model
from lacq.results.store import open_store
from lacq.studies import sweep as sweep_mod
from lacq.studies.engine import engine_available
from lacq.studies.sweep import WorkerSetup, load_sweep, plan_runs

pytestmark = pytest.mark.e2e

KV3 = """
name = "{name}"
models = ["smollm2"]
kv = ["f16/f16", "q8_0/q8_0", {{ctk = "q8_0", ctv = "q4_0"}}]
contexts = [128]
measurements = ["kld"]

[kld]
chunks = 2
"""


@pytest.fixture(autouse=True)
def _engine_built(cpu_build):
    if not engine_available(cpu_build):
        pytest.skip("this build lacks the evaluation engine patch (*-evaluation-engine-*)")


def _sweep(tmp_path: Path, name: str) -> Path:
    p = tmp_path / f"{name}.toml"
    p.write_text(KV3.format(name=name))
    return p


def _rows(name: str) -> dict[str, dict]:
    """KV label -> metrics of the sweep's stored KLD runs (each run once)."""
    rows = [r for r in open_store().results(study=name) if r.kind == "kld"]
    assert len(rows) == len({r.metrics["sweep_run"] for r in rows}) == 3, [r.label for r in rows]
    return {r.label.split(" ", 1)[1]: r.metrics for r in rows}


def _engines() -> set[int]:
    return {p for p, name in descendants(os.getpid()).items()
            if name == ENGINE_NAME and b"--engine-variants" in _cmdline(p)}


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def test_sweep_kld_in_the_engine_equals_a_process_per_run_with_one_engine_per_worker(tmp_path):
    """Three KV configurations of one model on one worker: one engine answers all three (counted from /proc
    while the sweep runs), with the statistics --no-engine's llama-perplexity processes print, the same
    annotations, and `engine: True`; the worker's engine stops with the sweep."""
    seen: set[int] = set()
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            seen.update(_engines())
            done.wait(0.05)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        r = CliRunner().invoke(cli, ["sweep", str(_sweep(tmp_path, "kv-engine")), "--jobs", "1"])
    finally:
        done.set()
        watcher.join()
    assert r.exit_code == 0, r.output
    assert len(seen) == 1, seen  # before: no engine; a llama-perplexity process per run
    assert not _engines()
    r = CliRunner().invoke(cli, ["sweep", str(_sweep(tmp_path, "kv-processes")), "--no-engine"])
    assert r.exit_code == 0, r.output
    engine, processes = _rows("kv-engine"), _rows("kv-processes")
    assert set(engine) == set(processes) == {"f16/f16 c128", "q8_0/q8_0 c128", "q8_0/q4_0 c128"}
    for kv, m in engine.items():
        p = processes[kv]
        assert m["engine"] is True and "engine" not in p
        assert _printed(m) == _printed(p), kv
        assert set(p) - set(m) == set()  # every key the process path files, the engine path files
        for key in ("kld_base", "base_model", "base_model_sha256", "logits_key", "sweep_measurement"):
            assert m[key] == p[key], key
    assert engine["q8_0/q4_0 c128"]["kld_mean"] > engine["q8_0/q8_0 c128"]["kld_mean"]


def test_a_killed_engine_costs_only_its_run_and_a_worker_keeps_one_engine(cpu_build, smollm2, tmp_path,
                                                                          monkeypatch):
    """A worker's runs (execute_run, as a pool process calls it): the first two share one engine start; the
    engine is killed as the third begins, and that run is measured by a fresh engine."""
    store = open_store()
    corpus = paths.default_corpus()
    sweep = load_sweep(_sweep(tmp_path, "kv-killed"))
    runs = plan_runs(sweep, cpu_build, store, lambda spec, recipe: (smollm2, smollm2),
                     lambda m, ctx, n: base_logits(cpu_build, store, m, inspect_model(m), corpus, ctx=ctx, chunks=n)[0])
    setup = WorkerSetup(home=os.environ["LACQ_HOME"], build=cpu_build, corpus=str(corpus), engine=True)
    start, starts = tool.Engine.start, []

    def counted(self):
        starts.append(self)
        return start(self)

    def kill_engine_of_third(key: str, frac: float, detail: str) -> None:
        if key == runs[2].key:
            (pid,) = _engines()
            os.kill(pid, signal.SIGKILL)

    monkeypatch.setattr(tool.Engine, "start", counted)
    try:
        rows = [sweep_mod.execute_run(run, setup, kill_engine_of_third) for run in runs]
        assert len(starts) == 2  # one for the first two runs, one after the kill
        assert all(row["metrics"]["engine"] is True and row["metrics"]["kld_mean"] >= 0 for row in rows)
        assert rows[2]["metrics"]["kld_mean"] > rows[1]["metrics"]["kld_mean"]  # q8_0/q4_0 against q8_0/q8_0
    finally:
        sweep_mod.close_engines()
        kill_survivors(_engines())
    assert not _engines()


def test_ray_sweep_in_the_engine_survives_a_killed_worker(tmp_path, local_ray):  # noqa: F811
    """The first run's worker is killed once its variant is measured (its engine running): the engine dies
    with it, and the run is measured again on another worker and stored once, like the others."""
    r = CliRunner().invoke(cli, ["sweep", str(_sweep(tmp_path, "kv-ray")), "--executor", "ray"])
    assert r.exit_code == 0, r.output
    assert local_ray.exists(), "no worker was killed: the fault hook did not fire"
    killed = json.loads(local_ray.read_text())
    assert killed["tools"] and gone_within(killed["tools"], 5), "the killed worker's engine ran on"
    rows = _rows("kv-ray")
    assert all(m["engine"] is True for m in rows.values())
    assert killed["worker"] not in {m["node"]["pid"] for m in rows.values()}
