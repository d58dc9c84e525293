import pytest

from lacq.errors import RecipeError
from lacq.plan.kv.config import KvConfig, boundary, parse_overrides
from lacq.plan.kv.types import kv_type


def test_boundary_two_on_thirty_layers():
    cfg = KvConfig("q8_0", "q4_0", "on", (), boundary(2, "q8_0"))
    layers = cfg.per_layer(30)
    upgraded = [i for i, (_, v) in enumerate(layers) if v == "q8_0"]
    assert upgraded == [0, 1, 28, 29]
    assert all(k == "q8_0" for k, _ in layers)
    assert cfg.env() == {"LLAMA_KV_TYPES_V": "0..1=q8_0,-2..-1=q8_0"}


def test_boundary_on_sixteen_kv_layers_is_by_ordinal():
    cfg = KvConfig("q8_0", "q4_0", "on", (), boundary(2, "q8_0"))
    assert [i for i, (_, v) in enumerate(cfg.per_layer(16)) if v == "q8_0"] == [0, 1, 14, 15]


def _model(tmp_path, n_blocks: int, **kw):
    from synth import write_synthetic_gguf

    from lacq.model.info import inspect_model
    return inspect_model(write_synthetic_gguf(tmp_path / "m.gguf", n_blocks=n_blocks, **kw))


def test_bits_per_value_boundary(tmp_path):
    k, v = KvConfig("q8_0", "q4_0", "on", (), boundary(2, "q8_0")).bits_per_value(_model(tmp_path, 30), 512)
    assert k == pytest.approx(8.5)
    assert v == pytest.approx((26 * 4.5 + 4 * 8.5) / 30)


def test_bits_per_value_prices_sliding_window_layers_at_their_cells(tmp_path):
    """gemma-3-270m's shape: 18 KV layers, every sixth global, window 512. At -c 4096 its sliding-window layers
    hold 1024 cells (window + ubatch, padded), the global ones 4096: boundary_v2 (V q8_0 on ordinals 0, 1, 16,
    17, the rest q4_0) is V 5.5370 bits/value, what the patch counted from allocated bytes; counting layers alike
    gives 5.389. At -c 512 every layer holds 512 cells, and both counts agree."""
    from lacq.plan.kv.policy import load_kv_policy
    info = _model(tmp_path, 18, arch="gemma3", n_head=4, n_head_kv=1, n_embd=256,
                  extra_kv={"{arch}.attention.sliding_window": 512})
    assert info.is_iswa and [b for b in info.kv_blocks if b not in info.swa_blocks] == [5, 11, 17]
    cfg = load_kv_policy("boundary_v2").config(ctk="q8_0", ctv="q4_0")
    k, v = cfg.bits_per_value(info, 4096)
    assert k == pytest.approx(8.5) and round(v, 4) == 5.5370
    assert cfg.bits_per_value(info, 512)[1] == pytest.approx((14 * 4.5 + 4 * 8.5) / 18)  # 5.389
    assert cfg.bits_per_value(info)[1] == pytest.approx((14 * 4.5 + 4 * 8.5) / 18)  # context unknown: per cell


def test_parse_overrides_round_trip():
    over = parse_overrides("0..1=q8_0, -1=f16,5=q4_0")
    assert [o.spec() for o in over] == ["0..1=q8_0", "-1=f16", "5=q4_0"]


@pytest.mark.parametrize("text,msg", [
    ("0..1", "bad KV layer override"),
    ("a=q8_0", "bad KV layer override"),
    ("0=q9_0", "unknown KV cache type"),
])
def test_parse_overrides_errors(text, msg):
    with pytest.raises(RecipeError, match=msg):
        parse_overrides(text)


def test_ordinal_beyond_model_and_empty_range():
    with pytest.raises(RecipeError, match="ordinal 30 is out of range: this model has 30 KV layers"):
        KvConfig(v_overrides=parse_overrides("30=q8_0")).per_layer(30)
    with pytest.raises(RecipeError, match="empty"):
        KvConfig(v_overrides=parse_overrides("5..2=q8_0")).per_layer(30)
    with pytest.raises(RecipeError, match="out of range"):
        KvConfig(v_overrides=parse_overrides("-31=q8_0")).per_layer(30)


def test_quantized_v_switches_flash_attention_on_or_refuses():
    assert KvConfig("q8_0", "q4_0", "auto").with_fa_resolved().flash_attn == "on"
    assert KvConfig("f16", "f16", "auto").with_fa_resolved().flash_attn == "auto"
    with pytest.raises(RecipeError, match="need flash attention"):
        KvConfig("q8_0", "q4_0", "off").with_fa_resolved()


def test_unknown_type_and_boundary_zero():
    with pytest.raises(RecipeError, match="unknown KV cache type"):
        KvConfig("q3_0", "f16")
    with pytest.raises(RecipeError, match="at least 1"):
        boundary(0, "q8_0")


def test_kv_type_sizes_mirror_ggml():
    assert kv_type("q8_0").bits_per_value == 8.5
    assert kv_type("q4_0").bits_per_value == 4.5
    assert kv_type("q2_0").bits_per_value == 2.25
    assert kv_type("f16").bits_per_value == 16


def test_backend_support_is_checked_before_running():
    KvConfig("q8_0", "q2_0", "on").check_backend("cpu")
    with pytest.raises(RecipeError, match="cannot run on the cuda backend"):
        KvConfig("q8_0", "q2_0", "on").check_backend("cuda")


def test_shipped_kv_policies():
    from lacq.plan.kv.policy import list_kv_policies, load_kv_policy
    assert {"boundary_v2", "boundary_v4", "last8_v", "layer0_high"} <= set(list_kv_policies())
    cfg = load_kv_policy("boundary_v2").config(ctk="q8_0", ctv="q4_0")
    assert [i for i, (_, v) in enumerate(cfg.per_layer(30)) if v == "q8_0"] == [0, 1, 28, 29]
    cfg = load_kv_policy("layer0_high").config(ctk="q4_0", ctv="q4_0")
    assert cfg.per_layer(16)[0] == ("f16", "f16") and set(cfg.per_layer(16)[1:]) == {("q4_0", "q4_0")}
    cfg = load_kv_policy("last8_v").config(ctk="q8_0", ctv="q4_0", overrides={"high": "q5_0"})
    assert [i for i, (_, v) in enumerate(cfg.per_layer(30)) if v == "q5_0"] == list(range(22, 30))


def test_kv_policy_errors(tmp_path):
    from lacq.plan.kv.policy import load_kv_policy
    with pytest.raises(RecipeError, match="unknown KV policy 'nope'; available: .*boundary_v2"):
        load_kv_policy("nope")
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "b"\ndescription = "d"\n[[v_layers]]\nlayers = "0"\ntype = "q3_9"\n')
    with pytest.raises(RecipeError, match="unknown KV cache type"):
        load_kv_policy(bad)
    bad.write_text('name = "b"\ndescription = "d"\nextra = 1\n[[v_layers]]\nlayers = "0"\ntype = "q8_0"\n')
    with pytest.raises(RecipeError, match="unknown keys extra"):
        load_kv_policy(bad)
    bad.write_text('name = "b"\ndescription = "d"\n[[v_layers]]\nlayers = "1..x"\ntype = "q8_0"\n')
    with pytest.raises(RecipeError, match="bad KV layer override"):
        load_kv_policy(bad)
    bad.write_text('name = "b"\ndescription = "d"\n')
    with pytest.raises(RecipeError, match="at least one"):
        load_kv_policy(bad)
    cfg = load_kv_policy("boundary_v4").config(ctk="q8_0", ctv="q4_0")
    with pytest.raises(RecipeError, match="out of range"):
        cfg.per_layer(3)


def test_turbo_types_and_their_bits(tmp_path):
    assert kv_type("turbo2").bits_per_value == 2.5
    assert kv_type("turbo3").bits_per_value == 3.5
    assert kv_type("turbo4").bits_per_value == 4.5
    # a turbo K needs flash attention even with an f16 V
    assert KvConfig("turbo3", "f16", "auto").with_fa_resolved().flash_attn == "on"
    from lacq.plan.kv.policy import load_kv_policy
    cfg = load_kv_policy("boundary_v2_turbo").config()
    assert (cfg.k, cfg.v) == ("q8_0", "turbo2")
    assert cfg.bits_per_value(_model(tmp_path, 30), 512)[1] == pytest.approx((26 * 2.5 + 4 * 8.5) / 30)
    cfg = load_kv_policy("boundary_v2_turbo4").config()
    assert [v for _, v in cfg.per_layer(30)].count("turbo4") == 4


def test_turbo_needs_head_size_multiple_of_64():
    KvConfig("q8_0", "turbo3", "on").check_head_size(64, 128)
    KvConfig("q8_0", "q4_0", "on").check_head_size(32, 32)
    with pytest.raises(RecipeError, match="multiple of 64.*this model's is 32"):
        KvConfig("q8_0", "turbo3", "on").check_head_size(64, 32)


def test_cuda_pairs_without_a_flash_attention_kernel_are_named_with_their_layers():
    # boundary layers at q8_0 under turbo3 V: K q8_0 / V q8_0 has a kernel; f16 boundary K under q8_0 V has not
    assert KvConfig("q8_0", "turbo3", "on", (), boundary(2, "q8_0")).slow_pairs("cuda", 8) == {}
    k_f16 = KvConfig("q8_0", "q8_0", "on", boundary(1, "f16"), ())
    assert k_f16.slow_pairs("cuda", 6) == {("f16", "q8_0"): [0, 5]}
    assert k_f16.slow_pairs("cpu", 6) == {}  # the CPU runs every pair
    assert KvConfig("q8_0", "q4_0", "on").slow_pairs("cuda", 3) == {("q8_0", "q4_0"): [0, 1, 2]}
    # patch 0009: a turbo type has kernels beside q8_0, f16 and every turbo type, in either order
    assert KvConfig("turbo2", "turbo3", "on").slow_pairs("cuda", 2) == {}
    assert KvConfig("turbo3", "turbo3", "on", (), boundary(1, "q8_0")).slow_pairs("cuda", 4) == {}
    assert KvConfig("turbo4", "f16", "on").slow_pairs("cuda", 1) == {}
    assert KvConfig("turbo3", "q4_0", "on").slow_pairs("cuda", 2) == {("turbo3", "q4_0"): [0, 1]}
    assert KvConfig("bf16", "turbo2", "on").slow_pairs("cuda", 1) == {("bf16", "turbo2"): [0]}


def test_tqs_types_their_bits_and_their_limits():
    for name, bpv, size in (("tqs2", 2.5, 20), ("tqs3", 3.5, 28), ("tqs4", 4.5, 36)):
        t = kv_type(name)
        assert (t.block_size, t.type_size, t.bits_per_value, t.quantized) == (64, size, bpv, True)
    assert KvConfig("tqs3", "f16", "auto").with_fa_resolved().flash_attn == "on"
    KvConfig("q8_0", "tqs3", "on").check_head_size(64, 256)
    with pytest.raises(RecipeError, match="tqs4 needs a head size that is a multiple of 64.*this model's is 96"):
        KvConfig("q8_0", "tqs4", "on").check_head_size(64, 96)
    KvConfig("q8_0", "tqs2", "on").check_backend("cpu")
    KvConfig("q8_0", "tqs2", "on").check_backend("cuda")  # patch 0012
    with pytest.raises(RecipeError, match="V cache type tqs2 cannot run on the .* CPU and CUDA backends only"):
        KvConfig("q8_0", "tqs2", "on").check_backend("metal")
    # CUDA flash attention: a tqs type with q8_0 or f16 on either side (as K: patch 0017, the boundary layers of a
    # tqs K policy) or with itself; anything else is converted to f16
    assert KvConfig("q8_0", "tqs3", "on").slow_pairs("cuda", 2) == {}
    assert KvConfig("tqs4", "tqs4", "on").slow_pairs("cuda", 1) == {}
    assert KvConfig("tqs3", "tqs3", "on", (), boundary(1, "q8_0")).slow_pairs("cuda", 4) == {}
    assert KvConfig("tqs3", "f16", "on").slow_pairs("cuda", 1) == {}
    assert KvConfig("turbo3", "tqs3", "on").slow_pairs("cuda", 1) == {("turbo3", "tqs3"): [0]}
    assert KvConfig("tqs2", "tqs3", "on").slow_pairs("cuda", 1) == {("tqs2", "tqs3"): [0]}
    assert KvConfig("tqs3", "q4_0", "on").slow_pairs("cuda", 1) == {("tqs3", "q4_0"): [0]}


def test_tql_types_their_bits_and_their_limits():
    for name, bpv, size in (("tql2", 2.5, 20), ("tql3", 3.5, 28), ("tql4", 4.5, 36)):
        t = kv_type(name)
        assert (t.block_size, t.type_size, t.bits_per_value, t.quantized) == (64, size, bpv, True)
    assert KvConfig("tql2", "f16", "auto").with_fa_resolved().flash_attn == "on"
    with pytest.raises(RecipeError, match="tql3 needs a head size that is a multiple of 64.*this model's is 96"):
        KvConfig("q8_0", "tql3", "on").check_head_size(64, 96)
    KvConfig("q8_0", "tql2", "on").check_backend("cuda")  # patch 0014
    with pytest.raises(RecipeError, match="V cache type tql2 cannot run on the metal backend: patches 0013-0016"):
        KvConfig("q8_0", "tql2", "on").check_backend("metal")
    assert KvConfig("q8_0", "tql3", "on").slow_pairs("cuda", 2) == {}
    assert KvConfig("tql2", "tql2", "on").slow_pairs("cuda", 1) == {}
    assert KvConfig("tqs3", "tql3", "on").slow_pairs("cuda", 1) == {("tqs3", "tql3"): [0]}
