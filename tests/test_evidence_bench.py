"""bench/evidence.py without a model: the "below the imatrix mix" columns and a failing lacq step."""

from __future__ import annotations

import sys

import pytest
from conftest import REPO

from lacq.errors import LacqError

sys.path.insert(0, str(REPO / "bench"))
import evidence


def _row(what, kld, p999):
    return {"what": what, "mb": 15.0, "kld": kld, "kld_error": 1e-6, "kld_p999": p999, "same_top_p_pct": 99.5,
            "same_top_p_error_pct": 0.1, "ppl": 10.0, "ppl_error": 0.5}


def test_below_the_imatrix_mix_is_positive_when_the_optimized_recipe_is_better():
    mix = _row("Q4_K_M+imatrix", 0.0400, 0.50)
    cells = evidence.fmt_row(_row("optimized", 0.0300, 0.60), mix).split(" | ")
    assert cells[-2:] == ["+25.0%", "-20.0% |"]  # 25% under in mean KLD, 20% over in the 99.9% tail
    assert evidence.fmt_row(mix, None).endswith("|  |  |")  # the reference row compares with nothing


def test_a_failing_lacq_step_stops_the_bench_with_its_last_line(tmp_path):
    run = evidence.Runner(tmp_path / "r.sqlite", tmp_path / "lacq.log", threads=1, extra=[])
    with pytest.raises(LacqError, match=r"lacq imatrix .*nowhere.gguf.* failed: .*nowhere.gguf.*\(its output: "):
        run("imatrix", tmp_path / "nowhere.gguf", threads=False)
    assert "$ lacq imatrix" in (tmp_path / "lacq.log").read_text() and run.commands == []
