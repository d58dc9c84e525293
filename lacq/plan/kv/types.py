"""KV-cache types lacq can ask for, and their storage cost.

Stock types take their block geometry from the gguf package. Types that
lacq's patches add live here, mirroring the C definitions named beside them;
keep the two equal.
"""

from __future__ import annotations

from dataclasses import dataclass

import gguf

from lacq.model.info import FLOAT_TYPES


@dataclass(frozen=True)
class KvType:
    name: str
    block_size: int
    type_size: int  # bytes per block

    @property
    def bits_per_value(self) -> float:
        return self.type_size * 8 / self.block_size

    @property
    def quantized(self) -> bool:
        return self.name not in FLOAT_TYPES


def _stock(name: str) -> KvType:
    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[name.upper()]]
    return KvType(name, block, size)


# The -ctk/-ctv list of the pinned common/arg.cpp (kv_cache_types), plus q2_0
# from patch 0001.
STOCK = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "iq4_nl", "q5_0", "q5_1")
KV_TYPES: dict[str, KvType] = {n: _stock(n) for n in STOCK}
# ggml-common.h block_q2_0: fp16 scale + 64 2-bit values (gguf 0.19 lacks it).
KV_TYPES["q2_0"] = KvType("q2_0", 64, 18)


def kv_type(name: str) -> KvType:
    key = name.lower()
    if key not in KV_TYPES:
        raise KeyError(name)
    return KV_TYPES[key]


def valid_names() -> str:
    return ", ".join(KV_TYPES)


# ggml-common.h block_turbo2/3/4 of patch 0004 (core; CUDA and Metal in their own patches): fp16 scale + 32 codebook
# indices of 2, 3 or 4 bits (KV-only types; they never reach a GGUF file).
KV_TYPES["turbo2"] = KvType("turbo2", 32, 10)
KV_TYPES["turbo3"] = KvType("turbo3", 32, 14)
KV_TYPES["turbo4"] = KvType("turbo4", 32, 18)
TURBO = ("turbo2", "turbo3", "turbo4")

# ggml-common.h block_tqs2/3/4 of patch 0008 (core and CPU; CUDA in patch 0012, no Metal): 64 values, fp16 super-scale,
# four 4-bit sub-scales (one per 16 values) and 2-, 3- or 4-bit indices into turbo's codebooks
# (KV-only types; numpy mirror in tqs_ref.py).
KV_TYPES["tqs2"] = KvType("tqs2", 64, 20)
KV_TYPES["tqs3"] = KvType("tqs3", 64, 28)
KV_TYPES["tqs4"] = KvType("tqs4", 64, 36)
TQS = ("tqs2", "tqs3", "tqs4")

# ggml-common.h block_tql2/3 of patch 0013 (core and CPU; CUDA in patch 0014, no Metal): tqs2/tqs3's block with a
# 2-bit scale exponent per 8 values instead of a 4-bit sub-scale per 16; block_tql4 of patch 0015 (CUDA in 0016):
# tqs4's block, exponents chosen by squared error (numpy mirror of all three in tql_ref.py).
KV_TYPES["tql2"] = KvType("tql2", 64, 20)
KV_TYPES["tql3"] = KvType("tql3", 64, 28)
KV_TYPES["tql4"] = KvType("tql4", 64, 36)
TQL = ("tql2", "tql3", "tql4")
# tqs and tql share their CUDA flash-attention pairing and their missing Metal kernels
SUBSCALED = TQS + TQL
# KV types whose codebook assumes rotated rows: head size a multiple of 64, flash attention
ROTATED = TURBO + SUBSCALED


# KV types a backend of the pinned tree cannot run in flash attention (which a
# quantized V cache needs), with the reason shown to the user.
UNSUPPORTED: dict[tuple[str, str], str] = {
    ("q2_0", "cuda"): "the pinned tree's CUDA flash-attention kernels have no q2_0 variant",
    ("q2_0", "metal"): "the pinned tree's Metal flash-attention kernels have no q2_0 variant",
}
UNSUPPORTED.update({(t, "metal"): f"patches {patches} add {t} to the CPU and CUDA backends only; its Metal kernels "
                    "are not written" for family, patches in ((TQS, "0008 and 0012"), (TQL, "0013-0016"))
                    for t in family})


def backend_problem(name: str, backend: str) -> str | None:
    return UNSUPPORTED.get((name.lower(), backend))


# The K/V pairs CUDA's flash attention has kernels for in lacq's build (GGML_CUDA_FA_QUANTS at its default,
# extended by patches 0005 and 0009 in ggml/cmake/common.cmake; its configure step prints the list): the stock
# same-type pairs, and every pair of a turbo type with q8_0, f16 or a turbo type, in either order. Other pairs
# run, but ggml-cuda converts the layer's whole K and V to f16 at every call (fattn.cu: "converting K and V to
# f16 instead (slow)"). A tqs or tql type has kernels with q8_0 or f16 on either side and with itself (patches 0012,
# 0014, 0016 for it as V, 0017 for it as K: the boundary layers of a tqs/tql K policy).
CUDA_FA_SAME = ("f16", "q4_0", "q8_0", "bf16")
CUDA_FA_TURBO_PARTNERS = ("q8_0", "f16", *TURBO)


def cuda_fa_pair(k: str, v: str) -> bool:
    if v in SUBSCALED or k in SUBSCALED:
        return k == v or (v in SUBSCALED and k in ("q8_0", "f16")) or (k in SUBSCALED and v in ("q8_0", "f16"))
    if k in TURBO or v in TURBO:
        return k in CUDA_FA_TURBO_PARTNERS and v in CUDA_FA_TURBO_PARTNERS
    return k == v and k in CUDA_FA_SAME


def pair_problem(k: str, v: str, backend: str) -> str | None:
    """Problems of a K/V type pair (flash attention dispatches on both)."""
    if backend == "metal" and (k in TURBO or v in TURBO) and k != v:
        return "the patch's Metal flash attention runs turbo types only with K and V of the same type"
    return None
