"""`lacq optimize` writes its outputs last: whatever refuses the command (no build, a scan's file gone, an output
in the way, a verification that fails) leaves no recipe, tensor-type file or KV policy behind."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from lacq.cli import cli
from lacq.errors import LacqError
from lacq.studies.artifact import Scan
from tests.test_optimize import TINY, additive_scan

KV_BITS = {"q4_0": 4.5, "q8_0": 8.5}


def _kv_scan(model_path: str) -> Scan:
    sens = {f"kv.{i}": s for i, s in enumerate((0.05, 0.01, 0.02))}
    s = additive_scan(sens, {u: {t: b * 1000 for t, b in KV_BITS.items()} for u in sens}, kind="kv",
                      types=("q4_0", "q8_0"), err={"q4_0": 1.0, "q8_0": 0.0}, fixed=0.0, total_values=3000.0)
    return Scan(**{**s.__dict__, "model": {**s.model, "path": model_path}})


def _scan(tmp_path, kind: str, file_there: bool = False):
    """A scan file and the budget option of its kind; `file_there`: the file the scan measured exists."""
    measured = tmp_path / "measured.gguf"
    if file_there:
        measured.write_bytes(b"GGUF")  # only its presence is checked before the measurement (faked here)
    if kind == "weights":
        scan = Scan(**{**TINY.__dict__, "base": {"path": str(measured)}})
        budget = ["--size-mb", f"{(TINY.fixed_cost + 7000) / 1e6:.6f}"]
    else:
        scan, budget = _kv_scan(str(measured)), ["--bits", "6"]
    from lacq.cache import Cache
    from lacq.corpus import scan_text
    prov = {"study": "s", "corpus_sha256": Cache.open().sha256(scan_text())}  # the judge text has not seen it
    return Scan(**{**scan.__dict__, "provenance": prov}).write(tmp_path / f"scan-{kind}.json"), budget


def _one_line_failure(r, needle: str) -> None:
    assert r.exit_code == 1, r.output
    assert "Traceback" not in r.output and needle in r.output, r.output
    assert len(r.output.strip().splitlines()) == 1, r.output


@pytest.mark.parametrize("kind", ["weights", "kv"])
@pytest.mark.parametrize("measure", [["--verify"], ["--refine", "1"]])
def test_no_build_fails_in_one_line_before_writing_anything(tmp_path, kind, measure):
    # the test's lacq home is empty: no build can be found, and none is made
    path, budget = _scan(tmp_path, kind, file_there=True)
    out = tmp_path / "opt.toml"
    r = CliRunner().invoke(cli, ["optimize", kind, str(path), *budget, *measure, "-o", str(out)])
    _one_line_failure(r, "lacq build")
    assert not out.exists()


class FakeBuild:
    key, backend, patches = "fake", "cpu", ("per-layer",)


@pytest.fixture
def fake_build(monkeypatch):
    monkeypatch.setattr("lacq.cli.common.require_build", lambda spec, source=None: FakeBuild())


@pytest.mark.parametrize("kind", ["weights", "kv"])
def test_a_scan_whose_file_is_gone_is_refused_before_writing(tmp_path, fake_build, kind):
    path, budget = _scan(tmp_path, kind, file_there=False)
    out = tmp_path / "opt.toml"
    r = CliRunner().invoke(cli, ["optimize", kind, str(path), *budget, "--verify", "-o", str(out)])
    _one_line_failure(r, "measured.gguf does not exist")
    assert not out.exists()


def test_a_tensor_type_file_in_the_way_leaves_no_recipe(tmp_path):
    path, budget = _scan(tmp_path, "weights")
    out, ttf = tmp_path / "opt.toml", tmp_path / "opt.txt"
    ttf.write_text("someone's file\n")
    r = CliRunner().invoke(cli, ["optimize", "weights", str(path), *budget, "-o", str(out),
                                 "--tensor-type-file", str(ttf)])
    _one_line_failure(r, "opt.txt exists; pass --force")
    assert not out.exists() and ttf.read_text() == "someone's file\n"


@pytest.mark.parametrize("kind", ["weights", "kv"])
def test_a_verification_that_fails_leaves_no_output(tmp_path, fake_build, monkeypatch, kind):
    path, budget = _scan(tmp_path, kind, file_there=True)
    out = tmp_path / "opt.toml"
    seen = []

    def failing(build, store, scan, solution, recipe_path, corpus, **kw):
        seen.append(recipe_path.read_text())  # the recipe it measures, from a staging place
        raise LacqError("llama-perplexity exited with status 1")

    monkeypatch.setattr(f"lacq.studies.verify.verify_{kind}", failing)
    monkeypatch.setattr("lacq.model.info.inspect_model", lambda path: None)  # the stand-in base is no model
    r = CliRunner().invoke(cli, ["optimize", kind, str(path), *budget, "--verify", "-o", str(out)])
    assert r.exit_code == 1 and "status 1" in r.output and "Traceback" not in r.output, r.output
    assert not out.exists() and seen and "name = " in seen[0]
    # without --verify the same command writes the same text
    r = CliRunner().invoke(cli, ["optimize", kind, str(path), *budget, "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert out.read_text() == seen[0]
