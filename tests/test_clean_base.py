"""The clean base (docs/clean-base.md): the named model resolves to the committed F16 file, a llama whose
widths let every k-quant apply, never quantized, with SmolLM2's tokenizer."""

from __future__ import annotations

import json

import pytest

from lacq.errors import LacqError
from lacq.model import resolve
from lacq.model.info import inspect_model
from lacq.model.reader import read_gguf
from lacq.model.tokenizer import has_tokenizer


def test_clean_base_resolves_to_the_committed_file():
    path = resolve.resolve_model("clean-base")
    assert path == resolve.CLEAN_BASE and path.is_file()
    assert "clean-base" in resolve.NAMED_MODELS
    assert path.stat().st_size <= 40 * 10**6  # committed without LFS: kept small


def test_clean_base_widths_are_multiples_of_256_and_nothing_is_quantized():
    info = inspect_model(resolve.clean_base())
    meta = read_gguf(resolve.clean_base()).metadata
    assert info.architecture == "llama"
    assert info.n_embd % 256 == 0 and meta["llama.feed_forward_length"] % 256 == 0
    assert info.head_dim == 64 and info.n_blocks >= 6
    matrices = [t for t in info.tensors if len(t.shape) == 2]
    assert matrices and all(t.shape[0] % 256 == 0 for t in matrices), [(t.name, t.shape) for t in matrices]
    assert {t.type for t in matrices} == {"f16"} and {t.type for t in info.tensors if len(t.shape) == 1} == {"f32"}
    assert not any(t.name == "output.weight" for t in info.tensors)  # output tied to token_embd


def test_clean_base_carries_smollm2s_tokenizer():
    path = resolve.clean_base()
    meta = read_gguf(path).metadata
    assert has_tokenizer(path)
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "smollm"
    assert read_gguf(path).array_len("tokenizer.ggml.tokens") == 49152 == inspect_model(path).n_vocab


def test_clean_base_card_records_the_torch_check():
    card = json.loads(resolve.CLEAN_BASE.with_suffix(".json").read_text())
    assert card["heldout"]["torch_ppl"] > 1 and card["config"]["dim"] % 256 == 0


def test_missing_clean_base_is_one_clear_error(monkeypatch, tmp_path):
    monkeypatch.setattr(resolve, "CLEAN_BASE", tmp_path / "absent.gguf")
    with pytest.raises(LacqError, match="the clean base is not at"):
        resolve.resolve_model("clean-base")


@pytest.mark.e2e
def test_llama_perplexity_on_the_clean_base_equals_the_training_maths(cpu_build, tmp_path):
    """llama.cpp's PPL on held-out (non-judge) text equals the PPL the training code computed in torch on the
    same text and chunks: the GGUF's layout (rope order, GQA, tied output, norms) is the model that was trained."""
    from click.testing import CliRunner

    from lacq.cli import cli
    from lacq.results.store import open_store

    card = json.loads(resolve.CLEAN_BASE.with_suffix(".json").read_text())["heldout"]
    text = resolve.CLEAN_BASE.parent / card["text"]
    r = CliRunner().invoke(cli, ["ppl", "clean-base", "-f", str(text), "-c", "512", "--chunks", str(card["chunks_e2e"]),
                                 "--label", "clean-base", "--study", "e2e-clean-base"])
    assert r.exit_code == 0, r.output
    (result,) = open_store().results(kind="ppl", study="e2e-clean-base")
    assert len(result.metrics["chunks"]) == card["chunks_e2e"]
    assert result.metrics["ppl"] == pytest.approx(card["torch_ppl_e2e"], rel=0.01)


@pytest.mark.e2e
def test_quantize_predicts_the_file_size_with_its_header(cpu_build, tmp_path):
    """`lacq quantize` said "predicted 13.88 MB, actual 15.65 MB" for the clean base at q4_0: the plan counts
    tensor bytes, the file adds the tokenizer and header (1.77 MB here). The prediction now includes them."""
    import re

    from click.testing import CliRunner

    from lacq.cli import cli

    out = tmp_path / "q4_0.gguf"
    r = CliRunner().invoke(cli, ["quantize", "clean-base", "--recipe", "uniform_q4_0", "-o", str(out)])
    assert r.exit_code == 0, r.output
    predicted = float(re.search(r"predicted ([\d.]+) MB \(", r.output).group(1))
    assert predicted == pytest.approx(out.stat().st_size / 1e6, rel=0.005)
