"""End to end: `lacq imatrix` with the real llama-imatrix on SmolLM2's F16 base (2 chunks, so it fits 2 cores), a
quantization with it that the plan mirror predicts (the --dry-run check agrees), its hash in the provenance, and
the text-too-short refusals."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner
from cliutil import assert_clean_error

from lacq.cli import cli
from lacq.corpus import calibration_text
from lacq.measure.imatrix import make_imatrix
from lacq.model.imatrix import check_imatrix, read_imatrix
from lacq.model.info import inspect_model
from lacq.plan.recipe import parse_recipe, resolve_recipe
from lacq.quantize import quantize_with_plan
from lacq.results.store import Store

pytestmark = pytest.mark.e2e
CHUNKS = 2


@pytest.fixture
def store(tmp_path) -> Store:
    return Store(tmp_path / "results.sqlite")


@pytest.fixture
def imatrix(cpu_build, smollm2_f16, store) -> Path:
    """SmolLM2's importance matrix over 2 chunks of the calibration text (cached in the e2e home)."""
    return make_imatrix(cpu_build, store, smollm2_f16, calibration_text(), chunks=CHUNKS).path


def test_lacq_imatrix_makes_a_cached_importance_matrix_of_the_calibration_text(cpu_build, smollm2_f16, tmp_path):
    out = tmp_path / "smollm2.imatrix.gguf"
    first = CliRunner().invoke(cli, ["imatrix", str(smollm2_f16), "--chunks", str(CHUNKS), "-o", str(out)])
    assert first.exit_code == 0, first.output
    # computed here ("wrote"), or copied from the artifact cache when an earlier run on this test home made it
    # elsewhere (then lacq says it is up to date); either way the file is there and checked below
    assert out.is_file() and str(out) in "".join(first.output.split()) and "sha256" in first.output
    imx = read_imatrix(out)
    assert imx.chunk_count == CHUNKS and imx.chunk_size == 512
    info = inspect_model(smollm2_f16)
    blk = [t.name for t in info.tensors if t.name.startswith("blk.") and len(t.shape) == 2]
    assert sorted(imx.columns) == sorted(blk)  # every block matrix, nothing else (token_embd is not collected)
    check_imatrix(imx, info, blk)
    again = CliRunner().invoke(cli, ["imatrix", str(smollm2_f16), "--chunks", str(CHUNKS), "-o", str(out)])
    assert again.exit_code == 0 and "up to date" in again.output  # cached: the same model, text, chunks and build
    assert not list(tmp_path.glob(".*part"))


@pytest.mark.parametrize("base", ["iq4_nl", "q4_0"])
def test_quantize_with_an_imatrix_gets_the_types_the_plan_predicts(cpu_build, smollm2_f16, imatrix, store, tmp_path,
                                                                 base):
    """An imatrix changes the first ffn_down types of IQ4_NL and Q4_0 files; the mirror predicts them and
    llama-quantize --dry-run --imatrix agrees, tensor for tensor; the file records the imatrix's hash."""
    info = inspect_model(smollm2_f16)
    recipe = parse_recipe({"name": base, "description": "d", "base": base})
    plan = resolve_recipe(recipe, info, imatrix=True)
    without = resolve_recipe(recipe, info)
    changed = {n for n in plan.tensor_types if plan.tensor_types[n] != without.tensor_types[n]}
    assert changed == {f"blk.{i}.ffn_down.weight" for i in range(30 // 8)}
    dry = quantize_with_plan(cpu_build, store, smollm2_f16, info, plan, imatrix=imatrix, dry_run=True,
                             output=tmp_path / "dry.gguf")
    assert dry.mismatches == ()
    out = quantize_with_plan(cpu_build, store, smollm2_f16, info, plan, imatrix=imatrix, output=tmp_path / "q.gguf")
    assert out.mismatches == ()
    written = {t.name: t.type for t in inspect_model(out.output).tensors}
    assert written == plan.tensor_types
    rid = store.add(kind="kld", label="q", model=out.output, build=cpu_build.provenance(), command=[], metrics={})
    assert store.get(rid).imatrix_sha256 == store.sha256(imatrix)


def assert_one_error_line(result, needle: str) -> None:
    """A clean failure (exit 1, no traceback) whose message is one line (the progress bar may precede it)."""
    assert_clean_error(result, needle)
    errors = [l for l in result.output.splitlines() if l.startswith("Error:")]
    assert len(errors) == 1 and needle in errors[0] and result.output.rstrip().endswith(errors[0]), result.output


def test_a_text_too_short_for_the_chunks_is_refused(cpu_build, smollm2_f16, tmp_path):
    text = tmp_path / "short.txt"
    text.write_bytes(calibration_text().read_bytes()[:9000])  # about 2 chunks of 512 tokens
    out = tmp_path / "short.imatrix.gguf"
    r = CliRunner().invoke(cli, ["imatrix", str(smollm2_f16), "--text", str(text), "--chunks", "6", "-o", str(out)])
    assert_one_error_line(r, "is too short for --chunks 6: it holds 4 chunk(s) of 512 tokens")
    assert not out.exists() and not list(tmp_path.glob(".*part"))
    text.write_bytes(calibration_text().read_bytes()[:2000])  # under the 2 × 512 tokens llama-imatrix needs
    r = CliRunner().invoke(cli, ["imatrix", str(smollm2_f16), "--text", str(text), "--chunks", "2", "-o", str(out)])
    assert_one_error_line(r, "tokenizes to 455 tokens; llama-imatrix needs at least 1024 for a context of 512")
    assert not out.exists()



def test_a_scan_with_an_imatrix_and_optimize_verify_measure_files_made_with_it(cpu_build, smollm2, smollm2_f16,
                                                                             imatrix, tmp_path):
    """`scan weights --imatrix`: candidate files quantized with it, its hash in the scan and in every variant's
    result; `optimize --verify` of that scan refuses to measure without it, and with it files the verified
    recipe's result with the hash."""
    from lacq import paths
    from lacq.results.store import open_store
    from lacq.studies.scan import scan_weights
    store = open_store()
    sha = store.sha256(imatrix)
    scan = scan_weights(cpu_build, store, smollm2, smollm2_f16, paths.default_corpus(), types=["q4_0", "q8_0"],
                        units=("group",), chunks=2, ctx=128, imatrix=imatrix)
    assert scan.base["imatrix_sha256"] == sha
    assert all(f".imatrix-{sha[:12]}" in f for f in scan.provenance["files"].values())
    variants = store.results(kind="kld", study=scan.provenance["study"])
    assert variants and {r.imatrix_sha256 for r in variants} == {sha}
    out = scan.write(tmp_path / "scan.json")
    q80, q40 = (sum(u.cost[t] for u in scan.units) + scan.fixed_cost for t in ("q8_0", "q4_0"))
    args = ["optimize", "weights", str(out), "--size-mb", f"{(q40 + (q80 - q40) / 2) / 1e6:.2f}", "-o",
            str(tmp_path / "opt.toml"), "--verify", "--judge-chunks", "2", "--force"]
    refused = CliRunner().invoke(cli, args)
    assert_one_error_line(refused, "quantized with an importance matrix")
    done = CliRunner().invoke(cli, [*args, "--imatrix", str(imatrix)])
    assert done.exit_code == 0, done.output
    (verified,) = [r for r in open_store().results(kind="kld") if (r.study or "").startswith("optimize:")]
    assert verified.imatrix_sha256 == sha
