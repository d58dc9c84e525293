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


def test_compare_ppl_beyond_tolerance_exits_3(tmp_path):
    b = _doc("cuda")
    b["configs"][3]["ppl"] *= 1.01
    r = run_cli("compare", _write(tmp_path, "a.json", _doc()), _write(tmp_path, "b.json", b))
    assert r.exit_code == 3 and "q8_0/turbo3" in r.output and "PPL" in r.output, r.output
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


def test_compare_a_configuration_one_backend_cannot_run_fails_unless_allow_partial(tmp_path):
    b = _doc("metal")
    b["configs"][2] = {"name": "q8_0/turbo4", "status": "unsupported", "reason": "Metal: same-type turbo only"}
    c = compare([_doc(), b], *TOL)
    assert len(c.problems) == 1 and "q8_0/turbo4 (metal: unsupported)" in c.problems[0], c.problems
    assert "--allow-partial" in c.problems[0]
    row = next(r for r in c.rows if r["config"] == "q8_0/turbo4")
    assert row["verdict"] == "ONE-SIDED" and "not run on metal" in row["diffs"][0]["note"]
    c = compare([_doc(), b], *TOL, allow_partial=True)
    assert not c.problems and any("q8_0/turbo4 (metal: unsupported)" in n for n in c.notes)
    assert next(r for r in c.rows if r["config"] == "q8_0/turbo4")["verdict"] == "n/a"
    a, b = _write(tmp_path, "a.json", _doc()), _write(tmp_path, "b.json", b)
    r = run_cli("compare", a, b)
    assert r.exit_code == 3 and "ran on only one of cpu and metal" in r.output, r.output
    r = run_cli("compare", a, b, "--allow-partial", "--format", "md")
    assert r.exit_code == 0 and "q8_0/turbo4 (metal: unsupported)" in r.output, r.output
    assert "every configuration agrees" in r.output


def _unsupported(doc: dict) -> dict:
    doc["configs"] = [{"name": c["name"], "kv": c["kv"], "status": "unsupported", "reason": "no kernel"}
                      for c in doc["configs"]]
    return doc


def test_compare_a_document_with_every_configuration_unsupported_compared_nothing(tmp_path):
    # a CUDA document of `lacq parity --no-backend-ops` where all seven configurations were unsupported
    cuda = _unsupported(_doc("cuda"))
    assert cuda["backend_ops"]["status"] == "not run"
    a, b = _write(tmp_path, "cpu.json", _doc()), _write(tmp_path, "cuda.json", cuda)
    for extra in ((), ("--allow-partial",)):
        r = run_cli("compare", a, b, *extra)
        assert r.exit_code == 3, r.output
        assert "compared nothing: no configuration was measured on both cpu and cuda" in r.output, r.output
    assert "7 configuration(s) ran on only one of cpu and cuda" in run_cli("compare", a, b).output


def test_compare_documents_sharing_no_configuration_compared_nothing(tmp_path):
    a, b = _doc(), _doc("cuda")
    a["configs"], b["configs"] = a["configs"][:3], b["configs"][3:]
    for extra in ((), ("--allow-partial",)):
        r = run_cli("compare", _write(tmp_path, "a.json", a), _write(tmp_path, "b.json", b), *extra)
        assert r.exit_code == 3 and "compared nothing" in r.output, r.output
    problems = compare([a, b], *TOL).problems
    assert any("7 configuration(s) ran on only one" in p for p in problems), problems


def test_compare_a_third_document_that_compared_nothing_fails_even_when_the_second_agrees():
    problems = compare([_doc(), _doc("cuda"), _unsupported(_doc("metal"))], *TOL, allow_partial=True).problems
    assert problems == ["compared nothing: no configuration was measured on both cpu and metal"]


def test_compare_backend_ops_run_on_one_side_only_fails_unless_allow_partial():
    a, b = _doc("cpu"), _doc("cuda", backend_ops=copy.deepcopy(OPS_RAN))
    problems = compare([a, b], *TOL).problems
    assert problems == [("test-backend-ops ran for cuda but not for cpu: those counts are not compared; "
                         "pass --allow-partial to accept a partial comparison")]
    c = compare([a, b], *TOL, allow_partial=True)
    assert not c.problems and any("ran for cuda but not for cpu" in n for n in c.notes)
    # run on both, or on neither: nothing one-sided
    assert not compare([_doc("cpu", backend_ops=copy.deepcopy(OPS_RAN)), b], *TOL).problems
    assert not compare([_doc("cpu"), _doc("cuda")], *TOL).problems


def test_compare_parity_documents_of_different_models_contexts_or_chunks_disagree(tmp_path):
    b = _doc("cuda", ctx=1024, chunks=DOC["chunks"] + 1)
    b["model"] = dict(b["model"], sha256="f" * 64)
    r = run_cli("compare", _write(tmp_path, "a.json", _doc()), _write(tmp_path, "b.json", b))
    assert r.exit_code == 3, r.output
    assert "measured different models (b179c9523d0e vs ffffffffffff), contexts (512 vs 1024), chunk counts" in r.output


def test_compare_real_cpu_and_cuda_documents():
    # captured on the H100 host with the Q4_1 model: CUDA's quantized matmul moves every row beyond
    # tolerance (README), and test-backend-ops ran only with CUDA
    runs = CAPTURES.parent.parent / "bench" / "results" / "gpu-2026-11-24"
    cpu, cuda = (json.loads((runs / f"parity-{b}.json").read_text()) for b in ("cpu", "cuda"))
    c = compare([cpu, cuda], *TOL)
    assert sum("cuda differs from cpu" in p for p in c.problems) == 7
    assert any("test-backend-ops ran for cuda but not for cpu" in p for p in c.problems)
    assert not compare([cpu, cuda], parse_tolerance("2%", "ppl"), parse_tolerance("0.02", "kld"),
                       allow_partial=True).problems


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


def test_compare_studies_of_different_models_contexts_and_chunks_disagree(tmp_path):
    from lacq.results.store import open_store
    store = open_store()
    for study, body, ctx, chunks in (("s-a", b"a", 512, 10), ("s-b", b"b", 1024, 20)):
        model = tmp_path / f"{study}.gguf"
        model.write_bytes(b"GGUF" + body * 60)
        for label in ("f16/f16", "q8_0/q4_0"):
            store.add(kind="ppl", label=label, model=model, build={"backend": "cpu", "build_key": "k"},
                      command=[], metrics={"ppl": 10.0, "ppl_error": 0.1}, study=study, ctx=ctx, chunks=chunks)
    r = run_cli("compare", "db:s-a", "db:s-b")
    assert r.exit_code == 3, r.output
    out = " ".join(r.output.split())
    assert "db:s-a and db:s-b measured different models (" in out, out
    assert "contexts (512 vs 1024), chunk counts (10 vs 20): parity needs the same model and tokens" in out, out
    # the same study against itself agrees
    assert run_cli("compare", "db:s-a", "db:s-a").exit_code == 0


def test_compare_a_study_whose_labels_measured_different_chunks_disagrees_only_where_they_differ(tmp_path):
    from lacq.results.store import open_store
    from lacq.studies.compare import study_document
    store = open_store()
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF" + bytes(60))
    for study, chunks_b in (("s-a", 10), ("s-b", 20)):
        for label, chunks in (("f16/f16", 10), ("q8_0/q4_0", chunks_b)):
            store.add(kind="ppl", label=label, model=model, build={"backend": "cpu"}, command=[],
                      metrics={"ppl": 10.0}, study=study, ctx=512, chunks=chunks)
    a, b = (study_document(s, store.results(study=s)) for s in ("s-a", "s-b"))
    assert b["chunks"] == [10, 20] and b["configs"][1]["measured"]["chunks"] == 20
    assert compare([a, b], *TOL).problems == [
        "db:s-a and db:s-b measured different chunk counts (10 vs 20): parity needs the same model and tokens"]


# ---------------------------------------------------------------- bad input: one clear line, non-zero, no files
def test_compare_mismatched_suite_versions_are_refused(tmp_path):
    a = _write(tmp_path, "a.json", _doc())
    b = _write(tmp_path, "b.json", _doc("cuda", suite_version=SUITE_VERSION + 1))
    assert_clean_error(run_cli("compare", a, b), "suite versions differ")


def test_compare_missing_file(tmp_path):
    r = run_cli("compare", _write(tmp_path, "a.json", _doc()), tmp_path / "nope.json")
    assert_clean_error(r, "nope.json")
    assert r.exit_code == 1  # bad input, not a disagreement (3)


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


# ---------------------------------------------------------------- the device a run used
def test_tool_devices_read_from_captured_cuda_runs(capture):
    from lacq.llama.tools.devices import tool_devices
    # llama-perplexity on the H100 host: "llama_prepare_model_devices: using device CUDA0 (NVIDIA H100 80GB HBM3) ..."
    assert tool_devices(capture("perplexity_cuda_h100.log")) == ["NVIDIA H100 80GB HBM3"]
    # test-backend-ops there: "ggml_cuda_init: found 1 CUDA devices" / "  Device 0: NVIDIA H100 80GB HBM3, ..."
    assert tool_devices(capture("backend_ops_cuda_head.log")) == ["NVIDIA H100 80GB HBM3"]
    assert tool_devices(capture("perplexity_q8_0_q4_0_fa.log")) == []  # a CPU build names no GPU


@pytest.mark.parametrize("text, devices", [
    # the formats of the pinned src/llama.cpp and ggml-cuda.cu: the devices the model is placed on win
    (("ggml_cuda_init: found 2 CUDA devices (Total VRAM: 160000 MiB):\n"
      "  Device 0: NVIDIA A100-SXM4-80GB, compute capability 8.0, VMM: yes, VRAM: 81000 MiB\n"
      "  Device 1: NVIDIA H100 80GB HBM3, compute capability 9.0, VMM: yes, VRAM: 81079 MiB\n"
      "I llama_prepare_model_devices: using device CUDA1 (NVIDIA H100 80GB HBM3) (0000:00:07.0) - 80552 MiB free\n"),
     ["NVIDIA H100 80GB HBM3"]),
    (("llama_prepare_model_devices: using device CUDA0 (NVIDIA H100 80GB HBM3) (0000:00:06.0) - 80000 MiB free\n"
      "llama_prepare_model_devices: skipping device CUDA1 (NVIDIA H100 80GB HBM3) with id 0000:00:06.0 - already "
      "using device CUDA0 (NVIDIA H100 80GB HBM3) with the same id\n"
      "llama_prepare_model_devices: using device CUDA2 (NVIDIA L4) (unknown id) - 22000 MiB free\n"),
     ["NVIDIA H100 80GB HBM3", "NVIDIA L4"]),
    # the Turing note repeats "Device %d: %s" without a capability: not a device of its own
    (("  Device 0: NVIDIA GeForce RTX 2080, compute capability 7.5, VMM: yes, VRAM: 7982 MiB\n"
      "The following devices will have suboptimal performance due to a lack of tensor cores:\n"
      "  Device 0: NVIDIA GeForce RTX 2080\n"), ["NVIDIA GeForce RTX 2080"]),
    ("  Device 0: AMD Radeon RX 7900 XTX, gfx1100 (0x1100), VMM: no, Wave Size: 32, VRAM: 24560 MiB\n",
     ["AMD Radeon RX 7900 XTX"]),
], ids=["placed-on-wins", "skipping-line", "turing-note", "hip"])
def test_tool_devices_formats(text, devices):
    from lacq.llama.tools.devices import tool_devices
    assert tool_devices(text) == devices


def test_measured_rows_record_the_gpu_the_tool_reported(capture):
    from lacq.measure.common import machine_record
    assert machine_record(capture("perplexity_cuda_h100.log"))["devices"] == ["NVIDIA H100 80GB HBM3"]


@pytest.fixture
def two_gpu_nvidia_smi(tmp_path, monkeypatch):
    """An nvidia-smi that names GPU 0 an A100 and GPU 1 an H100, and logs its arguments."""
    calls = tmp_path / "calls"
    smi = tmp_path / "bin" / "nvidia-smi"
    smi.parent.mkdir()
    smi.write_text(f"""#!/bin/sh
echo "$@" >> '{calls}'
id=0
while [ $# -gt 0 ]; do [ "$1" = -i ] && id=$2; shift; done
case $id in 0) echo "NVIDIA A100-SXM4-80GB";; 1) echo "NVIDIA H100 80GB HBM3";; *) exit 6;; esac
""")
    smi.chmod(smi.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{smi.parent}:{__import__('os').environ['PATH']}")
    return calls


@pytest.mark.parametrize("visible, name", [
    (None, "NVIDIA A100-SXM4-80GB"), ("1", "NVIDIA H100 80GB HBM3"), ("1,0", "NVIDIA H100 80GB HBM3"),
    (" 0 ,1", "NVIDIA A100-SXM4-80GB"),
])
def test_device_fallback_names_the_first_visible_gpu(two_gpu_nvidia_smi, monkeypatch, visible, name):
    from lacq.studies.parity import device_description
    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    assert device_description("cuda") == name


@pytest.mark.parametrize("visible", ["", "-1"])
def test_device_fallback_with_every_gpu_hidden_names_none(two_gpu_nvidia_smi, monkeypatch, visible):
    from lacq.studies.parity import device_description
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    assert device_description("cuda").startswith("no CUDA device visible")
    assert not two_gpu_nvidia_smi.exists()


def test_the_device_the_tool_reported_wins_over_nvidia_smi(two_gpu_nvidia_smi, monkeypatch, capture):
    from lacq.llama.tools.devices import tool_devices
    from lacq.studies.parity import device_description
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    assert device_description("cuda", tool_devices(capture("perplexity_cuda_h100.log"))) == "NVIDIA H100 80GB HBM3"
    assert not two_gpu_nvidia_smi.exists()  # nvidia-smi is not asked when the tool said


# ---------------------------------------------------------------- shared options
def test_parity_takes_backend_and_source_from_the_shared_build_options():
    from lacq.cli import cli

    def opts(command):
        return {p.name: (p.opts, p.help, p.default, getattr(p.type, "choices", None))
                for p in cli.commands[command].params if p.name in ("backend", "source")}

    assert opts("parity") == opts("ppl") and set(opts("parity")) == {"backend", "source"}
