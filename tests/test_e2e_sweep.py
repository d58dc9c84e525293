"""`lacq sweep` on the real CPU build and SmolLM2: the local executor, a Ctrl-C and resume, a SIGTERM
that stops every tool at once, and a local Ray cluster (2 CPUs) on which one worker is killed mid-run
(its tool with it) and the sweep still stores every result exactly once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import REPO
from procutil import alive, descendants, gone_within, kill_survivors

from lacq.cli import cli
from lacq.fsutil import file_sha256
from lacq.results.store import open_store
from lacq.studies.sweep import CRASH_ONCE_ENV, load_sweep

pytestmark = pytest.mark.e2e

TINY = """
name = "{name}"
description = "2 KV configurations x 2 contexts, one chunk each"
models = ["smollm2"]
kv = ["f16/f16", {{ctk = "q8_0", ctv = "q4_0"}}]
contexts = [128, 256]
measurements = ["ppl"]

[ppl]
chunks = 1
"""


def _sweep(tmp_path, name):
    p = tmp_path / f"{name}.toml"
    p.write_text(TINY.format(name=name))
    return p


def _stored(name):
    return [r for r in open_store().results(study=name) if r.kind == "ppl"]


def _assert_each_run_once(name):
    rows = _stored(name)
    keys = [r.metrics["sweep_run"] for r in rows]
    assert len(rows) == 4 and len(set(keys)) == 4, [r.label for r in rows]
    assert {r.ctx for r in rows} == {128, 256}
    assert all(r.metrics["ppl"] > 1 for r in rows)
    return rows


def test_local_executor_runs_a_four_run_sweep(cpu_build, smollm2, tmp_path):
    r = CliRunner().invoke(cli, ["sweep", str(_sweep(tmp_path, "local4")), "--jobs", "2"])
    assert r.exit_code == 0, r.output
    assert "4 run(s) done now, 0 already stored" in r.output
    rows = _assert_each_run_once("local4")
    assert all(row.metrics["node"]["host"] and row.metrics["device"] for row in rows)
    rep = CliRunner().invoke(cli, ["report", "--study", "local4"])
    assert rep.exit_code == 0 and "4 of 4 runs stored; complete" in rep.output, rep.output


def test_ctrl_c_then_the_same_command_runs_only_the_missing_runs(cpu_build, smollm2, tmp_path):
    sweep = _sweep(tmp_path, "resume4")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "lacq", "sweep", str(sweep), "--jobs", "1"]
    # a terminal's SIGINT disposition, whatever pytest inherited (a shell that starts it with `&` ignores SIGINT,
    # and lacq keeps an ignored SIGINT ignored, as test_e2e._start explains)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # noqa: PLW1509
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None and not _stored("resume4"):
        time.sleep(0.5)
    assert proc.poll() is None, proc.communicate()[0]
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C in a terminal reaches the whole process group
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 130, out
    before = len(_stored("resume4"))
    assert 1 <= before < 4, out
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"{4 - before} run(s) done now, {before} already stored" in " ".join(r.stdout.split()), r.stdout
    _assert_each_run_once("resume4")


def test_sweep_kld_of_a_recipe_is_against_its_unquantized_parent(cpu_build, smollm2, tmp_path):
    sweep = tmp_path / "kldbase.toml"
    sweep.write_text(TINY.format(name="kldbase").replace('["smollm2"]', '["smollm2"]\nrecipes = ["first8_q8"]')
                     .replace('kv = ["f16/f16", {ctk = "q8_0", ctv = "q4_0"}]', "").replace("[128, 256]", "[128]")
                     .replace('["ppl"]', '["kld"]').replace("[ppl]\nchunks = 1", "[kld]\nchunks = 2"))
    r = CliRunner().invoke(cli, ["sweep", str(sweep)])
    assert r.exit_code == 0, r.output
    (row,) = [x for x in open_store().results(study="kldbase") if x.kind == "kld"]
    m = row.metrics
    # before, the base logits came from the quantized file itself: KLD ≈ 0 against itself
    assert m["base_model"].endswith(".f16.gguf") and m["kld_base"] == "unquantized parent"
    assert m["base_model_sha256"] == file_sha256(Path(m["base_model"])) != row.model_sha256
    assert m["kld_mean"] > 1e-3


def test_sigterm_mid_sweep_stops_the_workers_tools_at_once(cpu_build, smollm2, tmp_path):
    # One run long enough to outlast the test (a chunk of 8192 tokens), as in a CI timeout: before, the
    # driver waited for its worker, whose llama-perplexity (in a session of its own) got no signal.
    sweep = tmp_path / "long.toml"
    sweep.write_text(TINY.format(name="long").replace("[128, 256]", "[8192]").replace(
        'kv = ["f16/f16", {ctk = "q8_0", ctv = "q4_0"}]', "").replace("chunks = 1", "chunks = 2"))
    proc = subprocess.Popen([sys.executable, "-m", "lacq", "sweep", str(sweep)], env={**os.environ, "PYTHONPATH": str(REPO)},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGTERM, signal.SIG_DFL))  # noqa: PLW1509
    procs: dict[int, str] = {}
    try:
        deadline = time.monotonic() + 120
        while not any(n.startswith("llama-perplex") for n in procs.values()) and time.monotonic() < deadline \
                and proc.poll() is None:
            procs = descendants(proc.pid)
            time.sleep(0.1)
        assert any(n.startswith("llama-perplex") for n in procs.values()), proc.communicate()[0]
        time.sleep(2)  # past loading the model: computing the first chunk
        proc.send_signal(signal.SIGTERM)
        out = proc.communicate(timeout=30)[0]
        assert proc.returncode == 143 and "terminated by SIGTERM" in out and "Traceback" not in out, out
        assert gone_within(procs, 10), f"still running: {[(p, n) for p, n in procs.items() if alive(p)]}"
    finally:
        proc.kill()
        kill_survivors(procs)
    assert not _stored("long")


@pytest.fixture
def local_ray(tmp_path, monkeypatch, isolated_home):
    ray = pytest.importorskip("ray")
    marker = tmp_path / "crash.marker"
    # set before the cluster starts, so its workers inherit it: the first run to start kills its worker
    monkeypatch.setenv(CRASH_ONCE_ENV, str(marker))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(REPO), "LACQ_HOME": str(isolated_home)}})
    yield marker
    ray.shutdown()


def test_ray_sweep_survives_a_killed_worker_and_stores_every_result_once(cpu_build, smollm2, tmp_path, local_ray):
    sweep = _sweep(tmp_path, "ray4")
    assert len(load_sweep(sweep).contexts) == 2
    r = CliRunner().invoke(cli, ["sweep", str(sweep), "--executor", "ray"])
    assert r.exit_code == 0, r.output
    assert local_ray.exists(), "no worker was killed: the fault hook did not fire"
    killed = json.loads(local_ray.read_text())
    killed_pid = killed["worker"]
    assert killed["tools"] and gone_within(killed["tools"], 5), "the killed worker's llama-perplexity ran on"
    rows = _assert_each_run_once("ray4")
    nodes = [row.metrics["node"] for row in rows]
    assert all(n.get("ray_node_id") for n in nodes)
    assert killed_pid not in {n["pid"] for n in nodes}  # the killed worker stored nothing
    assert "4 run(s) done now" in " ".join(r.output.split())
