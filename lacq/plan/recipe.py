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
match wins. Types of tensors no rule touches are predicted by `llama_quant`,
the mirror of the pinned tree's src/llama-quant.cpp.
"""

from __future__ import annotations

import fnmatch
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf

from lacq import paths
from lacq.errors import RecipeError
from lacq.fsutil import canonical_hash
from lacq.model.info import FLOAT_TYPES, ModelInfo, TensorInfo, tensor_nbytes
from lacq.plan.files import find_file, list_names, load_toml, substitute, undefined_refs, with_overrides
from lacq.plan.llama_quant import (
    BASE_FTYPES,
    FTYPE_DEFAULT_TYPE,
    allows_quantization,
    predict_types,
    quantize_order,
    requires_imatrix,
)

# Types llama-quantize can write; the integer and helper types are not weight types.
_NOT_WEIGHT_TYPES = {"I8", "I16", "I32", "I64", "F64", "Q8_1", "Q8_K"}
VALID_TYPES = tuple(t.name.lower() for t in gguf.GGMLQuantizationType if t.name not in _NOT_WEIGHT_TYPES)

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
    imatrix: bool = False  # predicted for llama-quantize run with --imatrix
    needs_imatrix: tuple[str, ...] = ()  # tensors whose type llama-quantize writes only with an imatrix

    def quantized_tensors(self) -> list[str]:
        """Tensors the plan gives a quantized (not float) type."""
        return [n for n, t in self.tensor_types.items() if t not in FLOAT_TYPES]

    def tensor_type_file_text(self) -> str:
        return "".join(f"{pattern}={qtype}\n" for pattern, qtype in self.rules)

    def to_dict(self) -> dict[str, Any]:
        return {
            "recipe": self.recipe, "params": self.params, "base_ftype": self.base_ftype,
            "rules": [list(r) for r in self.rules], "tensor_types": self.tensor_types,
            "predicted_bytes": self.predicted_bytes, "predicted_bpw": self.predicted_bpw,
            "plan_hash": self.plan_hash, "imatrix": self.imatrix,
        }


# --- loading ------------------------------------------------------------------

def list_recipes() -> list[str]:
    return list_names(paths.recipes_dir())


def load_recipe(name_or_path: str | Path) -> Recipe:
    path = find_file(name_or_path, paths.recipes_dir(), "recipe")
    return parse_recipe(load_toml(path), source=str(path))


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
    for value in undefined_refs([recipe.base, *(r.type for r in rules)], params):
        raise fail(f"'{value}' refers to no parameter; defined: {', '.join(sorted(params)) or 'none'}")
    return recipe


# --- resolution -----------------------------------------------------------------

def resolve_recipe(recipe: Recipe, model: ModelInfo, overrides: dict[str, str] | None = None, *,
                   imatrix: bool = False) -> Plan:
    """The recipe's plan for `model`; `imatrix`: predicted for a run with --imatrix (some mixes differ)."""
    params = with_overrides(recipe.params, overrides, f"recipe '{recipe.name}'")
    base = substitute(recipe.base, params)
    if base not in BASE_FTYPES:
        raise RecipeError(f"recipe '{recipe.name}': base type '{base}' not supported; use one of {', '.join(BASE_FTYPES)}")
    ftype = BASE_FTYPES[base]
    if FTYPE_DEFAULT_TYPE[ftype] in FLOAT_TYPES and recipe.rules:
        # llama-quantize applies --tensor-type only when the base type is quantized.
        raise RecipeError(f"recipe '{recipe.name}': rules have no effect with an unquantized base ({base})")

    candidates = [t for t in model.tensors if allows_quantization(t)]
    chosen: dict[str, str] = {}  # tensor name -> rule type; the first rule that selects a tensor wins
    for i, rule in enumerate(recipe.rules, 1):
        qtype = check_weight_type(substitute(rule.type, params), f"recipe '{recipe.name}' rule {i}")
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

    ordered = sorted(model.tensors, key=quantize_order)
    rules = tuple((f"^{_escape(t.name)}$", chosen[t.name]) for t in ordered if t.name in chosen)
    tensor_types = predict_types(model, ftype, chosen, ordered, imatrix)
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
        # With an imatrix the same rules make another file: its own hash (plans without one keep theirs).
        plan_hash=canonical_hash({"base_ftype": ftype, "rules": [list(r) for r in rules],
                                  **({"imatrix": True} if imatrix else {})}),
        imatrix=imatrix,
        needs_imatrix=tuple(t.name for t in ordered if allows_quantization(t)
                            and requires_imatrix(t.name, tensor_types[t.name], ftype)),
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


def check_weight_type(name: str, where: str) -> str:
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
