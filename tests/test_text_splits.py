"""The default corpus's parts (scan, judge, calibration): disjoint, byte-exact, cut at lines; overlap and
length checks."""

from __future__ import annotations

import pytest
from click.testing import CliRunner
from synth import write_synthetic_gguf

from lacq import corpus as splits
from lacq import paths
from lacq.cli import cli
from lacq.errors import LacqError


@pytest.fixture
def crlf_corpus(tmp_path):
    p = tmp_path / "wiki.test.raw"
    p.write_bytes(b"".join(f" = Heading {i} = \r\n".encode() if i % 9 == 0 else
                           f" line {i} : {'word ' * (i % 13 + 10)}\r\n".encode() for i in range(500)))
    return p


def test_the_default_corpus_parts_are_adjacent_disjoint_and_byte_exact():
    data = paths.default_corpus().read_bytes()
    b = splits.split_bounds(data)
    assert b == {"scan": (0, 323033), "judge": (323033, 645741), "calibration": (645741, 1290547)}
    parts = {p: splits.split_text(p).read_bytes() for p in splits.SPLITS}
    assert b"".join(parts[p] for p in ("scan", "judge", "calibration")) == data  # CRLF and all
    for p, (start, end) in b.items():
        assert parts[p] == data[start:end] and parts[p].endswith(b"\r\n") and data[start - 1:start] in (b"", b"\n")
    assert splits.calibration_text() == splits.split_text("calibration")


def test_no_long_line_of_the_judge_part_occurs_in_the_scan_or_calibration_parts():
    judge = splits.judge_text()
    assert splits.judge_overlap(judge, text=splits.scan_text()) is None
    assert splits.judge_overlap(judge, text=splits.calibration_text(), what="calibration") is None
    # the whole corpus holds the judge part: flagged
    msg = splits.judge_overlap(judge, text=paths.default_corpus())
    assert "shares" in msg and "line(s)" in msg


def test_splits_cut_at_line_boundaries_and_are_deterministic(crlf_corpus):
    data = crlf_corpus.read_bytes()
    first = {p: splits.split_text(p, crlf_corpus) for p in splits.SPLITS}
    for path in first.values():
        part = path.read_bytes()
        assert part.endswith(b"\r\n") and part.count(b"\r") == part.count(b"\n")  # whole CRLF lines only
    scan, judge, cal = (first[p].read_bytes() for p in ("scan", "judge", "calibration"))
    assert scan + judge + cal == data
    assert 0.2 < len(scan) / len(data) < 0.3 and 0.2 < len(judge) / len(data) < 0.3
    mtime = first["judge"].stat().st_mtime_ns
    first["scan"].unlink()  # re-made: the same bytes under the same name
    assert splits.scan_text(crlf_corpus) == first["scan"] and first["scan"].read_bytes() == scan
    assert splits.judge_text(crlf_corpus).stat().st_mtime_ns == mtime  # not rewritten
    crlf_corpus.write_bytes(data[:len(data) // 3])  # an edited corpus: new parts, never stale ones
    assert splits.judge_text(crlf_corpus) != first["judge"]
    assert not list(first["judge"].parent.glob(".*part"))


def test_unknown_split_and_missing_corpus_are_refused(tmp_path):
    with pytest.raises(LacqError, match="no text split 'test'"):
        splits.split_text("test")
    with pytest.raises(LacqError, match="does not exist"):
        splits.judge_text(tmp_path / "nope.raw")


def test_judge_overlap_by_the_hash_a_scan_records(crlf_corpus):
    from lacq.cache import Cache
    sha = Cache.open().sha256
    judge = splits.judge_text(crlf_corpus)
    assert splits.judge_overlap(judge, sha256=sha(splits.scan_text(crlf_corpus)), corpus=crlf_corpus) is None
    assert "shares" in splits.judge_overlap(judge, sha256=sha(crlf_corpus), corpus=crlf_corpus)
    assert "the scan's own text" in splits.judge_overlap(judge, sha256=sha(judge), corpus=crlf_corpus)
    assert "cannot be shown" in splits.judge_overlap(judge, sha256="ab" * 32, corpus=crlf_corpus)
    assert "records no text hash" in splits.judge_overlap(judge, sha256=None)


def test_check_length_refuses_a_text_shorter_than_the_chunks(crlf_corpus):
    judge = splits.judge_text(crlf_corpus)
    size = judge.stat().st_size
    splits.check_length(judge, 1, 256)  # 2 × 256 tokens: enough bytes
    with pytest.raises(LacqError, match=r"judge part .* too short for 100 chunk\(s\) of 512"):
        splits.check_length(judge, 100, 512)
    with pytest.raises(LacqError, match="too short"):
        splits.check_length(judge, None, size)  # llama-perplexity needs two chunks at least


@pytest.mark.parametrize("cmd", [["ppl"], ["kld", "--base", "{m}"]])
def test_ppl_and_kld_refuse_a_split_too_short_before_the_build(tmp_path, cmd):
    m = write_synthetic_gguf(tmp_path / "m.gguf")
    args = [a.format(m=m) for a in cmd] + [str(m), "--split", "judge", "--chunks", "1000"]
    r = CliRunner().invoke(cli, args)
    assert r.exit_code != 0 and "Traceback" not in r.output
    err = r.output.strip().splitlines()
    assert len(err) == 1 and "judge part of the corpus" in err[0] and "too short for 1000 chunk(s)" in err[0]


def test_split_option_rejects_an_unknown_part(tmp_path):
    m = write_synthetic_gguf(tmp_path / "m.gguf")
    r = CliRunner().invoke(cli, ["ppl", str(m), "--split", "test"])
    assert r.exit_code == 2 and "scan" in r.output and "judge" in r.output


# ---------------------------------------------------------------- a judge that has seen the scan's text
def _scan_on(tmp_path, text):
    """A weights scan (tests/test_optimize_cli.py's) recording `text` as the text it was measured on."""
    from lacq.cache import Cache
    from tests.test_optimize_cli import HEADER, N_ELEMENTS, bpw_scan
    scan = bpw_scan(n_elements=N_ELEMENTS, overhead_bytes=HEADER)
    prov = {"study": "s", "corpus_sha256": Cache.open().sha256(text)} if text else {"study": "s"}
    path = tmp_path / "scan.json"
    type(scan)(**{**scan.__dict__, "provenance": prov}).write(path)
    return path


def _optimize(tmp_path, scan, *extra):
    return CliRunner().invoke(cli, ["optimize", "weights", str(scan), "--bpw", "5.5", "-o", str(tmp_path / "o.toml"),
                                    *extra])


def test_strict_refuses_to_judge_on_text_the_scan_has_seen(tmp_path):
    r = _optimize(tmp_path, _scan_on(tmp_path, paths.default_corpus()), "--verify", "--strict")
    assert r.exit_code == 1 and "Traceback" not in r.output, r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and "shares" in lines[0] and "--strict refuses" in lines[0]
    assert not (tmp_path / "o.toml").exists()  # refused before anything is written


def test_a_judge_run_on_text_the_scan_has_seen_is_warned_about(tmp_path):
    r = _optimize(tmp_path, _scan_on(tmp_path, paths.default_corpus()), "--verify")
    assert "warning" in r.output and "judge part of the corpus" in r.output and "shares" in r.output
    r = _optimize(tmp_path, _scan_on(tmp_path, None), "--refine", "1")
    assert "warning" in r.output and "records no text hash" in r.output


def test_a_scan_of_the_scan_part_is_judged_without_warning(tmp_path):
    scan = _scan_on(tmp_path, splits.scan_text())
    r = _optimize(tmp_path, scan, "--verify", "--strict")
    assert "warning" not in r.output and "refuses" not in r.output
    r = _optimize(tmp_path, _scan_on(tmp_path, paths.default_corpus()), "--strict", "--force")  # judges nothing
    assert r.exit_code == 0 and "warning" not in r.output, r.output


# ---------------------------------------------------------------- too short for the chunks, in the library
def test_base_logits_refuse_a_short_text_before_running(tmp_path):
    from types import SimpleNamespace

    from lacq.measure.kld import base_logits
    from lacq.results.store import Store

    def no_tool(name):
        raise AssertionError("the tool ran")

    (tmp_path / "b.gguf").write_bytes(b"GGUF")
    short = tmp_path / "short.txt"
    short.write_bytes(b"a few words\n" * 100)  # 1,200 bytes: fewer than 4 × 512 tokens
    with pytest.raises(LacqError, match="too short for 4 chunk"):
        base_logits(SimpleNamespace(key="k", tool=no_tool), Store(tmp_path / "r.sqlite"), tmp_path / "b.gguf",
                    SimpleNamespace(n_vocab=256), short, ctx=512, chunks=4)


def test_ppl_refuses_a_run_the_tool_cut_short(tmp_path, monkeypatch):
    """llama-perplexity runs as many chunks as the text gives; fewer than asked is an error, nothing stored."""
    from types import SimpleNamespace

    from lacq.llama.tools import perplexity
    from lacq.measure import ppl
    from lacq.model.info import inspect_model
    from lacq.plan.kv.config import KvConfig
    from lacq.results.store import Store
    m = write_synthetic_gguf(tmp_path / "m.gguf")
    text = tmp_path / "t.txt"
    text.write_bytes(b"x" * 20_000)
    monkeypatch.setattr(ppl, "prepare_kv", lambda build, kv, info: kv)
    monkeypatch.setattr(perplexity, "run", lambda args, **kw: (SimpleNamespace(argv=args, seconds=1.0, output=""),
                                                                SimpleNamespace(n_chunks=3, k_bits_per_value=None)))
    store = Store(tmp_path / "r.sqlite")
    with pytest.raises(LacqError, match="gives only 3 chunks of 512 tokens, not 20"):
        ppl.measure_ppl(SimpleNamespace(key="k", tool=lambda n: n), store, m, inspect_model(m), KvConfig(), text,
                        ctx=512, chunks=20)
    assert store.results() == []
