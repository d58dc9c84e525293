"""gemma-3-270m, the second real model: a named model joined from PyPI chunk wheels, iSWA, 262k vocabulary."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from lacq.cli import cli
from lacq.model.info import inspect_model
from lacq.model.resolve import GEMMA3_SHA256, resolve_model
from lacq.results.store import open_store

pytestmark = pytest.mark.e2e


def test_gemma3_is_a_named_model(gemma3, cpu_build):
    from lacq.fsutil import file_sha256
    assert resolve_model("gemma3-270m") == gemma3  # the same file the fixture fetched, not a second download
    assert file_sha256(gemma3) == GEMMA3_SHA256
    m = inspect_model(gemma3)
    assert (m.architecture, m.n_blocks, m.n_head, m.n_head_kv, m.head_dim) == ("gemma3", 18, 4, 1, 256)
    assert (m.n_vocab, m.n_ctx_train) == (262144, 32768)
    assert m.kv_blocks == tuple(range(18))  # both caches count: every block owns KV
    # the Q8_0 embedding is most of the file; the blocks mix Q5_0, Q4_K, Q6_K and Q8_0 (640-wide rows)
    assert m.tensor("token_embd.weight").type == "q8_0"
    assert {t.type for t in m.tensors if t.block is not None and len(t.shape) > 1} >= {"q5_0", "q8_0"}


def test_gemma3_perplexity_by_name(gemma3, cpu_build):
    result = CliRunner().invoke(cli, ["ppl", "gemma3-270m", "-c", "128", "--chunks", "1", "--ctk", "q8_0",
                                      "--ctv", "q4_0", "--boundary", "1", "--label", "gemma"])
    assert result.exit_code == 0, result.output
    (r,) = open_store().results(kind="ppl")
    assert r.label == "gemma" and r.model_sha256 == GEMMA3_SHA256
    assert 1 < r.metrics["ppl"] < 1000 and len(r.metrics["chunks"]) == 1
    layers = r.metrics["kv_layers"]
    assert len(layers) == 18  # the per-layer patch's map covers both iSWA caches by ordinal
    assert [l["ordinal"] for l in layers] == list(range(18))
    assert [l["v_type"] for l in layers] == ["q8_0"] + ["q4_0"] * 16 + ["q8_0"]
