"""The recommended KV layouts tqs2 / tqs3 / tqs4 ("turbo with sub-scales"), for the research scripts.

The reference itself now lives in lacq.plan.kv.tqs_ref, bit for bit equal to the patched ggml
(patch 0008; tests/test_tqs_ref.py). Layout and quantizer: see that module's docstring.

Measured on real rotated K/V rows (bench/kvformats/README.md): at the same bits/value as
turbo2/3/4 (2.5 / 3.5 / 4.5), relative MSE is 10 / 17 / 13 % lower, and the write path does 8
passes over each value instead of 13. (Those figures were taken with sequential float64 sums;
the shipped reference adds the 16 products of a sub-block pairwise, which changes a choice only
on near-ties.)
"""

from __future__ import annotations

from lacq.plan.kv.tqs_ref import (  # noqa: F401
    BLOCK_BYTES,
    QK,
    SCALE_MULTS,
    SUB,
    SUB_BITS,
    TYPES,
    bits_per_value,
    dequantize,
    pack,
    quantize,
    quantize_fields,
    roundtrip,
    sub_scales,
)
