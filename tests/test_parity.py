"""`lacq parity` and `lacq compare` without a build: the test-backend-ops parser on captured output,
the suite's per-backend support, compare's verdicts on parity documents, and bad input."""

from __future__ import annotations

import copy
import json
import stat

import pytest
from cliutil import assert_clean_error, run_cli
from conftest import CAPTURES

from lacq.errors import LacqError, ToolError
from lacq.llama.tools import backend_ops
from lacq.studies.compare import compare, parse_tolerance
from lacq.studies.parity import SUITE_VERSION, suite_configs

DOC = json.loads((CAPTURES / "parity_cpu_c512_n1.json").read_text())
OPS_RAN = {"status": "ran", "device": "CUDA0", "description": "x", "failed": 0, "note": None, "ops": {
    op: {"ran": 10, "passed": 10, "failed": 0, "skipped": 2, "turbo ran": 4, "turbo passed": 4, "turbo failed": 0,
         "turbo skipped": 0} for op in backend_ops.OPS}}


def _doc(backend="cpu", **changes):
    d = copy.deepcopy(DOC)
    d["backend"] = backend
    d.update(changes)
    return d


def _write(tmp_path, name, doc):
    p = tmp_path / name
    p.write_text(json.dumps(doc))
    return p


# ---------------------------------------------------------------- test-backend-ops parser
def test_backend_ops_counts_the_captured_cpu_set_rows_run_turbo_cases_included(capture):
    r = backend_ops.parse(capture("backend_ops_cpu_set_rows.log"), "CPU")
    assert r.tested and r.description == "AMD EPYC" and not r.unknown
    c = r.per_op["SET_ROWS"]
    assert c["passed"] == c["ran"] == 631 and c["failed"] == 0  # "631/631 tests passed" in the capture
    assert c["skipped"] > 0  # iq2_xxs and others: "not supported [CPU, CPU]"
    assert c["turbo passed"] == c["turbo ran"] > 0


def test_backend_ops_a_backend_name_that_matches_no_device_tests_nothing(capture):
    # test-backend-ops -b MTL0 on a CPU build: "Skipping", then "1/1 backends passed"
    assert not backend_ops.parse(capture("backend_ops_wrong_backend.log"), "MTL0").tested


def test_backend_ops_run_refuses_a_run_that_tested_nothing(tmp_path, capture):
    fake = tmp_path / "test-backend-ops"
    fake.write_text(f"#!/bin/sh\ncat '{CAPTURES / 'backend_ops_wrong_backend.log'}'\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    with pytest.raises(ToolError, match="tested nothing"):
        backend_ops.run(fake, "MTL0", "SET_ROWS", tmp_path / "log")


def test_backend_ops_skips_never_count_as_passes():
    text = ("Backend 1/1: CUDA0\n  Device description: GPU\n"
            "  FLASH_ATTN_EXT(type_K=turbo3,type_V=turbo3): not supported [CUDA0] \n"
            "  FLASH_ATTN_EXT(type_K=f16,type_V=f16): OK\n  FLASH_ATTN_EXT(type_K=q2_0,type_V=q2_0): FAIL\n")
    c = backend_ops.parse(text, "CUDA0").per_op["FLASH_ATTN_EXT"]
    assert (c["ran"], c["passed"], c["failed"], c["skipped"]) == (2, 1, 1, 1)
    assert (c["turbo ran"], c["turbo skipped"]) == (0, 1)


# ---------------------------------------------------------------- the suite
def test_suite_has_the_seven_configurations_and_metal_refuses_mixed_turbo_pairs():
    names = [c.name for c in suite_configs()]
    assert names == ["f16/f16", "q8_0/q4_0", "q8_0/turbo4", "q8_0/turbo3", "q8_0/turbo2 +boundary 2",
                     "turbo4/turbo4", "mixed per-layer"]
    mixed = suite_configs()[-1].kv
    assert mixed.per_layer(30)[0] == ("q8_0", "q8_0") and mixed.per_layer(30)[-1] == ("q8_0", "turbo4")
    runs_on_metal = []
    for cfg in suite_configs():
        try:
            cfg.kv.with_fa_resolved().check_backend("metal")
            runs_on_metal.append(cfg.name)
        except LacqError:
            pass
    assert runs_on_metal == ["f16/f16", "q8_0/q4_0", "turbo4/turbo4"]
    for cfg in suite_configs():  # all of them run on CPU and CUDA
        cfg.kv.with_fa_resolved().check_backend("cuda")


# ---------------------------------------------------------------- compare
TOL = (parse_tolerance("0.5%", "ppl"), parse_tolerance("0.002,5%", "kld"))


def test_compare_identical_documents_agree_and_print_a_markdown_table(tmp_path):
    a, b = _write(tmp_path, "a.json", _doc("cpu")), _write(tmp_path, "b.json", _doc("cuda"))
    r = run_cli("compare", a, b, "--format", "md")
    assert r.exit_code == 0, r.output
    assert "| f16/f16 |" in r.output and "every configuration agrees" in r.output


def test_compare_ppl_beyond_tolerance_exits_nonzero(tmp_path):
    b = _doc("cuda")
    b["configs"][3]["ppl"] *= 1.01
    r = run_cli("compare", _write(tmp_path, "a.json", _doc()), _write(tmp_path, "b.json", b))
    assert r.exit_code == 1 and "q8_0/turbo3" in r.output and "PPL" in r.output, r.output
    # a looser tolerance passes
    assert run_cli("compare", tmp_path / "a.json", tmp_path / "b.json", "--tolerance-ppl", "2%").exit_code == 0


def test_compare_kld_tolerance_absolute_or_relative():
    tol = parse_tolerance("0.002,5%", "kld")
    assert tol.ok(0.0, 0.0015) and tol.ok(0.10, 0.104) and not tol.ok(0.10, 0.11)
    assert not parse_tolerance("0.001", "kld").ok(0.1, 0.102)


def test_compare_a_turbo_test_count_that_differs_exits_nonzero():
    a, b = _doc("cuda", backend_ops=copy.deepcopy(OPS_RAN)), _doc("metal", backend_ops=copy.deepcopy(OPS_RAN))
    assert not compare([a, b], *TOL).problems
    b["backend_ops"]["ops"]["GET_ROWS"]["ran"] = 8  # stock-type support differs by design: shown, not gated
    assert not compare([a, b], *TOL).problems
    b["backend_ops"]["ops"]["FLASH_ATTN_EXT"]["turbo passed"] = 3
    problems = compare([a, b], *TOL).problems
    assert len(problems) == 1 and "FLASH_ATTN_EXT" in problems[0] and "turbo passed" in problems[0]


def test_compare_a_failed_case_exits_nonzero_even_when_counts_match():
    a, b = _doc("cuda", backend_ops=copy.deepcopy(OPS_RAN)), _doc("metal", backend_ops=copy.deepcopy(OPS_RAN))
    b["backend_ops"]["failed"] = 1
    assert any("failed on metal" in p for p in compare([a, b], *TOL).problems)


def test_compare_shows_a_configuration_one_backend_cannot_run_without_failing():
    b = _doc("metal")
    b["configs"][2] = {"name": "q8_0/turbo4", "status": "unsupported", "reason": "Metal: same-type turbo only"}
    c = compare([_doc(), b], *TOL)
    assert not c.problems
    row = next(r for r in c.rows if r["config"] == "q8_0/turbo4")
    assert row["verdict"] == "n/a" and "not run on metal" in row["diffs"][0]["note"]


def test_compare_a_configuration_whose_tool_failed_exits_nonzero():
    b = _doc("metal")
    b["configs"][5] = {"name": "turbo4/turbo4", "status": "failed", "reason": "llama-perplexity was killed"}
    problems = compare([_doc(), b], *TOL).problems
    assert problems == ["turbo4/turbo4: failed on metal: llama-perplexity was killed"]


def test_compare_refuses_kld_through_different_references():
    b = _doc("cuda")
    b["reference"] = dict(b["reference"], sha256="0" * 64)
    assert any("different base logits" in p for p in compare([_doc(), b], *TOL).problems)


def test_compare_accepts_studies_from_the_results_database(tmp_path, monkeypatch):
    from lacq.results.store import open_store
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF" + bytes(60))
    store = open_store()
    for study, ppl in (("run-a", 10.0), ("run-b", 10.01)):
        for label in ("f16/f16", "q8_0/q4_0"):
            store.add(kind="ppl", label=label, model=model, build={"backend": "cpu", "build_key": "k"},
                      command=[], metrics={"ppl": ppl, "ppl_error": 0.1}, study=study)
    r = run_cli("compare", "db:run-a", "db:run-b", "--format", "md")
    assert r.exit_code == 0, r.output
    assert "| q8_0/q4_0 | 10.0000 |" in r.output


# ---------------------------------------------------------------- bad input: one clear line, non-zero, no files
def test_compare_mismatched_suite_versions_are_refused(tmp_path):
    a = _write(tmp_path, "a.json", _doc())
    b = _write(tmp_path, "b.json", _doc("cuda", suite_version=SUITE_VERSION + 1))
    assert_clean_error(run_cli("compare", a, b), "suite versions differ")


def test_compare_missing_file(tmp_path):
    assert_clean_error(run_cli("compare", _write(tmp_path, "a.json", _doc()), tmp_path / "nope.json"), "nope.json")


def test_compare_not_a_parity_document(tmp_path):
    junk = tmp_path / "x.json"
    junk.write_text('{"hello": 1}')
    assert_clean_error(run_cli("compare", _write(tmp_path, "a.json", _doc()), junk), "not a `lacq parity` document")


def test_compare_bad_tolerance(tmp_path):
    a = _write(tmp_path, "a.json", _doc())
    assert_clean_error(run_cli("compare", a, a, "--tolerance-ppl", "half"), "--tolerance-ppl")


def test_parity_missing_base_logits_fails_before_any_work(tmp_path):
    out = tmp_path / "p.json"
    assert_clean_error(run_cli("parity", "--backend", "cuda", "--base-logits", tmp_path / "nope.logits", "--out", out),
                 "does not exist")
    assert not out.exists() and not list(tmp_path.glob("*.json*"))


def test_parity_refuses_an_existing_out_file(tmp_path):
    out = _write(tmp_path, "p.json", {"keep": True})
    assert_clean_error(run_cli("parity", "--out", out), "exists")
    assert json.loads(out.read_text()) == {"keep": True}


def test_kv_bytes_lines_are_parsed_from_a_real_cpu_run():
    from lacq.llama.tools import kv_bytes
    rows = kv_bytes.parse((CAPTURES / "kv_bytes_cpu.txt").read_text())
    assert len(rows) == 18 and rows[0] == {"device": "CPU", "type": "turbo2", "op": "SET_ROWS", "src": "f32",
                                           "blocks": 16384, "differ": 0}
    s = kv_bytes.summary(rows)
    assert (s["cases"], s["differ"], s["types"]) == (18, 0, ["tqs2", "tqs3", "tqs4", "turbo2", "turbo3", "turbo4"])
    # a differing block and an unsupported case, as the tool prints them
    more = kv_bytes.parse("CUDA0 tqs3 CPY f32: 8192 blocks, 3 differ FAIL\nCUDA0 tqs2 CPY f32: not supported\n")
    assert kv_bytes.summary(rows + more)["differ"] == 3 and kv_bytes.summary(more)["unsupported"] == 1
