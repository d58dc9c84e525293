import json
from pathlib import Path

import pytest
from synth import write_synthetic_gguf

from lacq.errors import GGUFError
from lacq.model.info import ModelInfo, inspect_model

CAPTURE = Path(__file__).parent / "captures" / "smollm2_inspect.json"


@pytest.fixture(scope="module")
def smollm2_info(smollm2) -> ModelInfo:
    # The real file comes from the session fixture (downloaded once into the
    # e2e cache); ~3 s: the gguf reader decodes the whole tokenizer.
    return inspect_model(smollm2)


@pytest.mark.e2e
def test_smollm2_facts(smollm2_info):
    m = smollm2_info
    assert (m.architecture, m.n_blocks, m.n_head, m.n_head_kv) == ("llama", 30, 9, 3)
    assert (m.head_dim, m.head_dim_v, m.n_ctx_train, m.n_embd, m.n_vocab) == (64, 64, 8192, 576, 49152)
    assert m.file_type == "Q4_1"
    assert m.kv_blocks == tuple(range(30))
    assert m.kv_ordinal_map() == {i: i for i in range(30)}
    assert len(m.tensors) == 272
    assert "output.weight" not in {t.name for t in m.tensors}  # tied embeddings
    assert m.total_bytes == sum(t.n_bytes for t in m.tensors)
    assert len(m.tensors_by_block()[0]) == 9


@pytest.mark.e2e
def test_smollm2_matches_capture(smollm2_info):
    captured = ModelInfo.from_dict(json.loads(CAPTURE.read_text()))
    assert captured.tensors == smollm2_info.tensors
    assert captured.kv_blocks == smollm2_info.kv_blocks


def test_synthetic_llama_round_trip(tmp_path):
    m = inspect_model(write_synthetic_gguf(tmp_path / "m.gguf", n_blocks=3, tied=False))
    assert m.n_blocks == 3 and m.kv_blocks == (0, 1, 2) and m.kv_rule == "all blocks"
    assert m.head_dim == 16  # n_embd / n_head without attention.key_length
    q = m.tensor("blk.1.attn_q.weight")
    assert (q.block, q.group, q.type, q.shape, q.n_bytes) == (1, "attn_q", "f16", (64, 64), 64 * 64 * 2)
    assert m.tensor("output_norm.weight").type == "f32"
    assert {t.group for t in m.tensors if t.block is None} == {"token_embd", "output_norm", "output"}
    assert ModelInfo.from_dict(json.loads(json.dumps(m.to_dict()))) == m


HYBRIDS = [
    # lfm2-style: recurrent blocks have head_count_kv 0
    (dict(arch="lfm2", n_blocks=6, n_head_kv=[0, 0, 2, 0, 0, 2]), (2, 5)),
    (dict(arch="granitehybrid", n_blocks=4, n_head_kv=[0, 2, 0, 0]), (1,)),
    # qwen3next: every 4th block is full attention; the interval defaults to 4
    (dict(arch="qwen3next", n_blocks=8), (3, 7)),
    (dict(arch="qwen35", n_blocks=6, extra_kv={"{arch}.full_attention_interval": 3}), (2, 5)),
    (dict(arch="qwen35", n_blocks=4, extra_kv={"{arch}.attention.recurrent_layers": [True, False, True, False]}), (1, 3)),
    # nemotron_h: attention blocks have heads and no FFN; MLP blocks have neither heads nor recurrence
    (dict(arch="nemotron_h", n_blocks=4, n_head_kv=[0, 2, 0, 0], n_ff=[0, 0, 128, 0]), (1,)),
    (dict(arch="falcon-h1", n_blocks=3), (0, 1, 2)),
    (dict(arch="mamba", n_blocks=3), ()),
    (dict(arch="gemma4", n_blocks=6, extra_kv={"{arch}.attention.shared_kv_layers": 2}), (0, 1, 2, 3)),
    # the appended multi-token-prediction block is not in the main context's cache
    (dict(arch="llama", n_blocks=4, extra_kv={"{arch}.nextn_predict_layers": 1}), (0, 1, 2)),
    # an arch lacq does not list, with hybrid-looking metadata
    (dict(arch="newhybrid", n_blocks=4, n_head_kv=[2, 0, 0, 2]), (0, 3)),
]


@pytest.mark.parametrize("kwargs,expected", HYBRIDS, ids=[f"{k['arch']}-{i}" for i, (k, _) in enumerate(HYBRIDS)])
def test_kv_blocks(tmp_path, kwargs, expected):
    m = inspect_model(write_synthetic_gguf(tmp_path / "h.gguf", **kwargs))
    assert m.kv_blocks == expected
    assert m.kv_ordinal_map() == {b: i for i, b in enumerate(expected)}


def test_unknown_recurrent_arch_is_not_pure_attention(tmp_path):
    path = write_synthetic_gguf(tmp_path / "u.gguf", arch="newssm", extra_kv={"{arch}.ssm.state_size": 16})
    m = inspect_model(path)
    assert m.kv_rule.startswith("unknown") and m.kv_blocks == ()
    with pytest.raises(GGUFError, match="own a KV cache"):
        m.kv_ordinal_map()


def test_missing_file(tmp_path):
    with pytest.raises(GGUFError, match="no such file"):
        inspect_model(tmp_path / "nope.gguf")


def test_not_a_gguf(tmp_path):
    path = tmp_path / "x.gguf"
    path.write_bytes(b"PK\x03\x04 not a model")
    with pytest.raises(GGUFError, match="not a GGUF"):
        inspect_model(path)


def test_truncated_data(tmp_path):
    path = write_synthetic_gguf(tmp_path / "t.gguf", truncate=True)
    with pytest.raises(GGUFError, match="truncated"):
        inspect_model(path)


def test_truncated_header(tmp_path):
    path = write_synthetic_gguf(tmp_path / "t.gguf")
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(GGUFError, match="truncated"):
        inspect_model(path)


def test_no_block_count(tmp_path):
    with pytest.raises(GGUFError, match="block_count"):
        inspect_model(write_synthetic_gguf(tmp_path / "b.gguf", block_count=None))


GEMMA3_SWA = {"{arch}.attention.sliding_window": 128}


@pytest.mark.parametrize("extra,window,swa", [
    # gemma3's default pattern (src/models/gemma3.cpp: load_swa_pattern(ml, 6)): every sixth block global
    (GEMMA3_SWA, 128, (0, 1, 2, 3, 4, 6, 7, 8, 9, 10)),
    # an integer pattern in the metadata replaces the default
    ({**GEMMA3_SWA, "{arch}.attention.sliding_window_pattern": 4}, 128, (0, 1, 2, 4, 5, 6, 8, 9, 10)),
    # per-layer flags win
    ({**GEMMA3_SWA, "{arch}.attention.sliding_window_pattern": [True, False] * 6}, 128, (0, 2, 4, 6, 8, 10)),
    # no window: gemma3 without SWA keeps one cache
    ({}, None, ()),
])
def test_gemma3_sliding_window_blocks(tmp_path, extra, window, swa):
    m = write_synthetic_gguf(tmp_path / "g.gguf", n_blocks=12, arch="gemma3", extra_kv=extra)
    info = inspect_model(m)
    assert (info.swa_window, info.swa_blocks, info.is_iswa) == (window, swa, bool(swa))
    assert info.kv_blocks == tuple(range(12))  # ordinals count over both caches
    assert ModelInfo.from_dict(json.loads(json.dumps(info.to_dict()))) == info


def test_inspect_shows_the_two_caches_of_an_iswa_model(tmp_path):
    from click.testing import CliRunner

    from lacq.cli import cli
    m = write_synthetic_gguf(tmp_path / "g.gguf", n_blocks=12, arch="gemma3", extra_kv=GEMMA3_SWA)
    r = CliRunner().invoke(cli, ["inspect", str(m), "--no-tensors"])
    assert r.exit_code == 0, r.output
    assert "pure attention" not in r.output
    assert ("two KV caches (iSWA): sliding-window cache, window 128 tokens, for blocks 0-4, 6-10; "
            "full-context cache for blocks 5, 11") in " ".join(r.output.split())
    assert "ordinals count over both caches" in r.output
    rows = [line.split("│")[1:4] for line in r.output.splitlines() if line.count("│") >= 4]
    assert [c.strip() for c in rows[5]] == ["5", "5", "full"] and [c.strip() for c in rows[6]] == ["6", "6", "sliding-window"]
    d = json.loads(CliRunner().invoke(cli, ["inspect", str(m), "--json"]).output)
    assert d["swa_window"] == 128 and d["swa_blocks"] == [0, 1, 2, 3, 4, 6, 7, 8, 9, 10]
