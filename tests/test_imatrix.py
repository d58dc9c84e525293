"""Importance matrices without llama.cpp: the calibration cut, llama-imatrix's log, the imatrix GGUF checks, the
plan mirror's imatrix rules and the refusals (`lacq quantize`, `lacq imatrix`) on bad input."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
from click.testing import CliRunner
from synth import write_synthetic_gguf

from lacq.cli import cli
from lacq.corpus import calibration_text, first_half_end
from lacq.errors import ImatrixError
from lacq.llama.tools import imatrix as tool
from lacq.model.imatrix import check_imatrix, read_imatrix
from lacq.model.info import inspect_model
from lacq.plan.llama_quant import requires_imatrix
from lacq.plan.recipe import parse_recipe, resolve_recipe
from lacq.quantize import check_plan_imatrix


def write_imatrix(path: Path, columns: dict[str, int], general_type: str = "imatrix") -> Path:
    """An imatrix GGUF as llama-imatrix writes it: <weight>.in_sum2 [columns, 1] and <weight>.counts [1, 1]."""
    w = gguf.GGUFWriter(path, "llama")
    w.add_string("general.type", general_type)
    w.add_uint32("imatrix.chunk_count", 2)
    w.add_uint32("imatrix.chunk_size", 512)
    for name, cols in columns.items():
        w.add_tensor(f"{name}.in_sum2", np.ones((1, cols), dtype=np.float32))
        w.add_tensor(f"{name}.counts", np.full((1, 1), 1024, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture
def model(tmp_path) -> Path:
    # widths that are multiples of 256, so k-quants and i-quants apply without fallbacks
    return write_synthetic_gguf(tmp_path / "m.gguf", n_blocks=8, n_embd=256, n_ff=512, n_head=4, n_head_kv=4)


def full_imatrix(path: Path, model: Path) -> Path:
    info = inspect_model(model)
    return write_imatrix(path, {t.name: t.shape[0] for t in info.tensors
                                if t.name.startswith("blk.") and len(t.shape) >= 2})


def recipe(base: str, rules: list[dict] | None = None):
    return parse_recipe({"name": "t", "description": "t", "base": base, "rules": rules or []})


# ---------------------------------------------------------------- calibration text
def test_first_half_end_cuts_after_the_first_newline_past_the_middle():
    data = b"aaaa\nbbbb\ncccc\ndddd\n"
    assert first_half_end(data) == 15  # the middle is byte 10 ('c'); the next newline is byte 14
    assert data[:first_half_end(data)].endswith(b"\n")
    assert first_half_end(b"no newline at all") == len(b"no newline at all")


def test_calibration_text_is_the_second_half_written_once(tmp_path):
    corpus = tmp_path / "wiki.test.raw"
    lines = [f" = Heading {i} = \n" if i % 7 == 0 else f"line {i} with some words\n" for i in range(400)]
    corpus.write_text("".join(lines))
    part = calibration_text(corpus)
    data = corpus.read_bytes()
    assert part.read_bytes() == data[first_half_end(data):]
    assert part.read_bytes().startswith(b"line ") or part.read_bytes().startswith(b" = ")
    assert len(data) // 2 <= len(data) - part.stat().st_size + 1
    mtime = part.stat().st_mtime_ns
    assert calibration_text(corpus) == part and part.stat().st_mtime_ns == mtime  # not rewritten
    corpus.write_text("".join(lines[:200]))  # another corpus: another part, never the stale one
    assert calibration_text(corpus) != part
    assert not list(part.parent.glob(".*part"))  # no temporary left behind


# ---------------------------------------------------------------- llama-imatrix's log
def test_parse_a_real_run(capture):
    log = tool.parse(capture("imatrix_smollm2_f16_c512_n2.log"))
    assert (log.chunks, log.n_ctx) == (2, 512)
    assert log.ppl is not None and 5 < log.ppl < 100
    assert log.tokens_needed is None and not log.errors


def test_parse_a_text_too_short(capture):
    log = tool.parse(capture("imatrix_text_too_short.log"))
    assert log.chunks is None
    assert log.tokens_needed == 1024 and log.n_ctx == 512
    assert 0 < log.tokens_found < 1024
    assert log.errors


def test_argv_asks_for_gguf_whatever_the_output_name():
    args = tool.argv(Path("/b/llama-imatrix"), Path("m.gguf"), Path("t.txt"), Path(".x.part"), chunks=3, threads=2)
    assert args[args.index("--output-format") + 1] == "gguf"
    assert args[args.index("--chunks") + 1] == "3" and args[args.index("-c") + 1] == "512"
    assert args[args.index("-t") + 1] == "2"


@pytest.mark.parametrize("log,needed", [("quantize_dryrun_needs_imatrix.log", True), ("quantize_dryrun_q4_0.log", False)])
def test_a_dry_run_says_when_the_real_run_needs_an_imatrix(capture, log, needed):
    from lacq.llama.tools import quantize
    report = quantize.parse(capture(log))
    assert report.needs_imatrix is needed
    if needed:  # the capture: blk.0.ffn_down at iq2_xxs in a Q4_K_M file, which the mirror refuses as well
        assert report.types()["blk.0.ffn_down.weight"] == "iq2_xxs"
        assert requires_imatrix("blk.0.ffn_down.weight", "iq2_xxs", "Q4_K_M")


# ---------------------------------------------------------------- the plan mirror
@pytest.mark.parametrize("name,qtype,ftype,needed", [
    ("blk.0.attn_q.weight", "iq2_xxs", "Q4_K_M", True),
    ("blk.0.attn_q.weight", "iq2_xs", "Q4_K_M", True),
    ("blk.0.attn_q.weight", "iq2_s", "Q4_K_M", True),
    ("blk.0.attn_q.weight", "iq1_s", "Q4_K_M", True),
    ("blk.0.attn_q.weight", "iq1_m", "Q4_K_M", True),
    ("blk.0.attn_q.weight", "iq3_xxs", "Q4_K_M", True),
    ("blk.0.attn_q.weight", "q2_k", "Q2_K_S", True),
    ("blk.0.attn_q.weight", "q2_k", "Q2_K", False),  # k-quants need none, except q2_k in a Q2_K_S file
    ("blk.0.attn_q.weight", "iq3_s", "Q4_K_M", False),
    ("blk.0.attn_q.weight", "iq4_nl", "Q4_K_M", False),
    ("token_embd.weight", "iq2_xxs", "Q4_K_M", False),  # exempt, as in tensor_requires_imatrix()
    ("output.weight", "iq1_s", "Q4_K_M", False),
])
def test_requires_imatrix_mirrors_llama_quant(name, qtype, ftype, needed):
    assert requires_imatrix(name, qtype, ftype) is needed


def test_an_imatrix_changes_ffn_down_in_iq4_nl_and_q4_0_mixes(model):
    info = inspect_model(model)
    first = "blk.0.ffn_down.weight"  # i < n/8 with 8 blocks: block 0 only
    assert resolve_recipe(recipe("iq4_nl"), info).tensor_types[first] == "q5_k"
    assert resolve_recipe(recipe("iq4_nl"), info, imatrix=True).tensor_types[first] == "iq4_nl"
    assert resolve_recipe(recipe("q4_0"), info).tensor_types[first] == "q4_0"
    assert resolve_recipe(recipe("q4_0"), info, imatrix=True).tensor_types[first] == "q4_1"
    assert resolve_recipe(recipe("q5_0"), info, imatrix=True).tensor_types[first] == "q5_1"
    assert resolve_recipe(recipe("q4_0"), info, imatrix=True).tensor_types["blk.1.ffn_down.weight"] == "q4_0"
    # a k-quant mix is the same with or without one, but the plans hash apart (different files)
    with_, without = resolve_recipe(recipe("q4_k_m"), info, imatrix=True), resolve_recipe(recipe("q4_k_m"), info)
    assert with_.tensor_types == without.tensor_types and with_.plan_hash != without.plan_hash


def test_types_that_need_an_imatrix_are_refused_without_one(model, tmp_path):
    info = inspect_model(model)
    plan = resolve_recipe(recipe("q4_k_m", [{"tensors": "ffn_up", "type": "iq2_xxs"}]), info)
    assert len(plan.needs_imatrix) == 8
    with pytest.raises(ImatrixError, match=r"blk.0.ffn_up.weight and 7 more type iq2_xxs.*--imatrix"):
        check_plan_imatrix(plan, info, None)
    assert not resolve_recipe(recipe("q2_k"), info).needs_imatrix
    assert resolve_recipe(recipe("q2_k_s"), info).needs_imatrix
    with_one = resolve_recipe(recipe("q4_k_m", [{"tensors": "ffn_up", "type": "iq2_xxs"}]), info, imatrix=True)
    check_plan_imatrix(with_one, info, full_imatrix(tmp_path / "ok.imatrix.gguf", model))  # accepted


# ---------------------------------------------------------------- the imatrix file
def test_a_file_that_is_not_an_imatrix_is_refused(model, tmp_path):
    with pytest.raises(ImatrixError, match="is not an importance matrix.*lacq imatrix"):
        read_imatrix(model)  # a model, not an imatrix
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(ImatrixError, match="is not an importance matrix: not a GGUF file"):
        read_imatrix(text)


def test_an_imatrix_of_another_model_is_refused(model, tmp_path):
    other = write_synthetic_gguf(tmp_path / "other.gguf", n_blocks=8, n_embd=512, n_ff=512, n_head=4, n_head_kv=4)
    imx = read_imatrix(full_imatrix(tmp_path / "other.imatrix.gguf", other))
    with pytest.raises(ImatrixError, match=r"made from another model: \d+ of its 56 weights .*512 columns"):
        check_imatrix(imx, inspect_model(model), [], "m.gguf")
    deeper = write_synthetic_gguf(tmp_path / "deeper.gguf", n_blocks=9, n_embd=256, n_ff=512, n_head=4, n_head_kv=4)
    with pytest.raises(ImatrixError, match=r"7 of its 63 weights.*blk.8.* \(not in m.gguf\)"):
        check_imatrix(read_imatrix(full_imatrix(tmp_path / "d.imatrix.gguf", deeper)), inspect_model(model), [],
                      "m.gguf")


def test_an_imatrix_missing_tensors_the_plan_quantizes_is_refused(model, tmp_path):
    info = inspect_model(model)
    plan = resolve_recipe(recipe("q4_k_m"), info, imatrix=True)
    cols = {t.name: t.shape[0] for t in info.tensors if t.name.startswith("blk.") and len(t.shape) >= 2}
    del cols["blk.3.ffn_gate.weight"]
    partial = write_imatrix(tmp_path / "partial.imatrix.gguf", cols)
    with pytest.raises(ImatrixError, match=r"no data for 1 tensor\(s\) the plan quantizes, e.g. blk.3.ffn_gate"):
        check_plan_imatrix(plan, info, partial)


# ---------------------------------------------------------------- the commands
def _one_line_error(result) -> str:
    assert result.exit_code != 0
    lines = [l for l in result.output.splitlines() if l.strip()]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    return lines[0]


def test_quantize_refuses_a_type_that_needs_an_imatrix_before_running(model, tmp_path):
    toml = tmp_path / "low.toml"
    toml.write_text('name = "low"\ndescription = "d"\nbase = "q4_k_m"\n'
                    '[[rules]]\ntensors = "ffn_up"\ntype = "iq2_xs"\n')
    out = tmp_path / "out.gguf"
    line = _one_line_error(CliRunner().invoke(cli, ["quantize", str(model), "--recipe", str(toml), "-o", str(out)]))
    assert "iq2_xs" in line and "--imatrix" in line
    assert not out.exists() and not list(tmp_path.glob(".out.gguf*"))


def test_quantize_refuses_a_file_that_is_not_an_imatrix(model, tmp_path):
    bogus = tmp_path / "bogus.dat"
    bogus.write_bytes(b"\x00" * 64)
    line = _one_line_error(CliRunner().invoke(cli, ["quantize", str(model), "--recipe", "uniform_q4_0",
                                                    "--imatrix", str(bogus), "-o", str(tmp_path / "o.gguf")]))
    assert "is not an importance matrix" in line
    assert not (tmp_path / "o.gguf").exists()


def test_quantize_refuses_an_imatrix_of_another_model(model, tmp_path):
    other = write_synthetic_gguf(tmp_path / "other.gguf", n_blocks=8, n_embd=512, n_ff=512, n_head=4, n_head_kv=4)
    imx = full_imatrix(tmp_path / "other.imatrix.gguf", other)
    line = _one_line_error(CliRunner().invoke(cli, ["quantize", str(model), "--recipe", "uniform_q4_0",
                                                    "--imatrix", str(imx), "-o", str(tmp_path / "o.gguf")]))
    assert "made from another model" in line


def test_a_sweep_names_its_imatrix_and_a_bad_one_is_refused_before_any_work(model, tmp_path):
    from lacq.errors import SweepError
    from lacq.studies.sweep import load_sweep
    imx = full_imatrix(tmp_path / "m.imatrix.gguf", model)
    body = 'name = "s"\nmodels = ["m.gguf"]\nrecipes = ["uniform_q4_0"]\ncontexts = [512]\nmeasurements = ["kld"]\n'
    sweep = tmp_path / "sweep.toml"
    sweep.write_text(body + 'imatrix = "m.imatrix.gguf"\n')  # relative to the sweep file
    assert load_sweep(sweep).imatrix == str(imx.resolve())
    assert load_sweep(sweep).imatrix and load_sweep(_without(sweep, body)).imatrix is None
    sweep.write_text(body + 'imatrix = "nowhere.gguf"\n')
    with pytest.raises(SweepError, match="imatrix .*nowhere.gguf does not exist"):
        load_sweep(sweep)
    sweep.write_text(body + 'imatrix = "m.gguf"\n')  # a model, not an imatrix
    with pytest.raises(ImatrixError, match="is not an importance matrix"):
        load_sweep(sweep)


def _without(path: Path, body: str) -> Path:
    other = path.with_name("plain.toml")
    other.write_text(body)
    return other


def test_refine_and_verify_use_the_scans_own_imatrix(model, tmp_path):
    from types import SimpleNamespace

    from lacq.results.store import open_store
    from lacq.studies.verify import scan_imatrix
    store = open_store()
    imx = full_imatrix(tmp_path / "a.imatrix.gguf", model)
    other = write_imatrix(tmp_path / "b.imatrix.gguf", {"blk.0.attn_q.weight": 256})
    scan = SimpleNamespace(base={"path": str(model), "sha256": "x", "imatrix_sha256": store.sha256(imx)})
    assert scan_imatrix(store, scan, imx) == imx
    with pytest.raises(ImatrixError, match="candidate files were quantized with an importance matrix.*--imatrix"):
        scan_imatrix(store, scan, None)
    with pytest.raises(ImatrixError, match="is not the importance matrix the scan was made with"):
        scan_imatrix(store, scan, other)
    plain = SimpleNamespace(base={"path": str(model), "sha256": "x"})
    assert scan_imatrix(store, plain, None) is None and scan_imatrix(store, plain, imx) == imx


def test_results_of_a_file_quantized_with_an_imatrix_carry_its_hash(model, tmp_path):
    from lacq.results.store import open_store
    store = open_store()
    q = tmp_path / "q.gguf"
    q.write_bytes(model.read_bytes())
    plain = store.add(kind="kld", label="plain", model=q, build={}, command=[], metrics={})
    store.cache.record_artifact("k", q, {"imatrix_sha256": "ab" * 32})  # as quantize_with_plan records it
    made = store.add(kind="kld", label="imx", model=q, build={}, command=[], metrics={})
    assert store.get(plain).imatrix_sha256 is None and store.get(made).imatrix_sha256 == "ab" * 32
    q.write_bytes(model.read_bytes() + b"\0")  # other bytes at that path: not the file made with it
    assert store.get(store.add(kind="kld", label="x", model=q, build={}, command=[], metrics={})).imatrix_sha256 is None


def test_a_stand_in_file_answers_the_imatrix_of_the_files_it_was_assembled_from(model, tmp_path):
    """A scan's assembled variant (a temporary file standing in for its recipe's hash) is filed with the imatrix
    hash of its candidate files."""
    from lacq.results.store import open_store
    store = open_store()
    variant = tmp_path / "variant.gguf"
    variant.write_bytes(model.read_bytes())
    with store.cache.stand_in(variant, "cd" * 32, {"imatrix_sha256": "ab" * 32}):
        rid = store.add(kind="kld", label="v", model=variant, build={}, command=[], metrics={})
    assert store.get(rid).imatrix_sha256 == "ab" * 32
    assert store.cache.artifact_info(variant, "cd" * 32) == {}  # only while it stands in
