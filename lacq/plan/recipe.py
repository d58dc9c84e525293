"""Recipe files -> resolved quantization plans.

A recipe (recipes/NAME.toml) names a base type and ordered rules that give
some tensors another type:

    name = "first8_q8"
    description = "Blocks 0-7 at the high type, everything else at the base type."
    base = "{base}"

    [params]
    base = "q4_0"
    high = "q8_0"

    [[rules]]
    layers = "first:8"
    tensors = "*"
    type = "{high}"

A value "{p}" stands for parameter p; `resolve_recipe(..., overrides)` replaces
defaults (the CLI's `--set high=q6_k`). Within a recipe the first rule that
selects a tensor wins, as in llama-quantize.

Layer selectors pick block indices of the model: `all`, `first:N`, `last:N`,
`middle:N`, `boundary:N` (first N and last N), `even`, `odd`, and lists such
as `0,3,5-7`. N may be a percentage of the blocks (`first:10%`): rounded to
the nearest block, halves up, at least 1. `middle:N` starts at
(n_blocks - N) // 2, so an odd leftover block goes to the end side.

Tensor selectors (comma-separated): `attn` (attn_q/k/v/output, attn_qkv),
`ffn` (ffn_up/gate/down, their _exps/_shexp MoE forms), a group name such as
`attn_v` or `token_embd`, `*` (every quantizable tensor), or a glob on the
name after "blk.N." (`ffn_*`). With `layers` omitted a rule sees every tensor,
non-block ones (token_embd, output) included.

The plan emits one anchored, escaped pattern per tensor (`^blk\\.1\\.attn_q\\.weight$`)
because llama-quantize lowercases patterns and matches them unanchored, first
match wins. Types of tensors no rule touches are predicted by mirroring the
pinned tree's src/llama-quant.cpp (see `_default_type`).
"""

from __future__ import annotations

import fnmatch
import math
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf

from lacq import paths
from lacq.errors import RecipeError
from lacq.fsutil import canonical_hash
from lacq.model.info import ModelInfo, TensorInfo, tensor_nbytes

# Types llama-quantize can write; the integer and helper types are not weight types.
_NOT_WEIGHT_TYPES = {"I8", "I16", "I32", "I64", "F64", "Q8_1", "Q8_K"}
VALID_TYPES = tuple(t.name.lower() for t in gguf.GGMLQuantizationType if t.name not in _NOT_WEIGHT_TYPES)
_UNQUANTIZED = {"f32", "f16", "bf16"}

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

_PARAM_REF = re.compile(r"^\{([A-Za-z_][A-Za-z0-9_]*)\}$")
_RECIPE_KEYS = {"name", "description", "base", "params", "rules"}
_RULE_KEYS = {"layers", "tensors", "type"}
_ATTN_GROUPS = {"attn_q", "attn_k", "attn_v", "attn_output", "attn_qkv"}
_FFN_GROUP = re.compile(r"^ffn_(up|gate|down|gate_up)(_exps|_shexp|_chexps)?$")
_REGEX_SPECIAL = set(r"\.^$|?*+()[]{}")


@dataclass(frozen=True)
class Rule:
    tensors: str
    type: str
    layers: str | None = None


@dataclass(frozen=True)
class Recipe:
    name: str
    description: str
    base: str
    params: dict[str, str]
    rules: tuple[Rule, ...]
    source: str


@dataclass(frozen=True)
class TypeMismatch:
    name: str
    predicted: str
    actual: str


@dataclass(frozen=True)
class Plan:
    recipe: str
    params: dict[str, str]
    base_ftype: str  # llama-quantize's positional type argument, e.g. "Q4_0"
    rules: tuple[tuple[str, str], ...]  # (pattern, type) for --tensor-type-file, in order
    tensor_types: dict[str, str] = field(repr=False)  # predicted final type of every tensor
    predicted_bytes: int
    predicted_bpw: float
    plan_hash: str

    def tensor_type_file_text(self) -> str:
        return "".join(f"{pattern}={qtype}\n" for pattern, qtype in self.rules)

    def to_dict(self) -> dict[str, Any]:
        return {
            "recipe": self.recipe, "params": self.params, "base_ftype": self.base_ftype,
            "rules": [list(r) for r in self.rules], "tensor_types": self.tensor_types,
            "predicted_bytes": self.predicted_bytes, "predicted_bpw": self.predicted_bpw,
            "plan_hash": self.plan_hash,
        }


# --- loading ------------------------------------------------------------------

def list_recipes() -> list[str]:
    return sorted(p.stem for p in paths.recipes_dir().glob("*.toml"))


def load_recipe(name_or_path: str | Path) -> Recipe:
    text = str(name_or_path)
    path = Path(text)
    if not (text.endswith(".toml") or "/" in text or path.is_file()):
        path = paths.recipes_dir() / f"{text}.toml"
        if not path.is_file():
            raise RecipeError(f"unknown recipe '{text}'; available: {', '.join(list_recipes())}")
    if not path.is_file():
        raise RecipeError(f"{path}: no such recipe file")
    try:
        data = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise RecipeError(f"{path}: not valid TOML: {e}") from e
    return parse_recipe(data, source=str(path))


def parse_recipe(data: dict[str, Any], source: str = "<recipe>") -> Recipe:
    def fail(msg: str) -> RecipeError:
        return RecipeError(f"{source}: {msg}")

    if unknown := set(data) - _RECIPE_KEYS:
        raise fail(f"unknown key(s) {', '.join(sorted(unknown))}; allowed: {', '.join(sorted(_RECIPE_KEYS))}")
    for key in ("name", "description", "base"):
        if not isinstance(data.get(key), str):
            raise fail(f"'{key}' is required and must be a string")
    params = data.get("params", {})
    if not isinstance(params, dict) or not all(isinstance(v, str) for v in params.values()):
        raise fail("[params] must map names to strings")
    rules = []
    for i, raw in enumerate(data.get("rules", []), 1):
        if not isinstance(raw, dict):
            raise fail(f"rule {i} is not a table")
        if unknown := set(raw) - _RULE_KEYS:
            raise fail(f"rule {i}: unknown key(s) {', '.join(sorted(unknown))}; allowed: layers, tensors, type")
        for key in ("tensors", "type"):
            if not isinstance(raw.get(key), str):
                raise fail(f"rule {i}: '{key}' is required and must be a string")
        if "layers" in raw and not isinstance(raw["layers"], str):
            raise fail(f"rule {i}: 'layers' must be a string such as \"first:8\"")
        rules.append(Rule(tensors=raw["tensors"], type=raw["type"], layers=raw.get("layers")))
    recipe = Recipe(data["name"], data["description"], data["base"], dict(params), tuple(rules), source)
    for value in [recipe.base, *(r.type for r in rules)]:
        if (m := _PARAM_REF.match(value)) and m.group(1) not in params:
            raise fail(f"'{value}' refers to no parameter; defined: {', '.join(sorted(params)) or 'none'}")
    return recipe


# --- resolution -----------------------------------------------------------------

def resolve_recipe(recipe: Recipe, model: ModelInfo, overrides: dict[str, str] | None = None) -> Plan:
    params = dict(recipe.params)
    for key, value in (overrides or {}).items():
        if key not in params:
            raise RecipeError(f"recipe '{recipe.name}' has no parameter '{key}'; parameters: {', '.join(sorted(params)) or 'none'}")
        params[key] = value.strip().lower()

    def subst(value: str) -> str:
        m = _PARAM_REF.match(value)
        return (params[m.group(1)] if m else value).lower()

    base = subst(recipe.base)
    if base not in BASE_FTYPES:
        raise RecipeError(f"recipe '{recipe.name}': base type '{base}' not supported; use one of {', '.join(BASE_FTYPES)}")
    ftype = BASE_FTYPES[base]
    if FTYPE_DEFAULT_TYPE[ftype] in _UNQUANTIZED and recipe.rules:
        # llama-quantize applies --tensor-type only when the base type is quantized.
        raise RecipeError(f"recipe '{recipe.name}': rules have no effect with an unquantized base ({base})")

    candidates = [t for t in model.tensors if allows_quantization(t)]
    chosen: dict[str, str] = {}  # tensor name -> rule type; the first rule that selects a tensor wins
    for i, rule in enumerate(recipe.rules, 1):
        qtype = check_type(subst(rule.type), f"recipe '{recipe.name}' rule {i}")
        where = f"recipe '{recipe.name}' rule {i} (layers={rule.layers!r}, tensors={rule.tensors!r})"
        if rule.layers is None:
            pool = candidates
        else:
            blocks = set(select_layers(rule.layers, model.n_blocks, where))
            pool = [t for t in candidates if t.block in blocks]
        hits = [t for t in pool if tensor_selected(rule.tensors, t)]
        if not hits:
            raise RecipeError(f"{where} matches no quantizable tensor of this model")
        for t in hits:
            if t.name != t.name.lower():
                raise RecipeError(f"{where}: tensor '{t.name}' has upper-case letters; llama-quantize lowercases patterns, so no rule can name it")
            chosen.setdefault(t.name, qtype)

    ordered = sorted(model.tensors, key=_quantize_order)
    rules = tuple((f"^{_escape(t.name)}$", chosen[t.name]) for t in ordered if t.name in chosen)
    tensor_types = _predict_types(model, ftype, chosen, ordered)
    n_bytes = sum(tensor_nbytes(tensor_types[t.name], t.n_elements) for t in model.tensors)
    n_el = sum(t.n_elements for t in model.tensors)
    return Plan(
        recipe=recipe.name,
        params=params,
        base_ftype=ftype,
        rules=rules,
        tensor_types=tensor_types,
        predicted_bytes=n_bytes,
        predicted_bpw=round(8 * n_bytes / n_el, 4) if n_el else 0.0,
        plan_hash=canonical_hash({"base_ftype": ftype, "rules": [list(r) for r in rules]}),
    )


def compare_with_dry_run(plan: Plan, actual: dict[str, str]) -> list[TypeMismatch]:
    """Tensors whose type in `llama-quantize --dry-run` differs from the plan's prediction."""
    out = []
    for name in sorted(set(plan.tensor_types) | set(actual)):
        predicted = plan.tensor_types.get(name, "missing").lower()
        got = actual.get(name, "missing").lower()
        if predicted != got:
            out.append(TypeMismatch(name, predicted, got))
    return out


def check_type(name: str, where: str) -> str:
    if name.lower() not in VALID_TYPES:
        raise RecipeError(f"{where}: unknown type '{name}'; valid types: {', '.join(VALID_TYPES)}")
    return name.lower()


# --- selectors ------------------------------------------------------------------

def select_layers(selector: str, n_blocks: int, where: str = "layer selector") -> list[int]:
    """Block indices picked by a layer selector (see the module docstring)."""
    sel = selector.strip().lower()

    def count(arg: str) -> int:
        try:
            n = max(1, math.floor(float(arg[:-1]) * n_blocks / 100 + 0.5)) if arg.endswith("%") else int(arg)
        except ValueError:
            raise RecipeError(f"{where}: '{selector}': '{arg}' is not a count or a percentage") from None
        if n < 1 or n > n_blocks:
            raise RecipeError(f"{where}: '{selector}' asks for {n} blocks; the model has {n_blocks}")
        return n

    if sel == "all":
        return list(range(n_blocks))
    if sel in ("even", "odd"):
        return list(range(0 if sel == "even" else 1, n_blocks, 2))
    kind, _, arg = sel.partition(":")
    if arg:
        if kind == "first":
            return list(range(count(arg)))
        if kind == "last":
            return list(range(n_blocks - count(arg), n_blocks))
        if kind == "middle":
            n = count(arg)
            start = (n_blocks - n) // 2
            return list(range(start, start + n))
        if kind == "boundary":
            n = count(arg)
            return sorted(set(range(n)) | set(range(n_blocks - n, n_blocks)))
        raise RecipeError(f"{where}: unknown layer selector '{selector}'; use all, first:N, last:N, middle:N, boundary:N, even, odd or a list like 0,3,5-7")
    blocks: set[int] = set()
    for part in sel.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if not m:
            raise RecipeError(f"{where}: unknown layer selector '{selector}'; use all, first:N, last:N, middle:N, boundary:N, even, odd or a list like 0,3,5-7")
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        if hi < lo:
            raise RecipeError(f"{where}: '{part.strip()}' is an empty range")
        if hi >= n_blocks:
            raise RecipeError(f"{where}: layer {hi} is beyond the model (blocks 0-{n_blocks - 1})")
        blocks.update(range(lo, hi + 1))
    return sorted(blocks)


def tensor_selected(selector: str, t: TensorInfo) -> bool:
    rest = t.name.split(".", 2)[2] if t.block is not None else t.name
    for item in (s.strip().lower() for s in selector.split(",")):
        if item == "*":
            return True
        if item == "attn" and t.group in _ATTN_GROUPS:
            return True
        if item == "ffn" and _FFN_GROUP.match(t.group):
            return True
        if item == t.group:
            return True
        if any(c in item for c in "*?[") and (fnmatch.fnmatchcase(t.group, item) or fnmatch.fnmatchcase(rest, item)):
            return True
    return False


def _escape(name: str) -> str:
    # Backslash only before punctuation: an escaped letter could turn into a class.
    return "".join("\\" + c if c in _REGEX_SPECIAL else c for c in name)


# --- what llama-quantize does with tensors no rule names (src/llama-quant.cpp) ----

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


def _quantize_order(t: TensorInfo) -> tuple[int, str]:
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


def _predict_types(model: ModelInfo, ftype: str, chosen: dict[str, str], ordered: list[TensorInfo]) -> dict[str, str]:
    default = FTYPE_DEFAULT_TYPE[ftype]
    state = _QuantState(model, ftype)
    out = {}
    for t in ordered:
        if not allows_quantization(t):
            out[t.name] = t.type
        elif default in _UNQUANTIZED:
            out[t.name] = default
        elif t.name in chosen:  # a manual override skips the ftype's own mix
            out[t.name] = _fallback(t, chosen[t.name])
        else:
            out[t.name] = _fallback(t, state.default_type(t, default))
    return {t.name: out[t.name] for t in model.tensors}


class _QuantState:
    """The part of llama_tensor_get_type_impl() the accepted base ftypes reach.

    Assumes no imatrix, no --output-tensor-type/--token-embedding-type, and not
    the LLM_TYPE_70B attn_v bump; the lead's --dry-run check reports any gap.
    """

    def __init__(self, model: ModelInfo, ftype: str):
        self.model, self.ftype = model, ftype
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
        if f in ("IQ4_NL", "IQ4_XS") and i < n // 8:
            return "q5_k"
        if f == "Q5_K_M" and _use_more_bits(i, n):
            return "q6_k"
        if f == "Q4_K_S" and not self.falcon and i < n // 8:
            return "q5_k"
        return new


def _attn_v_like(name: str) -> bool:
    return any(s in name for s in ("attn_v.weight", "attn_qkv.weight", "attn_kv_b.weight"))


def _use_more_bits(i: int, n: int) -> bool:
    # C integer division; i and n are non-negative so // matches
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2
