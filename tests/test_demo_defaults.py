"""What `lacq demo` runs by default: the clean base, an importance matrix made from the calibration part (or the one
given, or none), and a scan whose types the model's rows allow (nothing built or measured here)."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner
from synth import write_synthetic_gguf

from lacq.cli import cli
from lacq.results.store import open_store
from lacq.studies.placement import K_SCAN_TYPES, LEGACY_SCAN_TYPES, demo_scan_types, run_placement_study


class FakeBuild:
    key, backend, patches = "fake", "cpu", ("per-layer",)

    def provenance(self):
        return {"build_key": self.key}


# --- the scan's types ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n_embd,n_ff,want", [
    (256, 768, K_SCAN_TYPES),  # the clean base's shape: every row a multiple of 256
    (576, 1536, LEGACY_SCAN_TYPES),  # SmolLM2's: 576-wide rows would turn q4_k into q5_0, q6_k into q8_0
    (256, 576, LEGACY_SCAN_TYPES),  # one kind of row that does not split (ffn_down's) is enough
])
def test_demo_scans_k_quants_only_where_every_row_splits_into_k_quant_blocks(tmp_path, n_embd, n_ff, want):
    from lacq.model.info import inspect_model
    path = write_synthetic_gguf(tmp_path / "m.gguf", n_blocks=2, n_embd=n_embd, n_ff=n_ff, n_head=4, n_head_kv=2)
    assert demo_scan_types(inspect_model(path)) == want


def test_the_clean_base_gets_the_k_quant_scan():
    from lacq.model.info import inspect_model
    from lacq.model.resolve import clean_base
    assert demo_scan_types(inspect_model(clean_base())) == K_SCAN_TYPES


# --- the study: which importance matrix, which scan ---------------------------------------------------------------
class ScanReached(Exception):
    """Raised by the stand-in scan: what the study asked for is all these tests need."""


@pytest.fixture
def study(tmp_path, monkeypatch):
    """run_placement_study up to its scan, with make_imatrix and scan_weights recorded instead of run."""
    calls: dict = {"imatrix": []}

    def fake_imatrix(build, store, model, text, **kw):
        out = tmp_path / "made.imatrix.gguf"
        out.write_bytes(b"imatrix")
        calls["imatrix"].append((model, text, kw))
        return type("Outcome", (), {"path": out})()

    def fake_scan(build, store, model, base, corpus, **kw):
        calls["scan"] = {"model": model, "base": base, "corpus": corpus, **kw}
        raise ScanReached

    monkeypatch.setattr("lacq.studies.placement.make_imatrix", fake_imatrix)
    monkeypatch.setattr("lacq.studies.placement.scan_weights", fake_scan)
    text = tmp_path / "text.txt"
    text.write_text("some text\n")

    def run(model, **kw):
        with pytest.raises(ScanReached):
            run_placement_study(FakeBuild(), open_store(), model, text, **kw)
        return calls

    return run, tmp_path


def test_the_study_makes_its_importance_matrix_from_the_calibration_text_on_the_base(study):
    run, tmp = study
    base = write_synthetic_gguf(tmp / "base.gguf", n_blocks=8, n_embd=256, n_ff=512)  # first8_q8 needs 8
    calib = tmp / "calibration.txt"
    calib.write_text("calibration\n")
    calls = run(base, calibration=calib, threads=2)
    ((model, made_from, kw),) = calls["imatrix"]
    assert model == base and made_from == calib and kw["chunks"] == 100 and kw["ctx"] == 512  # lacq imatrix's
    assert calls["scan"]["imatrix"] == tmp / "made.imatrix.gguf"
    assert calls["scan"]["types"] == list(K_SCAN_TYPES) and calls["scan"]["units"] == ("block", "group")


def test_a_given_importance_matrix_is_used_and_none_is_made(study):
    run, tmp = study
    base = write_synthetic_gguf(tmp / "base.gguf", n_blocks=8, n_embd=256, n_ff=512)  # first8_q8 needs 8
    given = tmp / "given.imatrix.gguf"
    given.write_bytes(b"given")
    calls = run(base, imatrix=given, calibration=tmp / "never-read.txt")
    assert calls["imatrix"] == [] and calls["scan"]["imatrix"] == given


def test_without_calibration_or_imatrix_the_study_quantizes_without_one(study):
    run, tmp = study
    base = write_synthetic_gguf(tmp / "base.gguf", n_blocks=8, n_embd=320, n_ff=320)
    calls = run(base)
    assert calls["imatrix"] == [] and calls["scan"]["imatrix"] is None
    assert calls["scan"]["types"] == list(LEGACY_SCAN_TYPES)  # rows that do not split (as SmolLM2's): the former scan


# --- the command: its defaults and flags --------------------------------------------------------------------------
@pytest.fixture
def demo(tmp_path, monkeypatch):
    """`lacq demo` with the build, the model and the study recorded instead of run."""
    import pandas as pd

    from lacq.studies.artifact import Scan
    from lacq.studies.placement import PlacementResult
    scan = Scan.read(Path(__file__).resolve().parents[1] / "bench" / "results" / "scan-q4q8-tensor-cpu"
                     / "scan_q4q8_tensor_cpu.json")
    model = write_synthetic_gguf(tmp_path / "m.gguf", n_blocks=2)
    seen: dict = {}

    def fake_study(build, store, model, corpus, **kw):
        seen.update(kw)
        return PlacementResult("demo-1", pd.DataFrame(), model, scan, (), kw.get("imatrix"))

    def fake_resolve(spec):
        seen["spec"] = spec
        return model

    monkeypatch.setattr("lacq.cli.study.run_build", lambda spec, source, progress=None: FakeBuild())
    monkeypatch.setattr("lacq.model.resolve.resolve_model", fake_resolve)
    monkeypatch.setattr("lacq.studies.placement.run_placement_study", fake_study)

    def invoke(*args):
        seen.clear()
        return CliRunner().invoke(cli, ["demo", "--format", "json", *map(str, args)]), seen

    return invoke


def test_demo_defaults_to_the_clean_base_and_an_imatrix_from_the_calibration_part(demo):
    from lacq.corpus import calibration_text
    r, seen = demo()
    assert r.exit_code == 0, r.output
    assert seen["spec"] == "clean-base"
    assert seen["calibration"] == calibration_text() and seen["imatrix"] is None


def test_demo_imatrix_file_replaces_the_made_one(demo, tmp_path):
    given = tmp_path / "mine.imatrix.gguf"
    given.write_bytes(b"x")
    r, seen = demo("--imatrix", given, "--model", "smollm2")
    assert r.exit_code == 0, r.output
    assert seen["imatrix"] == given and seen["calibration"] is None and seen["spec"] == "smollm2"
    assert f"importance matrix: {given}" in r.stderr


def test_demo_no_imatrix_turns_it_off(demo):
    r, seen = demo("--no-imatrix")
    assert r.exit_code == 0, r.output
    assert seen["imatrix"] is None and seen["calibration"] is None
    assert "importance matrix: none" in r.stderr


def test_demo_refuses_imatrix_and_no_imatrix_together(demo, tmp_path):
    given = tmp_path / "mine.imatrix.gguf"
    given.write_bytes(b"x")
    r, seen = demo("--imatrix", given, "--no-imatrix")
    assert r.exit_code == 1 and "--imatrix and --no-imatrix" in r.output and "Traceback" not in r.output
    assert "spec" not in seen  # refused before the build and the model
