"""lacq.plan.kv.turbo_ref against the patched libggml's turbo quantizer, bit for bit.

Uses libggml-base of lacq's CPU build of the patched tree (the e2e build
fixture); LACQ_GGML_BASE_LIB points it at another library.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

import numpy as np
import pytest
from ggml_ctypes import load_ggml_base, type_traits

from lacq.plan.kv import turbo_ref as turbo_ref

TYPE_IDS = {"turbo2": 43, "turbo3": 44, "turbo4": 45}


TO_FLOAT = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.POINTER(ctypes.c_float), ctypes.c_int64)


@pytest.fixture(scope="module")
def ggml(cpu_build):
    """libggml-base of lacq's CPU build of the patched tree (LACQ_GGML_BASE_LIB overrides)."""
    return load_ggml_base(Path(os.environ.get("LACQ_GGML_BASE_LIB") or cpu_build.bin_dir / "libggml-base.so"))


def _data(rng, nrows, ncols):
    x = rng.standard_normal((nrows, ncols)).astype(np.float32)
    x[0, :32] = 0.0                                       # all-zero block
    x[1, :32] = np.float32(3.0)                           # constant block
    x[2, :] *= np.float32(1e-3)                           # small scale
    x[3, :32] = np.linspace(-2, 2, 32, dtype=np.float32)  # values on a grid
    x[4, :] = rng.uniform(-1, 1, ncols).astype(np.float32) * np.float32(40.0)
    x[5, 3], x[5, 40], x[5, 64:80] = np.inf, np.nan, -np.inf   # non-finite blocks: stored as zeros
    x[6, :] *= np.float32(1e5)                            # scales above the largest fp16: stored as 65504
    x[7, :] *= np.float32(1e30)
    x[8, :32] = rng.uniform(-3e38, 3e38, 32).astype(np.float32)
    return x


@pytest.mark.parametrize("name", sorted(TYPE_IDS))
@pytest.mark.e2e
def test_quantize_matches_ggml(ggml, name):
    bits = turbo_ref.TYPE_BITS[name]
    tid = TYPE_IDS[name]
    tt = type_traits(ggml, name, tid)
    assert tt.blck_size == 32
    assert tt.type_size == turbo_ref.BLOCK_BYTES[bits]
    assert tt.is_quantized

    rng = np.random.default_rng(1234 + bits)
    nrows, ncols = 64, 256
    x = _data(rng, nrows, ncols)
    out = ctypes.create_string_buffer(nrows * ncols // 32 * tt.type_size)
    n = ggml.ggml_quantize_chunk(tid, x.ctypes.data, out, 0, nrows, ncols, None)
    assert n == len(out.raw)

    ref = turbo_ref.quantize(x, bits)
    got = out.raw
    assert got == ref

    y = np.zeros(nrows * ncols, dtype=np.float32)
    TO_FLOAT(tt.to_float)(out, y.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), nrows * ncols)
    np.testing.assert_array_equal(y, turbo_ref.dequantize(ref, bits))
    assert not np.any(y[:32])                             # all-zero block stays zero
    assert not np.any(y[5 * ncols:5 * ncols + 96])        # so do the blocks holding inf or NaN
    assert np.all(np.isfinite(y))


def test_reference_mse_on_gaussian():
    x = np.random.default_rng(0).standard_normal((2000, 32)).astype(np.float32)
    expected = {2: 0.106, 3: 0.0259, 4: 0.0059}
    for bits, mse in expected.items():
        y = turbo_ref.dequantize(turbo_ref.quantize(x, bits), bits).reshape(x.shape)
        rel = float(((x - y) ** 2).sum() / (x ** 2).sum())
        assert abs(rel - mse) < 0.1 * mse, (bits, rel)
        assert turbo_ref.bits_per_value(bits) == bits + 0.5


def test_non_finite_blocks_are_zeros_and_large_scales_stop_at_the_largest_fp16():
    """As the C quantizers (issue 19, item 6): no NaN/inf scale, no index from a non-finite value."""
    x = np.ones((3, 32), dtype=np.float32)
    x[0, 3], x[1, 30] = np.nan, -np.inf
    x[2] *= np.float32(1e30)
    for bits in (2, 3, 4):
        with np.errstate(over="ignore", invalid="ignore"):
            d, idx = turbo_ref.quantize_indices(x, bits)
        assert list(d[:2]) == [0, 0] and not idx[:2].any()
        assert d[2] == np.float32(65504)
