"""Sensitivity scans and the optimizer on the real model: assembled variants, resume, bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from lacq import paths
from lacq.cli import cli
from lacq.errors import LacqError
from lacq.model.assemble import assemble
from lacq.model.info import inspect_model
from lacq.model.reader import read_gguf
from lacq.plan.recipe import parse_recipe, resolve_recipe
from lacq.quantize import quantize_with_plan
from lacq.results.store import open_store
from lacq.studies.scan import ScanError, scan_weights

pytestmark = pytest.mark.e2e
CTX, CHUNKS = 128, 2


def _recipe(name: str, base: str, rules: list[dict]):
    return parse_recipe({"name": name, "description": "test", "base": base, "rules": rules})


def _tensors(path: Path) -> dict[str, tuple[int, bytes]]:
    f = read_gguf(path)
    out = {}
    with open(path, "rb") as fh:
        for t, info in zip(f.tensors, inspect_model(path).tensors):
            fh.seek(f.data_offset + t.offset)
            out[t.name] = (t.type, fh.read(info.n_bytes))
    return out


def test_assembled_variant_equals_llama_quantize_output(cpu_build, smollm2_f16, tmp_path):
    """Tensor for tensor (types and bytes): llama-quantize quantizes every tensor on its own, so copying
    tensors between uniformly quantized files gives its output for the mixed plan, fallbacks included
    (q4_k on SmolLM2's 576-wide rows becomes q5_0; the tied embedding is named explicitly)."""
    store, info = open_store(), inspect_model(smollm2_f16)
    q = lambda name, base, rules: quantize_with_plan(cpu_build, store, smollm2_f16, info,
                                                     resolve_recipe(_recipe(name, base, rules), info),
                                                     output=tmp_path / f"{name}.gguf").output
    low = q("all-q4_0", "q4_0", [{"tensors": "*", "type": "q4_0"}])
    high = q("all-q4_k", "q4_k", [{"tensors": "*", "type": "q4_k"}])
    mixed = q("blk3-q4_k", "q4_0", [{"layers": "3", "tensors": "*", "type": "q4_k"},
                                    {"tensors": "token_embd", "type": "q4_k"}, {"tensors": "*", "type": "q4_0"}])
    names = [t.name for t in info.tensors if t.block == 3 and len(t.shape) > 1] + ["token_embd.weight"]
    assembled = assemble(low, {"q4_k": high}, {n: "q4_k" for n in names}, tmp_path / "assembled.gguf")
    want, got = _tensors(mixed), _tensors(assembled)
    assert list(want) == list(got)
    assert want == got
    kinds = {inspect_model(assembled).tensor(n).type for n in names}
    assert kinds == {"q4_k", "q5_0"}  # ffn_down's 1536-wide rows take q4_k; 576-wide rows fall back


def test_weight_scan_resumes_and_feeds_the_optimizer(cpu_build, smollm2, smollm2_f16, tmp_path):
    store = open_store()
    seen = []

    def stop_after_three(stage, frac, detail):
        if stage == "variants" and "/" in detail:
            seen.append(detail)
            if len(seen) == 4:  # the first report is the count before any job
                raise KeyboardInterrupt

    kw = dict(types=["q4_0", "q8_0"], units=("group",), chunks=CHUNKS, ctx=CTX)
    with pytest.raises(KeyboardInterrupt):
        scan_weights(cpu_build, store, smollm2, smollm2_f16, paths.default_corpus(), step=stop_after_three, **kw)
    stored = [r.label for r in store.results(kind="kld")]
    assert len(stored) == 3
    scan = scan_weights(cpu_build, store, smollm2, smollm2_f16, paths.default_corpus(), **kw)
    labels = [r.label for r in store.results(kind="kld")]
    assert labels[:3] == stored and len(labels) == len(set(labels))  # nothing measured twice
    groups = {u.id for u in scan.units}
    assert groups == {"attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down", "token_embd"}
    assert len(labels) == 2 + 2 * len(groups)
    assert scan.excluded_types == {} and scan.uniform["q4_0"].kld > scan.uniform["q8_0"].kld
    rows = [r for r in store.results(kind="kld") if r.metrics.get("engine")]
    assert len(rows) == len(labels)  # every variant filed by the engine says its base and where its KLD ran
    assert all(r.metrics["base_model"] == str(smollm2_f16) and r.metrics["kld_on"] == "host" and
               r.metrics["base_model_sha256"] == store.sha256(smollm2_f16) for r in rows)
    out = scan.write(tmp_path / "scan.json")
    q80, q40 = (sum(u.cost[t] for u in scan.units) + scan.fixed_cost for t in ("q8_0", "q4_0"))
    budget_mb = (q40 + (q80 - q40) / 3) / 1e6
    result = CliRunner().invoke(cli, ["optimize", "weights", str(out), "--size-mb", f"{budget_mb:.2f}", "--model",
                                      str(smollm2), "-o", str(tmp_path / "opt.toml"), "--verify"])
    assert result.exit_code == 0, result.output
    (r,) = [r for r in open_store().results(kind="kld") if r.study and r.study.startswith("optimize:")]
    assert r.model_bytes <= budget_mb * 1e6
    assert r.metrics["predicted"]["kld"] > 0
    assert scan.uniform["q8_0"].kld < r.metrics["kld_mean"] < scan.uniform["q4_0"].kld


def test_refine_measures_each_single_unit_move_and_keeps_only_a_measured_gain(cpu_build, smollm2, smollm2_f16,
                                                                             tmp_path):
    """`--refine 1`: every unit moved alone from the optimizer's choice is measured (journaled under the refine
    study), the recipe written is the refined choice, and llama-quantize's file of that recipe measures the KLD
    the refinement measured on its assembled file (the same bytes), no worse than the optimizer's own choice.
    (Judged on the judge part at the scan's chunk count here; the default judges on 20 chunks.)"""
    store = open_store()
    scan = scan_weights(cpu_build, store, smollm2, smollm2_f16, paths.default_corpus(), types=["q4_0", "q8_0"],
                        units=("group",), chunks=CHUNKS, ctx=CTX)
    out = scan.write(tmp_path / "scan.json")
    q80, q40 = (sum(u.cost[t] for u in scan.units) + scan.fixed_cost for t in ("q8_0", "q4_0"))
    budget_mb = (q40 + (q80 - q40) / 2) / 1e6
    result = CliRunner().invoke(cli, ["optimize", "weights", str(out), "--size-mb", f"{budget_mb:.2f}", "-o",
                                      str(tmp_path / "opt.toml"), "--refine", "1", "--judge-chunks", str(CHUNKS),
                                      "--verify"])
    assert result.exit_code == 0, result.output
    from lacq.studies.refine import journal_study
    from lacq.corpus import judge_text
    journal = journal_study(scan, cpu_build, open_store().sha256(judge_text()), CHUNKS)  # refine judges there
    refined = [r for r in open_store().results(kind="kld") if r.study == journal]
    # the start, one variant per unit moved to the other type (some may be the same file), at least one proposal
    assert len({r.label for r in refined}) >= 1 + len(scan.units) - 2
    start = min(refined, key=lambda r: r.id)
    line = next(x for x in result.output.splitlines() if x.startswith("refined: measured KLD"))
    before, after = (float(v) for v in line.split("KLD ")[1].split(" ± ")[0].split(" → "))
    assert before == pytest.approx(start.metrics["kld_mean"], abs=1e-5) and after <= before
    (v,) = [r for r in open_store().results(kind="kld") if r.study and r.study.startswith("optimize:")
            and r.recipe and r.id > start.id]
    assert v.model_bytes <= budget_mb * 1e6
    assert v.metrics["kld_mean"] == pytest.approx(after, abs=1e-5)


def test_refine_needs_the_scan_s_base_here(cpu_build, smollm2, smollm2_f16, tmp_path):
    scan = scan_weights(cpu_build, open_store(), smollm2, smollm2_f16, paths.default_corpus(), types=["q4_0", "q8_0"],
                        units=("group",), chunks=CHUNKS, ctx=CTX)
    d = json.loads(scan.to_json())
    d["base"]["path"] = str(tmp_path / "elsewhere.f16.gguf")
    (tmp_path / "scan.json").write_text(json.dumps(d))
    q40 = sum(u.cost["q4_0"] for u in scan.units) + scan.fixed_cost
    result = CliRunner().invoke(cli, ["optimize", "weights", str(tmp_path / "scan.json"), "--size-mb",
                                      f"{q40 * 1.2 / 1e6:.2f}", "-o", str(tmp_path / "opt.toml"), "--refine", "1"])
    assert result.exit_code == 1 and "elsewhere.f16.gguf does not exist; --verify and --refine measure on it" \
        in " ".join(result.output.split())
    assert "Traceback" not in result.output and not (tmp_path / "opt.toml").exists()


def test_variants_that_are_the_same_file_are_measured_once(cpu_build, smollm2, smollm2_f16):
    """q6_k falls back to q8_0 on SmolLM2's 576-wide rows, so only ffn_down (1536-wide) and nothing else differs
    between the two candidate files: 2 uniform runs and ffn_down's two variants are all that is measured."""
    store = open_store()
    before = len(store.results(kind="kld"))
    scan = scan_weights(cpu_build, store, smollm2, smollm2_f16, paths.default_corpus(), types=["q6_k", "q8_0"],
                        units=("group",), chunks=CHUNKS, ctx=CTX)
    assert len(store.results(kind="kld")) - before == 4
    units = {u.id: u for u in scan.units}
    assert units["ffn_down"].raise_["q8_0"].result_id != scan.uniform["q6_k"].result_id
    assert units["attn_v"].raise_["q8_0"].result_id == scan.uniform["q6_k"].result_id
    assert units["attn_v"].lower["q6_k"].result_id == scan.uniform["q8_0"].result_id
    assert any("were the same file as another" in n for n in scan.notes)


def test_the_source_type_is_excluded_and_said(cpu_build, smollm2, smollm2_f16):
    with pytest.raises(ScanError, match="q4_1 excluded: the model's own type"):
        scan_weights(cpu_build, open_store(), smollm2, smollm2_f16, paths.default_corpus(), types=["q4_1", "q8_0"],
                     chunks=CHUNKS, ctx=CTX)


@pytest.mark.parametrize("args,needle", [
    (["--types", "q4_0,q9_9"], "unknown type 'q9_9'"),
    (["--types", "q4_0,f16"], "f16 cannot be a scan candidate"),
    (["--unit", "layer"], "unknown unit 'layer'"),
    (["--chunks", "1", "-c", "128"], "1 chunk(s) of 128 tokens score 63 tokens"),
])
def test_bad_scan_input_fails_in_one_line(cpu_build, smollm2, smollm2_f16, args, needle):
    result = CliRunner().invoke(cli, ["scan", "weights", str(smollm2), "--base", str(smollm2_f16), "--chunks", "2",
                                      *args])
    assert result.exit_code == 1 and needle in result.output and "Traceback" not in result.output, result.output


def test_a_base_that_is_no_unquantized_parent_is_refused(cpu_build, smollm2, tmp_path):
    from synth import write_synthetic_gguf

    from lacq.studies.scan import check_base
    result = CliRunner().invoke(cli, ["scan", "weights", str(smollm2), "--base", str(smollm2)])
    assert result.exit_code == 1 and "is quantized" in result.output
    other = write_synthetic_gguf(tmp_path / "other.gguf", n_blocks=2)  # f16, but another model
    with pytest.raises(ScanError, match="not an unquantized parent"):
        check_base(smollm2, inspect_model(smollm2), other, inspect_model(other))


def test_a_disk_too_small_is_refused_up_front(cpu_build, smollm2, smollm2_f16, monkeypatch):
    real = shutil.disk_usage
    monkeypatch.setattr("lacq.studies.scan.shutil.disk_usage", lambda p: real(p)._replace(free=200_000_000))
    before = len(open_store().results())
    with pytest.raises(ScanError, match="needs about .* GB .* free"):
        scan_weights(cpu_build, open_store(), smollm2, smollm2_f16, paths.default_corpus(), types=["q4_0", "q8_0"],
                     chunks=CHUNKS, ctx=CTX)
    assert len(open_store().results()) == before


def test_optimize_refuses_a_scan_of_another_model_and_budgets_out_of_reach(smollm2, gemma3, tmp_path):
    from lacq.studies.artifact import Kld, Scan, Unit
    k = lambda x: Kld(x, 0.001)
    scan = Scan(kind="weights", model={"path": "m", "sha256": open_store().sha256(smollm2), "n_elements": 100},
                base={"path": "b"}, types=("q4_0", "q8_0"),
                units=(Unit("blk.0", "block", ("blk.0.attn_q.weight",), {"q4_0": 1e6, "q8_0": 2e6},
                            {"q8_0": k(0.1)}, {"q4_0": k(0.2)}, block=0),),
                uniform={"q4_0": k(0.2), "q8_0": k(0.1)}, fixed_cost=0.0, chunks=1, ctx=128, cost_unit="bytes")
    path = scan.write(tmp_path / "s.json")
    run = lambda *a: CliRunner().invoke(cli, ["optimize", "weights", str(path), *a, "-o", str(tmp_path / "x.toml")])
    r = run("--size-mb", "1.5", "--model", str(gemma3))
    assert r.exit_code == 1 and "the scan was made on" in r.output
    r = run("--size-mb", "0.5")
    assert r.exit_code == 1 and "budget" in r.output.lower() and not (tmp_path / "x.toml").exists()
    r = run("--size-mb", "9")
    assert r.exit_code == 1 and not (tmp_path / "x.toml").exists()
    r = run("--size-mb", "2")
    assert r.exit_code == 0, r.output
    assert 'layers = "0"' in (tmp_path / "x.toml").read_text()  # the one unit, raised to q8_0
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"schema": "other"}))
    r = CliRunner().invoke(cli, ["optimize", "weights", str(bad), "--size-mb", "1"])
    assert r.exit_code == 1 and "not a lacq scan" in r.output
    with pytest.raises(LacqError):
        Scan.read(tmp_path / "missing.json")


def test_kv_scan_measures_each_layer_raised_and_lowered_by_ordinal(cpu_build, smollm2):
    from lacq.studies.scan import scan_kv
    store = open_store()
    scan = scan_kv(cpu_build, store, smollm2, paths.default_corpus(), types=["q8_0", "turbo2"], chunks=CHUNKS, ctx=CTX)
    assert scan.types == ("turbo2", "q8_0") and len(scan.units) == 30
    assert [u.ordinal for u in scan.units] == list(range(30))
    assert scan.uniform["turbo2"].kld > scan.uniform["q8_0"].kld
    labels = {r.label for r in store.results(kind="kld", study=scan.provenance["study"])}
    assert len(labels) == 2 + 2 * 30 and "kv.7 raise q8_0" in labels and "kv.7 lower turbo2" in labels
    # one layer at q8_0 over turbo2 is mostly better than none, one at turbo2 under q8_0 mostly worse (2 × 63
    # scored tokens: single layers move the KLD by less than its noise for a few of them)
    raised = sum(u.raise_["q8_0"].kld < scan.uniform["turbo2"].kld for u in scan.units)
    lowered = sum(u.lower["turbo2"].kld > scan.uniform["q8_0"].kld for u in scan.units)
    assert raised >= 20 and lowered >= 20, (raised, lowered)
