"""Which engines a sweep worker keeps between runs (without a build: a stand-in session)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
from test_sweep import BUILD

from lacq.studies import engine as engine_mod
from lacq.studies import sweep as sweep_mod
from lacq.studies import sweep_exec
from lacq.studies.sweep import WorkerSetup


class FakeSession:
    def __init__(self, build, model, info, logits, candidates, **kw):
        self.model, self.logits, self.closed = model, logits, False

    def close(self):
        self.closed = True


@pytest.fixture(autouse=True)
def _no_engines(monkeypatch):
    monkeypatch.setattr(engine_mod, "EngineSession", FakeSession)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    yield
    sweep_mod.close_engines()


def test_a_worker_keeps_one_engine_per_logits_of_a_model_and_closes_them_for_the_next_model():
    setup = WorkerSetup(home="h", build=BUILD, corpus="c", engine=True)
    a128 = sweep_mod._engine_session(setup, Path("a.gguf"), None, Path("a128.logits"), 128)
    a256 = sweep_mod._engine_session(setup, Path("a.gguf"), None, Path("a256.logits"), 256)
    assert sweep_mod._engine_session(setup, Path("a.gguf"), None, Path("a128.logits"), 128) is a128
    b = sweep_mod._engine_session(setup, Path("b.gguf"), None, Path("b128.logits"), 128)
    assert a128.closed and a256.closed and not b.closed  # the plan lists a model file's runs together
    sweep_mod.close_engines()  # what atexit runs as the worker exits
    assert b.closed and not sweep_mod._engines


@pytest.mark.parametrize("gpus, kept", [(0, True), (1, False)])
def test_a_ray_task_with_a_gpu_closes_its_engine_as_it_ends(monkeypatch, gpus, kept):
    setup = WorkerSetup(home="h", build=BUILD, corpus="c", engine=True)
    session = sweep_mod._engine_session(setup, Path("a.gguf"), None, Path("a.logits"), 128)
    monkeypatch.setattr(sweep_exec, "execute_run", lambda run, setup, report: {})
    sweep_exec._ray_task(SimpleNamespace(gpus=gpus), setup, None)
    assert session.closed is not kept
