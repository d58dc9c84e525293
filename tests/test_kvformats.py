"""Reference quantizers of the KV-format study (bench/kvformats): layouts, round trips, error bands.
No model files: random and hand-made blocks only."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench" / "kvformats"))
import blockq  # noqa: E402
import formats  # noqa: E402
import quants  # noqa: E402


def gaussian(n_blocks, width=64, seed=0):
    return np.random.default_rng(seed).standard_normal((n_blocks, width)).astype(np.float32)


@pytest.mark.parametrize("bits, block_bytes, bpv", [(2, 20, 2.5), (3, 28, 3.5), (4, 36, 4.5)])
def test_tqs_block_bytes_and_bits_per_value(bits, block_bytes, bpv):
    x = gaussian(5)
    assert len(formats.quantize(x, bits)) == 5 * block_bytes
    assert formats.bits_per_value(bits) == bpv


# relative MSE on N(0,1) blocks: tqs is below turbo at the same bits/value
@pytest.mark.parametrize("bits, tqs_max, turbo_min", [(2, 0.097, 0.100), (3, 0.0215, 0.0245), (4, 0.0053, 0.0056)])
def test_tqs_error_band_on_gaussian_and_beats_turbo(bits, tqs_max, turbo_min):
    x = gaussian(1024)
    e_tqs = quants.rel_mse(x, formats.roundtrip(x, bits))
    e_turbo = quants.rel_mse(x, quants.turbo(bits)(x))
    assert e_tqs < tqs_max
    assert e_turbo > turbo_min
    assert e_tqs < e_turbo


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_tqs_dequantize_reads_the_fields_quantize_wrote(bits):
    x = gaussian(64, seed=bits)
    d, u, idx = formats.quantize_fields(x, bits)
    cent = np.array(quants.turbo_ref.CENTROIDS[bits], dtype=np.float32)
    scale = d.astype(np.float32)[:, None] * np.repeat(u.astype(np.float32), 16, axis=1)
    expect = (cent[idx] * scale).reshape(-1)
    got = formats.dequantize(formats.pack(d, u, idx, bits), bits)
    np.testing.assert_array_equal(got, expect)


@pytest.mark.parametrize("bits, j, byte, shift", [
    (2, 0, 4, 0), (2, 17, 5, 2), (2, 63, 19, 6),
    (4, 0, 4, 0), (4, 31, 35, 0), (4, 32, 4, 4), (4, 63, 35, 4),
])
def test_tqs_index_position_in_block(bits, j, byte, shift):
    d = np.array([1.0], dtype=np.float16)
    u = np.ones((1, 4), dtype=np.uint8)
    idx = np.zeros((1, 64), dtype=np.uint8)
    idx[0, j] = 1
    raw = np.frombuffer(formats.pack(d, u, idx, bits), dtype=np.uint8)
    assert raw[byte] == 1 << shift
    assert np.count_nonzero(raw[4:]) == 1


@pytest.mark.parametrize("j", [0, 7, 8, 63])
def test_tqs3_high_bit_plane(j):
    d = np.array([1.0], dtype=np.float16)
    u = np.ones((1, 4), dtype=np.uint8)
    idx = np.zeros((1, 64), dtype=np.uint8)
    idx[0, j] = 4
    raw = np.frombuffer(formats.pack(d, u, idx, 3), dtype=np.uint8)
    assert raw[20 + j // 8] == 1 << (j % 8)
    assert np.count_nonzero(raw[4:20]) == 0


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_tqs_sub_scales_use_the_full_range(bits):
    x = gaussian(256, seed=7)
    x[:, :16] *= 4  # one loud sub-block per block
    _d, u, _idx = formats.quantize_fields(x, bits)
    assert u.max(axis=1).min() >= 14 and u.max() <= 15
    assert u.min() >= 1


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_tqs_zero_block_and_zero_sub_block(bits):
    x = gaussian(2, seed=3)
    x[0] = 0
    x[1, 16:32] = 0
    y = formats.roundtrip(x, bits)
    assert not y[0].any()
    assert not y[1, 16:32].any()
    assert y[1, :16].any()


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_tqs_power_of_two_scaling_commutes(bits):
    x = gaussian(32, seed=11)
    np.testing.assert_array_equal(formats.roundtrip(x * 4, bits), formats.roundtrip(x, bits) * 4)


@pytest.mark.parametrize("fn, x, expect", [
    (quants.q4_0, np.arange(-8, 24, dtype=np.float32) % 16 - 8, None),      # integers -8..7 exact
    (quants.q5_0, np.arange(-16, 16, dtype=np.float32), None),              # integers -16..15 exact
    (quants.q8_0, np.arange(-127, 129, 8, dtype=np.float32), None),
])
def test_ggml_reference_quantizers_reproduce_representable_blocks(fn, x, expect):
    np.testing.assert_array_equal(fn(x), x if expect is None else expect)


def test_q4_0_scale_is_signed_max_over_minus_8():
    x = np.zeros(32, dtype=np.float32)
    x[3] = 4.0  # max magnitude is positive: d = -0.5, so 4.0 maps to code 0 -> -8*d = 4
    x[5] = -3.0
    y = quants.q4_0(x)
    assert y[3] == 4.0 and y[5] == -3.0


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_lloyd_max_solver_reproduces_turbo_centroids(bits):
    c, _mse = quants.lloyd_max_gaussian(2 ** bits)
    np.testing.assert_allclose(c, quants.turbo_ref.CENTROIDS[bits], atol=2e-4)


@pytest.mark.parametrize("levels, mse", [(4, 0.1175), (8, 0.03455), (16, 0.0095)])
def test_lloyd_max_distortion_table(levels, mse):
    assert quants.lloyd_max_gaussian(levels)[1] == pytest.approx(mse, rel=2e-3)


@pytest.mark.parametrize("block, scale, bits", [(32, "f16", 0.5), (64, "f16", 0.25), (32, "log8", 0.25),
                                                (64, "sub4/16", 0.5), (128, "sub4/32", 0.25)])
def test_scale_overhead_table(block, scale, bits):
    assert blockq.scale_bits_per_value(block, scale) == bits


def test_generic_quantizer_matches_tqs_reference():
    x = gaussian(128, seed=5)
    cb = np.array(quants.turbo_ref.CENTROIDS[3], dtype=np.float32)
    a = blockq.roundtrip(x, cb, 64, "sub4/16", "lin0.6:1.2:7")
    b = formats.roundtrip(x, 3)
    assert quants.rel_mse(x, a) == pytest.approx(quants.rel_mse(x, b), rel=0.02)
