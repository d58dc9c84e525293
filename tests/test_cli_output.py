"""Output for scripts and logs: plain progress lines when stderr is not a terminal; json and csv alone on
stdout; numbers for people in tables."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
from click.testing import CliRunner
from rich.console import Console

from lacq.cli import cli, common
from lacq.results.store import open_store


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_plain_progress_prints_a_line_per_stage_and_at_most_every_30_s():
    out, clock = io.StringIO(), Clock()
    with common.PlainProgress(Console(file=out, width=200), every=30, clock=clock) as progress:
        task = progress.add_task("perplexity", total=1.0, detail="f16/f16")
        for i in range(1, 21):  # a chunk every 4 s: 80 s in all
            clock.now += 4
            progress.update(task, completed=i / 20, detail=f"chunk {i}/20")
        other = progress.add_task("quantize", total=1.0, detail="")
        progress.update(other, completed=1.0, detail="done")
        progress.update(other, completed=1.0, detail="done")  # finished once, said once
    assert out.getvalue().splitlines() == [
        "[    0 s] perplexity: 0% f16/f16",
        "[   32 s] perplexity: 40% chunk 8/20",
        "[   64 s] perplexity: 80% chunk 16/20",
        "[   80 s] perplexity: 100% chunk 20/20",
        "[   80 s] quantize: 0%",
        "[   80 s] quantize: 100% done",
    ]


def test_progress_is_plain_lines_when_stderr_is_not_a_terminal(monkeypatch):
    monkeypatch.setattr(common, "err_console", Console(file=io.StringIO()))
    assert isinstance(common.progress_bar(), common.PlainProgress)
    monkeypatch.setattr(common, "err_console", Console(file=io.StringIO(), force_terminal=True))
    assert not isinstance(common.progress_bar(), common.PlainProgress)


# ---------------------------------------------------------------- stdout: the document alone, numbers for people
RESULTS = Path(__file__).resolve().parents[1] / "bench" / "results"
SCANS = {"weights": RESULTS / "scan-q4q8-tensor-cpu" / "scan_q4q8_tensor_cpu.json",
         "kv": RESULTS / "kv-cpu" / "scan_kv_gemma3_turbo.json"}
NUMBER = re.compile(r"(?<![\w.])[-+]?\d*\.\d+(?:e[-+]?\d+)?")


def _invoke(*args):
    """Run lacq with stdout and stderr apart (stdout is not a terminal here)."""
    return CliRunner().invoke(cli, list(map(str, args)))


def _longest_number(text: str) -> int:
    """Significant digits of the longest decimal number in `text`."""
    digits = [len(m.group().split("e")[0].lstrip("+-").replace(".", "").lstrip("0")) for m in NUMBER.finditer(text)]
    return max(digits, default=0)


class FakeBuild:
    key = "fake"
    backend = "cpu"
    patches = ("per-layer",)

    def provenance(self):
        return {"build_key": self.key}


@pytest.fixture
def model(tmp_path, monkeypatch):
    """A small GGUF to name on the command line, and no llama.cpp: the build is a stand-in."""
    from synth import write_synthetic_gguf
    monkeypatch.setattr("lacq.cli.common.require_build", lambda spec, source=None: FakeBuild())
    return write_synthetic_gguf(tmp_path / "m.gguf", n_blocks=2)


@pytest.fixture
def scan_cmd(model, monkeypatch):
    """`lacq scan KIND` returning a real scan artifact from bench/results (no measurement)."""
    from lacq.studies.artifact import Scan

    def invoke(kind, *args):
        monkeypatch.setattr(f"lacq.studies.scan.scan_{kind}", lambda *a, **kw: Scan.read(SCANS[kind]))
        base = ["--base", model] if kind == "weights" else []
        return _invoke("scan", kind, model, *base, *args)

    return invoke


@pytest.mark.parametrize("kind", ["weights", "kv"])
def test_scan_json_is_one_document_on_stdout_with_full_floats(scan_cmd, kind):
    r = scan_cmd(kind, "--format", "json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)  # nothing but the document
    (stored,) = open_store().results(kind="scan")
    assert doc["result_id"] == stored.id and doc["kind"] == kind
    units = {u["unit"]: u for p in doc["partitions"] for u in p["units"]}
    scan = stored.metrics
    first = scan["units"][0]
    lowest, highest = scan["types"][0], scan["types"][-1]
    # full precision: recovery = KLD all at the lowest type - KLD with the unit alone raised to the highest
    assert units[first["id"]]["recovery"] == scan["uniform"][lowest]["kld"] - first["raise"][highest]["kld"]
    assert all(p["pattern"] and p["advice"] for p in doc["partitions"])
    assert "stored as result" in r.stderr and "all " in r.stderr  # the sentences went to stderr


@pytest.mark.parametrize("kind", ["weights", "kv"])
def test_scan_table_and_csv_show_numbers_for_people_when_stdout_is_not_a_terminal(scan_cmd, kind):
    table = scan_cmd(kind)
    assert table.exit_code == 0, table.output
    assert "Recovery" in table.stdout and _longest_number(table.stdout) <= 6, table.stdout
    assert not re.search(r"\d…", table.stdout)  # no number cut by its column
    csv = scan_cmd(kind, "--format", "csv")
    assert csv.exit_code == 0, csv.output
    lines = csv.stdout.splitlines()
    assert lines[0].startswith("partition,unit,kind,recovery,recovery_err")
    assert len(lines) > 10 and _longest_number(csv.stdout) <= 6, csv.stdout
    assert "stored as result" in csv.stderr and "stored as result" not in csv.stdout


def test_a_value_and_its_error_are_shown_to_the_errors_precision():
    from lacq.results.render import significant, with_error
    assert with_error(0.067145000000001, 0.00950095872) == ("0.0671", "0.0095")
    assert with_error(29.51712, 0.41234) == ("29.52", "0.41")
    assert with_error(0.5, float("nan")) == ("0.5", "-")
    assert [significant(v) for v in (0.00950095872, 12345.678, 3.2e-05, 2.0, 0.1 + 0.2)] == \
        ["0.009501", "12346", "3.2e-05", "2", "0.3"]


def test_report_json_of_a_sweep_is_the_document_alone_and_progress_goes_to_stderr(tmp_path, model):
    store = open_store()
    for label, ppl in (("a", 10.123456789), ("b", 11.0)):
        store.add(kind="ppl", label=label, model=model, build={}, command=[], study="sw",
                  metrics={"ppl": ppl, "ppl_error": 0.0123456, "sweep_run": label})
    store.add(kind="sweep", label="sw", model=model, build={}, command=[], study="sw",
              metrics={"runs": [{"label": x, "measurement": "ppl", "key": x} for x in ("a", "b", "c")]})
    r = _invoke("report", "--study", "sw", "--format", "json")
    assert r.exit_code == 0, r.output
    rows = json.loads(r.stdout)
    assert {x["configuration"]: x["ppl"] for x in rows} == {"a": 10.123456789, "b": 11.0}
    assert "sweep sw: 2 of 3 runs stored; missing: c ppl" in r.stderr
    table = _invoke("report", "--study", "sw")
    assert "sweep sw: 2 of 3 runs stored" in table.stdout  # beside a table for people it stays there


def _fake_niah(store, model, info, kv, **kw):
    rid = store.add(kind="niah", label="f16/f16", model=model, build={}, command=[], study=kw.get("study"),
                    metrics={"pass_rate": 2 / 3, "trials": 3, "grid": [{"length": 256, "depth": 50, "passed": 2,
                                                                       "n": 3}]})
    return SimpleNamespace(result_id=rid, seconds=1.5, runner="completion")


def _fake_bench(store, model, info, kv, **kw):
    rows = [{"n_depth": 0, "n_prompt": 32, "n_gen": 0, "avg_ts": 1234.56789123, "stddev_ts": 12.3456789},
            {"n_depth": 0, "n_prompt": 0, "n_gen": 4, "avg_ts": 98.7654321, "stddev_ts": 0.123456}]
    rid = store.add(kind="bench", label="f16/f16", model=model, build={}, command=[], study=kw.get("study"),
                    metrics={"rows": rows, "device": "cpu", "build_key": "fake"})
    return SimpleNamespace(result_id=rid, seconds=1.5, rows=(SimpleNamespace(device="cpu"),))


@pytest.mark.parametrize("name,measure", [("niah", "lacq.measure.niah.grid.measure_niah"),
                                          ("bench", "lacq.measure.bench.measure_bench")])
@pytest.mark.parametrize("flag", [["--format", "json"], ["--json"]])
def test_niah_and_bench_json_is_the_stored_result_alone(model, monkeypatch, name, measure, flag):
    fake = _fake_niah if name == "niah" else _fake_bench
    monkeypatch.setattr(measure, lambda build, store, model, info, kv, **kw: fake(store, model, info, kv, **kw))
    r = _invoke(name, model, *flag)
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)  # one object, no "overall …" line after it
    (stored,) = open_store().results(kind=name)
    assert out["id"] == stored.id and out["metrics"] == stored.metrics
    table = _invoke(name, model)
    assert table.exit_code == 0, table.output
    assert _longest_number(table.stdout) <= 6, table.stdout


def test_json_flag_and_another_format_are_refused(model):
    r = _invoke("bench", model, "--json", "--format", "md")
    assert r.exit_code == 1 and "--json is --format json" in r.output and "Traceback" not in r.output


@pytest.fixture
def demo_cmd(model, monkeypatch, tmp_path):
    """`lacq demo` returning a canned placement study (the bench scan as its scan; nothing built or measured)."""
    import pandas as pd

    from lacq.studies.artifact import Scan
    from lacq.studies.placement import PlacementResult
    table = pd.DataFrame([
        {"configuration": "first8_q8", "kind": "recipe", "size_mb": 100.123456, "kld_mean": 0.0812345678,
         "kld_mean_error": 0.00123456, "ppl": 20.123456, "ppl_error": 0.3456, "ppl_delta_pct": 3.14159, "mark": "★"},
        {"configuration": "Q4_K_M", "kind": "llama.cpp", "size_mb": 105.5, "kld_mean": 0.09, "kld_mean_error": 0.0011,
         "ppl": 20.5, "ppl_error": 0.35, "ppl_delta_pct": 4.5, "mark": ""}])
    result = PlacementResult("demo-1", table, model, Scan.read(SCANS["weights"]), (tmp_path / "pareto.png",))
    monkeypatch.setattr("lacq.cli.study.run_build", lambda spec, source, progress=None: FakeBuild())
    monkeypatch.setattr("lacq.model.resolve.resolve_model", lambda spec: model)
    monkeypatch.setattr("lacq.studies.placement.run_placement_study", lambda *a, **kw: result)
    return lambda *args: _invoke("demo", *args)


def test_demo_json_is_the_table_alone_on_stdout(demo_cmd):
    r = demo_cmd("--format", "json")
    assert r.exit_code == 0, r.output
    rows = json.loads(r.stdout)  # nothing but the document
    assert [x["configuration"] for x in rows] == ["first8_q8", "Q4_K_M"] and rows[0]["kld_mean"] == 0.0812345678
    assert "study demo-1" in r.stderr and "wrote" in r.stderr and "scan (" in r.stderr  # the sentences on stderr
    table = demo_cmd()
    assert table.exit_code == 0, table.output
    assert "first8_q8" in table.stdout and "study demo-1" in table.stdout  # beside a table for people they stay
