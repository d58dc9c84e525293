"""What the demo's rows and the optimizer's refinement journals reuse: only a measurement of the same inputs."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from lacq.llama.build import Build
from lacq.results.store import open_store
from lacq.studies.artifact import Scan
from tests.synth import write_synthetic_gguf
from tests.test_optimize import additive_scan


def build(key: str, backend: str) -> Build:
    return Build(key=key, bin_dir=Path("/nonexistent"), source_hash="s", source_origin="o", series_hash="h",
                 patches=(), backend=backend)


CPU, CUDA = build("cpu-1111", "cpu"), build("cuda-2222", "cuda")


def fake_kld(calls: list):
    """measure_kld's signature and filing (metrics, annotations, provenance) without llama.cpp; each call measures
    a new number."""
    def measure(b, store, model, info, base, base_info, kv, corpus, *, ctx, chunks, threads=None, label=None,
                study=None, recipe=None, plan_hash=None, annotations=None):
        calls.append((b.key, label, chunks))
        metrics = {"kld_mean": 0.01 * len(calls), "kld_mean_error": 1e-3, "kld_quantiles": {"p99": 0.1},
                   "ppl_q": 10.0, "ppl_q_error": 0.1, "ppl_base": 9.0, "same_top_p_pct": 90.0,
                   "base_model_sha256": store.sha256(base), **(annotations or {})}
        rid = store.add(kind="kld", label=label, model=model, build=b.provenance(), command=[], metrics=metrics,
                        study=study, recipe=recipe, plan_hash=plan_hash, corpus=corpus, ctx=ctx, chunks=chunks)
        return SimpleNamespace(result_id=rid)
    return measure


@pytest.fixture
def corpus(tmp_path) -> Path:
    (tmp_path / "corpus.txt").write_text("the corpus\n")
    return tmp_path / "corpus.txt"


# --- the optimizer's refinement journal (studies/refine.py) ---------------------------------------


def kv_scan(model: Path) -> Scan:
    sens = {f"kv.{i}": 0.01 * (i + 1) for i in range(4)}
    s = additive_scan(sens, {u: {"q4_0": 4.5, "q5_0": 5.5, "q8_0": 8.5} for u in sens}, kind="kv",
                      base={"cache": "v", "reference": "f16", "other": "q8_0"}, total_values=4.0)
    return Scan(**{**s.__dict__, "model": {"path": str(model), "sha256": open_store().sha256(model)},
                   "provenance": {"study": "scan-kv:abc"}})


def test_a_refinement_journal_of_another_build_or_corpus_is_not_reused(tmp_path, corpus, monkeypatch):
    from lacq.studies import refine
    calls: list = []
    monkeypatch.setattr(refine, "measure_kld", fake_kld(calls))
    scan = kv_scan(write_synthetic_gguf(tmp_path / "m.gguf", n_blocks=4))
    store = open_store()
    choice = {f"kv.{i}": "q5_0" for i in range(4)}

    def judged(b: Build, corpus: Path, chunks: int = 20) -> float:
        measure, key = refine.kv_runner(b, store, scan, corpus)
        return measure({key(choice): choice}, chunks)[key(choice)].kld

    on_cpu = judged(CPU, corpus)
    assert judged(CPU, corpus) == on_cpu and len(calls) == 1  # the journal: measured once
    on_cuda = judged(CUDA, corpus)  # the CPU number is not the CUDA build's
    assert len(calls) == 2 and calls[-1][0] == CUDA.key and on_cuda != on_cpu
    assert judged(CUDA, corpus) == on_cuda and len(calls) == 2
    other = corpus.with_name("other.txt")
    other.write_text("another corpus\n")
    judged(CPU, other)
    judged(CPU, corpus, chunks=8)
    assert len(calls) == 4
    studies = {r.study for r in store.results(kind="kld")}
    assert len(studies) == 4 and all(s.startswith("refine:scan-kv:abc:") for s in studies)


def test_refining_a_kv_scan_needs_the_scanned_model_file(tmp_path, corpus):
    from lacq.errors import LacqError
    from lacq.studies import refine
    scan = kv_scan(write_synthetic_gguf(tmp_path / "m.gguf", n_blocks=4))
    write_synthetic_gguf(tmp_path / "m.gguf", n_blocks=3)  # replaced since the scan
    with pytest.raises(LacqError, match="not the file the scan was made from"):
        refine.kv_runner(CPU, open_store(), scan, corpus)


# --- the demo's rows (studies/placement.py) -----------------------------------------------------


def test_demo_rows_are_reused_only_for_the_same_plan_file_and_scan(tmp_path, corpus):
    from lacq.studies.placement import measured_rows
    calls: list = []
    store = open_store()
    base = write_synthetic_gguf(tmp_path / "base.gguf", n_blocks=4)
    files = {n: write_synthetic_gguf(tmp_path / f"{n}.gguf", n_blocks=n) for n in (2, 3, 5)}
    hand = ("first8_q8", "hand recipe", SimpleNamespace(plan_hash="h1", recipe="first8_q8"), files[2], None)
    opt = ("optimized@Q4_K_M", "optimized", SimpleNamespace(plan_hash="o1", recipe="opt"), files[3], "scan:c4")

    def rows(plans, b=CPU, chunks=20):
        return measured_rows(b, store, plans, base, None, corpus, ctx=512, chunks=chunks, threads=None,
                             study="demo2:x", measure=fake_kld(calls))

    first = rows([hand, opt])
    assert len(calls) == 2 and [r.label for r in first] == ["first8_q8", "optimized@Q4_K_M"]
    assert [r.id for r in rows([hand, opt])] == [r.id for r in first] and len(calls) == 2  # a rerun measures nothing
    # --scan-chunks 8: another scan proposes the optimized rows (here the same file): measured again, hand rows not
    opt8 = opt[:4] + ("scan:c8",)
    second = rows([hand, opt8])
    assert len(calls) == 3 and calls[-1][1] == "optimized@Q4_K_M"
    assert second[0].id == first[0].id and second[1].id != first[1].id
    # an edited recipe: another plan and file under the same label
    edited = ("first8_q8", "hand recipe", SimpleNamespace(plan_hash="h2", recipe="first8_q8"), files[5], None)
    third = rows([edited, opt8])
    assert len(calls) == 4 and third[0].id not in (first[0].id,) and third[1].id == second[1].id
    # back to the first inputs: their rows, not the latest of each label
    assert [r.id for r in rows([hand, opt])] == [r.id for r in first] and len(calls) == 4
    rows([hand, opt], chunks=8)
    rows([hand, opt], b=CUDA)
    assert len(calls) == 8


def test_demo_rows_of_one_file_are_measured_once(tmp_path, corpus):
    """On the clean base's 8 blocks first8_q8, last8_q8, middle8_q8 and first_last4_q8 are the same file: the
    demo measured it four times (about 16 s each on 2 cores). Now once, each row under its own label."""
    from lacq.studies.placement import measured_rows
    calls: list = []
    base = write_synthetic_gguf(tmp_path / "base.gguf", n_blocks=4)
    same = write_synthetic_gguf(tmp_path / "all8.gguf", n_blocks=2)
    other = write_synthetic_gguf(tmp_path / "other.gguf", n_blocks=3)
    plans = [(name, "hand recipe", SimpleNamespace(plan_hash=name, recipe=name), path, None)
             for name, path in (("first8_q8", same), ("last8_q8", same), ("ffn_q8", other), ("middle8_q8", same))]
    rows = measured_rows(CPU, open_store(), plans, base, None, corpus, ctx=512, chunks=20, threads=None,
                         study="demo2:y", measure=fake_kld(calls))
    assert sorted(c[1] for c in calls) == ["ffn_q8", "first8_q8"]
    assert [r.label for r in rows] == ["first8_q8", "last8_q8", "ffn_q8", "middle8_q8"]
    assert rows[1].metrics["kld_mean"] == rows[0].metrics["kld_mean"] == rows[3].metrics["kld_mean"]
    assert rows[3].metrics["same_file_as"] == "first8_q8" and rows[3].recipe == "middle8_q8"
