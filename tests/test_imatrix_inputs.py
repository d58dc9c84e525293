"""`lacq imatrix` and `lacq quantize --imatrix` on bad input, refused before llama.cpp is built or run: calibration
text that overlaps the judge or scan part (warned; refused with --strict), a text too short for the chunks, an
imatrix missing tensors the plan quantizes."""

from __future__ import annotations

import pytest
from cliutil import assert_clean_error, run_cli
from synth import write_synthetic_gguf
from test_imatrix import write_imatrix

from lacq import corpus, paths
from lacq.cli.common import BuildChoice
from lacq.errors import LacqError
from lacq.model.info import inspect_model


@pytest.fixture
def model(tmp_path):
    return write_synthetic_gguf(tmp_path / "m.gguf", n_blocks=8, n_embd=256, n_ff=512, n_head=4, n_head_kv=4)


@pytest.fixture
def no_build(monkeypatch):
    """Reaching the build ends the command with a known line, so a test sees how far the checks let it go."""
    def require(self):
        raise LacqError("stopped at the build")
    monkeypatch.setattr(BuildChoice, "require", require)


def _error_lines(result) -> list[str]:
    return [line for line in result.output.splitlines() if line.startswith("Error:")]


def test_calibration_overlap_names_the_parts_a_text_shares_lines_with():
    assert corpus.calibration_overlap(corpus.calibration_text()) is None
    whole = corpus.calibration_overlap(paths.default_corpus())
    assert "with the judge part and" in whole and "with the scan part of the corpus" in whole
    scan = corpus.calibration_overlap(corpus.scan_text())
    assert "the scan part" in scan and "judge part" not in scan


def test_imatrix_strict_refuses_a_text_that_overlaps_the_judge_text(model, tmp_path, no_build):
    out = tmp_path / "m.imatrix.gguf"
    r = run_cli("imatrix", model, "--text", paths.default_corpus(), "--strict", "-o", out)
    assert_clean_error(r, "judge part", "--strict refuses to calibrate on it")
    lines = [line for line in r.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines == _error_lines(r), r.output  # one line, said before the build
    assert not out.exists() and not list(tmp_path.glob(".m.imatrix*"))


def test_imatrix_warns_when_its_text_overlaps_the_judge_or_scan_text(model, tmp_path, no_build):
    r = run_cli("imatrix", model, "--text", corpus.scan_text(), "-o", tmp_path / "o.gguf")
    assert "warning" in r.output and "the scan part of the corpus" in r.output
    assert _error_lines(r) == ["Error: stopped at the build"]  # warned, then went on


def test_imatrix_of_the_calibration_part_is_not_warned_about(model, tmp_path, no_build):
    for extra in ([], ["--text", corpus.calibration_text()]):
        r = run_cli("imatrix", model, "--strict", "-o", tmp_path / "o.gguf", *extra)
        assert "warning" not in r.output and "refuses" not in r.output
        assert _error_lines(r) == ["Error: stopped at the build"], r.output


def test_imatrix_refuses_a_text_too_short_for_the_chunks_before_the_build(model, tmp_path, no_build):
    text = tmp_path / "short.txt"
    text.write_bytes(corpus.calibration_text().read_bytes()[:3000])
    r = run_cli("imatrix", model, "--text", text, "--chunks", "8", "-o", tmp_path / "o.gguf")
    assert_clean_error(r, "too short for 8 chunk(s) of 512 tokens")
    assert len(_error_lines(r)) == 1 and "stopped at the build" not in r.output
    assert not (tmp_path / "o.gguf").exists()


def test_quantize_refuses_an_imatrix_missing_a_tensor_the_plan_quantizes(model, tmp_path):
    info = inspect_model(model)
    cols = {t.name: t.shape[0] for t in info.tensors if t.name.startswith("blk.") and len(t.shape) >= 2}
    del cols["blk.5.attn_v.weight"]
    partial = write_imatrix(tmp_path / "partial.imatrix.gguf", cols)
    out = tmp_path / "o.gguf"
    r = run_cli("quantize", model, "--recipe", "uniform_q4_0", "--imatrix", partial, "-o", out)
    assert_clean_error(r, "no data for 1 tensor(s) the plan quantizes, e.g. blk.5.attn_v")
    assert len([line for line in r.output.splitlines() if line.strip()]) == 1, r.output
    assert not out.exists()
