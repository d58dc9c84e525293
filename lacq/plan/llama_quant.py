"""The mirror of the pinned llama.cpp's src/llama-quant.cpp: which type each tensor gets.

lacq predicts every tensor's final type from a recipe's rules without running
llama-quantize, then checks the prediction against `--dry-run`. This is the one
file to update when the pin moves: keep it equal to the C code it names.
"""

from __future__ import annotations

import gguf

from lacq.model.info import FLOAT_TYPES, ModelInfo, TensorInfo

# Base type accepted in recipes -> llama-quantize ftype argument. A bare k-quant
# type means llama-quantize's own alias (Q4_K is Q4_K_M); the mixes can be named.
BASE_FTYPES = {
    "q4_0": "Q4_0", "q4_1": "Q4_1", "q5_0": "Q5_0", "q5_1": "Q5_1", "q8_0": "Q8_0",
    "q2_k": "Q2_K", "q2_k_s": "Q2_K_S", "q3_k": "Q3_K_M", "q3_k_s": "Q3_K_S",
    "q3_k_m": "Q3_K_M", "q3_k_l": "Q3_K_L", "q4_k": "Q4_K_M", "q4_k_s": "Q4_K_S",
    "q4_k_m": "Q4_K_M", "q5_k": "Q5_K_M", "q5_k_s": "Q5_K_S", "q5_k_m": "Q5_K_M",
    "q6_k": "Q6_K", "iq4_nl": "IQ4_NL", "iq4_xs": "IQ4_XS",
    "f16": "F16", "bf16": "BF16", "f32": "F32",
}
# llama_ftype_get_default_type() for those ftypes
FTYPE_DEFAULT_TYPE = {
    "Q4_0": "q4_0", "Q4_1": "q4_1", "Q5_0": "q5_0", "Q5_1": "q5_1", "Q8_0": "q8_0",
    "Q2_K": "q2_k", "Q2_K_S": "q2_k", "Q3_K_S": "q3_k", "Q3_K_M": "q3_k", "Q3_K_L": "q3_k",
    "Q4_K_S": "q4_k", "Q4_K_M": "q4_k", "Q5_K_S": "q5_k", "Q5_K_M": "q5_k", "Q6_K": "q6_k",
    "IQ4_NL": "iq4_nl", "IQ4_XS": "iq4_xs", "F16": "f16", "BF16": "bf16", "F32": "f32",
}


# tensor_allows_quantization(): name fragments that are never quantized
_NEVER_QUANTIZED = (
    "_norm.weight", "ffn_gate_inp.weight", "ffn_gate_tid2eid.weight", "altup", "laurel",
    "per_layer_model_proj", "ssm_conv1d", "shortconv.conv.weight", "indexer.k_proj.weight",
    "indexer.q_proj.weight", "time_mix_first.weight", "time_mix_w0.weight", "time_mix_w1.weight",
    "time_mix_w2.weight", "time_mix_v0.weight", "time_mix_v1.weight", "time_mix_v2.weight",
    "time_mix_a0.weight", "time_mix_a1.weight", "time_mix_a2.weight", "time_mix_g1.weight",
    "time_mix_g2.weight", "time_mix_decay_w1.weight", "time_mix_decay_w2.weight",
    "time_mix_lerp_fused.weight", "attn_rel_b.weight", ".position_embd", "sam.pos_embd",
    "sam.neck.", "sam.net_", ".rel_pos", ".patch_embd", ".patch_merger", "a.rvq.codebook",
    "mm.a.code_embd",
)


def allows_quantization(t: TensorInfo) -> bool:
    """Mirror of tensor_allows_quantization(): 2-D/3-D '*weight' tensors, minus a deny list."""
    return (
        len(t.shape) >= 2
        and t.name.endswith("weight")
        and t.name not in ("position_embd.weight", "token_types.weight")
        and not any(frag in t.name for frag in _NEVER_QUANTIZED)
    )


def quantize_order(t: TensorInfo) -> tuple[int, str]:
    # llama_model_loader's weight_name_comparer: block index (-1 outside blocks), then name
    return (-1 if t.block is None else t.block, t.name)


def _block_size(qtype: str) -> int:
    return gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype.upper()]][0]


_FALLBACK = {
    "iq1_s": "iq4_nl", "iq1_m": "iq4_nl", "iq2_xxs": "iq4_nl", "iq2_xs": "iq4_nl", "iq2_s": "iq4_nl",
    "iq3_xxs": "iq4_nl", "iq3_s": "iq4_nl", "iq4_xs": "iq4_nl", "q2_k": "q4_0", "q3_k": "q4_0",
    "tq1_0": "q4_0", "tq2_0": "q4_0", "q4_k": "q5_0", "q5_k": "q5_1", "q6_k": "q8_0",
}


def _fallback(t: TensorInfo, qtype: str) -> str:
    """tensor_type_fallback(): rows that do not split into the type's blocks get another type."""
    ncols = t.shape[0]
    if ncols % _block_size(qtype) == 0:
        return qtype
    qtype = _FALLBACK.get(qtype, qtype)
    return qtype if ncols % _block_size(qtype) == 0 else "f16"


# tensor_requires_imatrix(): types llama-quantize refuses to write without importance data
# (q2_k too, but only in a Q2_K_S file); the token embedding and the output matrix are exempt.
_NEED_IMATRIX = frozenset({"iq3_xxs", "iq2_xxs", "iq2_xs", "iq2_s", "iq1_m", "iq1_s"})


def requires_imatrix(name: str, qtype: str, ftype: str) -> bool:
    """Mirror of tensor_requires_imatrix(): would llama-quantize refuse this tensor's type without an imatrix?"""
    if name in ("token_embd.weight", "per_layer_token_embd.weight", "output.weight"):
        return False
    return qtype in _NEED_IMATRIX or (qtype == "q2_k" and ftype == "Q2_K_S")


def predict_types(model: ModelInfo, ftype: str, chosen: dict[str, str], ordered: list[TensorInfo],
                  imatrix: bool = False) -> dict[str, str]:
    """Every tensor's final type; `imatrix`: llama-quantize runs with --imatrix (some mixes then differ)."""
    default = FTYPE_DEFAULT_TYPE[ftype]
    state = _QuantState(model, ftype, imatrix)
    out = {}
    for t in ordered:
        if not allows_quantization(t):
            out[t.name] = t.type
        elif default in FLOAT_TYPES:
            out[t.name] = default
        elif t.name in chosen:  # a manual override skips the ftype's own mix
            out[t.name] = _fallback(t, chosen[t.name])
        else:
            out[t.name] = _fallback(t, state.default_type(t, default))
    return {t.name: out[t.name] for t in model.tensors}


class _QuantState:
    """The part of llama_tensor_get_type_impl() the accepted base ftypes reach.

    Assumes no --output-tensor-type/--token-embedding-type, and not the LLM_TYPE_70B
    attn_v bump; quantize_with_plan's --dry-run check reports any gap. `imatrix` is
    qs.has_imatrix: it changes ffn_down's type in IQ4_NL/IQ4_XS and Q4_0/Q5_0 files
    (the IQ3_XXS rules it also touches belong to ftypes lacq does not accept).
    """

    def __init__(self, model: ModelInfo, ftype: str, imatrix: bool = False):
        self.model, self.ftype, self.imatrix = model, ftype, imatrix
        names = {t.name for t in model.tensors}
        self.tied = "output.weight" not in names
        self.falcon = model.architecture == "falcon"
        self.n_expert = model.n_expert
        head = model.n_head[0] if isinstance(model.n_head, tuple) else model.n_head
        head_kv = model.n_head_kv[0] if isinstance(model.n_head_kv, tuple) else model.n_head_kv
        self.n_gqa = head // head_kv if head_kv else 0
        self.n_attn_v = sum(1 for t in model.tensors if _attn_v_like(t.name))
        self.i_attn_v = 0
        self.i_ffn_down = 0

    def default_type(self, t: TensorInfo, new: str) -> str:
        f, name = self.ftype, t.name
        if name == "output.weight" or (self.tied and name in ("token_embd.weight", "per_layer_token_embd.weight")):
            if self.falcon or t.shape[0] % _block_size(new) != 0:
                return "q8_0"
            return new if new == "q8_0" else "q6_k"
        if name in ("token_embd.weight", "per_layer_token_embd.weight"):
            return new
        if _attn_v_like(name):
            i, n = self.i_attn_v, self.n_attn_v
            self.i_attn_v += 1
            if self.n_expert == 8:
                return "q8_0"
            if f == "Q2_K":
                return "q4_k" if self.n_gqa >= 4 else "q3_k"
            if f == "Q2_K_S" and self.n_gqa >= 4:
                return "q4_k"
            if f == "Q3_K_M":
                return "q5_k" if i < 2 else "q4_k"
            if f == "Q3_K_L":
                return "q5_k"
            if f in ("IQ4_NL", "IQ4_XS") and self.n_gqa >= 4:
                return "q5_k"
            if f in ("Q4_K_M", "Q5_K_M") and _use_more_bits(i, n):
                return "q6_k"
            if f == "Q4_K_S" and i < 4:
                return "q5_k"
            return new
        if "attn_k.weight" in name:
            return "q8_0" if self.n_expert == 8 else new
        if "ffn_down" in name:
            i = self.i_ffn_down if self.n_expert <= 1 else (t.block or 0)
            n = self.model.n_blocks
            self.i_ffn_down += 1
            return self._ffn_down(new, i, n)
        if "attn_output.weight" in name:
            if self.falcon:
                return "q4_k" if f == "Q3_K_L" else new
            if self.n_expert == 8:
                five = {"Q2_K", "Q3_K_S", "Q3_K_M", "IQ4_NL", "Q4_K_S", "Q4_K_M", "IQ4_XS"}
                return "q5_k" if f in five else new
            return {"Q2_K": "q3_k", "Q3_K_M": "q4_k", "Q3_K_L": "q5_k"}.get(f, new)
        return new

    def _ffn_down(self, new: str, i: int, n: int) -> str:
        f = self.ftype
        if f == "Q2_K":
            return "q3_k"
        if f == "Q2_K_S":
            return "q4_k" if i < n // 8 else new
        if f == "Q3_K_M":
            if i < n // 16:
                return "q5_k"
            return "q4_k" if not self.falcon or _use_more_bits(i, n) else "q3_k"
        if f == "Q3_K_L":
            return "q4_k" if self.falcon else "q5_k"
        if f == "Q4_K_M":
            if self.falcon:
                return "q6_k" if i < n // 16 else "q5_k" if _use_more_bits(i, n) else "q4_k"
            return "q6_k" if _use_more_bits(i, n) else new
        if f in ("IQ4_NL", "IQ4_XS"):
            return "q5_k" if i < n // 8 and not self.imatrix else new
        if f == "Q5_K_M" and _use_more_bits(i, n):
            return "q6_k"
        if f == "Q4_K_S" and not self.falcon and i < n // 8:
            return "q5_k"
        if f in ("Q4_0", "Q5_0") and self.imatrix and i < n // 8:
            # "Guard against craziness in the first few ffn_down layers" (only with an imatrix, upstream's words)
            return "q4_1" if f == "Q4_0" else "q5_1"
        return new


def _attn_v_like(name: str) -> bool:
    return any(s in name for s in ("attn_v.weight", "attn_qkv.weight", "attn_kv_b.weight"))


def _use_more_bits(i: int, n: int) -> bool:
    # C integer division; i and n are non-negative so // matches
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2
