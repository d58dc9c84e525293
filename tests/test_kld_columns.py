"""Mean KLD ±, the 99.9% quantile and same top p ± in every KLD table, from llama-perplexity's own lines."""

from __future__ import annotations

import dataclasses
import io

import pytest
from rich.console import Console

from lacq.llama.tools import kld
from lacq.results.render import render
from lacq.results.store import Store
from lacq.results.tables import (
    COMBINED_COLUMNS,
    KLD_COLUMNS,
    PLACEMENT_COLUMNS,
    combined_frame,
    kld_frame,
    placement_frame,
)


def _store_kld(store, tmp_path, label, metrics, size):
    model = tmp_path / f"{label}.gguf"
    model.write_bytes(b"\0" * size)
    store.add(kind="kld", label=label, model=model, build={}, command=[], study="s", metrics=metrics)


@pytest.fixture
def two_results(tmp_path, capture):
    """The captured run, and a copy with a lower mean but a worse tail (ranking must follow the mean)."""
    m = dataclasses.asdict(kld.parse(capture("kld_q4_1_q8_0_q4_0_c128.log")))
    worse_tail = {**m, "kld_mean": m["kld_mean"] / 2, "kld_quantiles": {**m["kld_quantiles"], "p99.9": 0.9}}
    store = Store(tmp_path / "r.sqlite")
    _store_kld(store, tmp_path, "captured", m, 2000)
    _store_kld(store, tmp_path, "low mean, long tail", worse_tail, 1000)
    return store.results()


def test_the_parser_captures_the_99_9_quantile_and_same_top_p_with_its_error(capture):
    r = kld.parse(capture("kld_q4_1_q8_0_q4_0_c128.log"))
    assert r.kld_quantiles["p99.9"] == pytest.approx(0.244770)  # "99.9%   KLD:   0.244770"
    assert (r.same_top_p_pct, r.same_top_p_error_pct) == pytest.approx((92.593, 1.910))  # "92.593 ± 1.910 %"


@pytest.mark.parametrize("frame, columns", [(kld_frame, KLD_COLUMNS), (placement_frame, PLACEMENT_COLUMNS),
                                            (lambda rs: combined_frame(rs)[0], COMBINED_COLUMNS)])
def test_every_kld_table_has_the_tail_and_same_top_p_columns_and_ranks_by_mean(two_results, frame, columns):
    df = frame(two_results)
    for col in ("kld_mean", "kld_mean_error", "kld_p999", "same_top_p_pct", "same_top_p_error_pct"):
        assert col in columns and col in df.columns
    assert list(df.configuration) == ["low mean, long tail", "captured"]  # by mean KLD, not by the tail
    row = df.set_index("configuration").loc["captured"]
    assert (row.kld_p999, row.same_top_p_pct, row.same_top_p_error_pct) == pytest.approx((0.24477, 92.593, 1.91))
    out = io.StringIO()
    render(df, "table", Console(file=out, width=300), columns=columns)
    text = out.getvalue()
    assert "KLD 99.9%" in text and "0.2448" in text and "0.9000" in text and "1.91" in text and "92.59" in text


def test_combined_frame_shows_the_new_columns_only_where_measured(two_results):
    _, cols = combined_frame(two_results)
    assert list(cols).index("kld_mean") < list(cols).index("kld_p999") < list(cols).index("same_top_p_error_pct")


def test_scan_and_optimize_lines_carry_the_tail_and_same_top_p(tmp_path, capture):
    from lacq.cli.study import kld_columns
    from lacq.studies.artifact import Kld
    from lacq.studies.scan import stored_kld
    store = Store(tmp_path / "r.sqlite")
    _store_kld(store, tmp_path, "captured", dataclasses.asdict(kld.parse(capture("kld_q4_1_q8_0_q4_0_c128.log"))), 10)
    k = stored_kld(store, store.results()[0].id)
    assert (k.kld_p999, k.same_top_p, k.same_top_p_error) == pytest.approx((0.24477, 92.593, 1.91))
    assert kld_columns(k) == "KLD 0.01210 ± 0.00183, 99.9% 0.2448, same top p 92.59 ± 1.91%"
    assert kld_columns(Kld(0.5, 0.01)) == "KLD 0.50000 ± 0.01000"  # a scan made before these columns


def test_a_scan_keeps_the_new_fields_and_reads_older_scans(tmp_path):
    from tests.test_optimize_cli import bpw_scan
    scan = bpw_scan()
    lo = scan.types[0]
    with_tail = dataclasses.replace(scan.uniform[lo], kld_p999=0.3, same_top_p=90.0, same_top_p_error=0.5)
    scan = dataclasses.replace(scan, uniform={**scan.uniform, lo: with_tail})
    back = type(scan).read(scan.write(tmp_path / "s.json"))
    assert back.uniform[lo] == with_tail and back.uniform[scan.types[-1]].kld_p999 is None
