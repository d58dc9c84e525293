"""A scan's engines on a local Ray cluster (2 CPUs, as the sweep tests): the same numbers as the local engine
on the same tokens, every variant filed once by the driver, and an actor killed mid-scan costing only the
variant it had in flight."""

from __future__ import annotations

import dataclasses
import os
import signal
from pathlib import Path

import pytest
from conftest import REPO
from procutil import descendants, gone_within, kill_survivors

from lacq import paths
from lacq.results.store import Store
from lacq.studies.engine import engine_available
from lacq.studies.engine_ray import RayEngines
from lacq.studies.scan import scan_weights

pytestmark = pytest.mark.e2e
KW = {"types": ["q4_0", "q8_0"], "units": ("group",), "chunks": 2, "ctx": 128}
ENGINE_NAME = "llama-perplexit"  # /proc's command name: the first 15 characters


@pytest.fixture
def local_ray(cpu_build, isolated_home):
    if not engine_available(cpu_build):
        pytest.skip("this build lacks the evaluation engine patch (*-evaluation-engine-*)")
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(REPO), "LACQ_HOME": str(isolated_home)}})
    yield ray
    ray.shutdown()


def _numbers(scan) -> dict:
    """Every variant's statistics, without the id of the row they were filed as."""
    out = {f"uniform {t}": k for t, k in scan.uniform.items()}
    for u in scan.units:
        out |= {f"{u.id} raise {t}": k for t, k in u.raise_.items()}
        out |= {f"{u.id} lower {t}": k for t, k in u.lower.items()}
    return {key: dataclasses.replace(k, result_id=0) for key, k in out.items()}


def _engines() -> list[int]:
    return [p for p, name in descendants(os.getpid()).items() if name == ENGINE_NAME]


def _filed_once(store: Store) -> list[str]:
    labels = [r.label for r in store.results(kind="kld")]
    assert labels and len(labels) == len(set(labels)), labels
    assert all(r.metrics["engine"] for r in store.results(kind="kld"))
    return labels


def test_a_ray_scan_measures_what_the_local_engine_measures(cpu_build, smollm2, smollm2_f16, tmp_path, local_ray):
    corpus = paths.default_corpus()
    local = scan_weights(cpu_build, Store(tmp_path / "local.sqlite"), smollm2, smollm2_f16, corpus, **KW)
    store = Store(tmp_path / "ray.sqlite")
    remote = scan_weights(cpu_build, store, smollm2, smollm2_f16, corpus, ray=RayEngines(jobs=2), **KW)
    ours, theirs = _numbers(remote), _numbers(local)
    assert ours.keys() == theirs.keys()
    for key, k in ours.items():  # llama-perplexity's threads add each token's KLD in the order they finish:
        for f in dataclasses.fields(k):  # the last bits of a double move from run to run, the printed digits do not
            assert getattr(k, f.name) == pytest.approx(getattr(theirs[key], f.name), rel=1e-12), (key, f.name)
    assert len(_filed_once(store)) == len(_filed_once(Store(tmp_path / "local.sqlite")))
    assert gone_within(_engines(), 5)  # the actors' engines stopped with the scan


def test_an_actor_killed_mid_scan_costs_only_its_variant(cpu_build, smollm2, smollm2_f16, tmp_path, local_ray):
    """SIGKILL one actor's worker after three variants, its engine measuring: the scan completes on a new
    actor, and the driver files every variant exactly once."""
    killed: list[int] = []

    def step(stage, frac, detail):
        if stage == "variants" and "/" in detail and not killed and int(detail.split("/")[0]) >= 3:
            engines = _engines()
            assert len(engines) == 2  # one per actor
            actor = int(Path(f"/proc/{engines[0]}/stat").read_text().rsplit(")", 1)[1].split()[2])  # its parent
            os.kill(actor, signal.SIGKILL)
            killed.extend([actor, engines[0]])

    store = Store(tmp_path / "ray.sqlite")
    try:
        scan = scan_weights(cpu_build, store, smollm2, smollm2_f16, paths.default_corpus(), step=step,
                            ray=RayEngines(jobs=2), **KW)
        assert killed, "no actor was killed: the scan ended first"
        assert gone_within(killed, 5)  # its engine died with it
    finally:
        kill_survivors(killed)
    labels = _filed_once(store)
    assert set(_numbers(scan)) >= set(labels) and len(labels) >= 2 + len(scan.units)
