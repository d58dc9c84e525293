"""KV-cache configurations: default types, per-layer policies by KV-layer
ordinal, and how they reach the patched llama.cpp.

The patch (patches/, "per-layer K/V types by KV-layer ordinal") reads
LLAMA_KV_TYPES_K / LLAMA_KV_TYPES_V: comma-separated `ORDS=TYPE` items where
ORDS is `3`, `-1` (from the end) or an inclusive range `A..B`, and `*=TYPE`
sets the default. Later items win.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from lacq.errors import RecipeError
from lacq.model.info import ModelInfo
from lacq.plan.kv.cells import layer_values
from lacq.plan.kv.types import ROTATED, backend_problem, cuda_fa_pair, kv_type, pair_problem, valid_names

ENV_K = "LLAMA_KV_TYPES_K"
ENV_V = "LLAMA_KV_TYPES_V"
_RANGE = re.compile(r"^(-?\d+)(?:\.\.(-?\d+))?$")


@dataclass(frozen=True)
class Override:
    start: int  # inclusive; negative counts from the end (-1 = last KV layer)
    end: int
    type: str

    def spec(self) -> str:
        where = str(self.start) if self.start == self.end else f"{self.start}..{self.end}"
        return f"{where}={self.type}"

    def ordinals(self, n_kv: int) -> range:
        lo = self.start + n_kv if self.start < 0 else self.start
        hi = self.end + n_kv if self.end < 0 else self.end
        for value, raw in ((lo, self.start), (hi, self.end)):
            if not 0 <= value < n_kv:
                raise RecipeError(f"KV-layer ordinal {raw} is out of range: this model has {n_kv} KV layers "
                                  f"(valid ordinals 0..{n_kv - 1}, or -{n_kv}..-1 from the end)")
        if lo > hi:
            raise RecipeError(f"KV-layer range {self.start}..{self.end} is empty on a model with {n_kv} KV layers")
        return range(lo, hi + 1)


def check_kv_type(name: str, what: str = "KV cache type") -> str:
    try:
        return kv_type(name).name
    except KeyError:
        raise RecipeError(f"unknown {what} {name!r}; valid types: {valid_names()}") from None


def parse_overrides(text: str) -> tuple[Override, ...]:
    """Parse `0..1=q8_0,-2..-1=q8_0` (the patch's syntax) into overrides."""
    out = []
    for item in filter(None, (p.strip() for p in text.split(","))):
        where, sep, typ = item.partition("=")
        m = _RANGE.match(where.strip())
        if not sep or not m:
            raise RecipeError(f"bad KV layer override {item!r}; expected ORD=TYPE or A..B=TYPE, e.g. 0..1=q8_0")
        start = int(m.group(1))
        end = int(m.group(2)) if m.group(2) is not None else start
        out.append(Override(start, end, check_kv_type(typ.strip())))
    return tuple(out)


def boundary(n: int, type_name: str) -> tuple[Override, ...]:
    """The first n and last n KV layers (by ordinal) at `type_name`."""
    if n < 1:
        raise RecipeError(f"--boundary must be at least 1, got {n}")
    return (Override(0, n - 1, type_name), Override(-n, -1, type_name))


@dataclass(frozen=True)
class KvConfig:
    """Everything that decides the KV cache of a run."""

    k: str = "f16"
    v: str = "f16"
    flash_attn: str = "auto"  # on | off | auto
    k_overrides: tuple[Override, ...] = ()
    v_overrides: tuple[Override, ...] = ()
    policy_name: str | None = None

    def __post_init__(self):
        check_kv_type(self.k)
        check_kv_type(self.v)
        if self.flash_attn not in ("on", "off", "auto"):
            raise RecipeError(f"flash attention must be on, off or auto, got {self.flash_attn!r}")

    def all_types(self) -> tuple[set[str], set[str]]:
        return ({self.k} | {o.type for o in self.k_overrides}, {self.v} | {o.type for o in self.v_overrides})

    def needs_flash_attention(self) -> list[str]:
        """Types that need flash attention: any quantized V, and turbo/tqs/tql K (their
        kernels exist only in the flash-attention path)."""
        ktypes, vtypes = self.all_types()
        return sorted({t for t in vtypes if kv_type(t).quantized} | {t for t in ktypes if t in ROTATED})

    def with_fa_resolved(self) -> "KvConfig":
        """Switch flash attention on where the types need it; refuse an explicit `off`."""
        need = self.needs_flash_attention()
        if not need or self.flash_attn == "on":
            return self
        if self.flash_attn == "off":
            raise RecipeError(f"KV cache type(s) {', '.join(need)} need flash attention; drop --fa off")
        return KvConfig(self.k, self.v, "on", self.k_overrides, self.v_overrides, self.policy_name)

    def check_backend(self, backend: str) -> None:
        """Refuse, before any work, types this backend cannot run."""
        ks, vs = self.all_types()
        for role, types in (("K", ks), ("V", vs)):
            for t in sorted(types):
                if why := backend_problem(t, backend):
                    raise RecipeError(f"{role} cache type {t} cannot run on the {backend} backend: {why}")
        for k in sorted(ks):
            for v in sorted(vs):
                if why := pair_problem(k, v, backend):
                    raise RecipeError(f"K {k} with V {v} cannot run on the {backend} backend: {why}")

    def check_head_size(self, head_dim_k: int | None, head_dim_v: int | None) -> None:
        """turbo, tqs and tql types rely on the cache's Hadamard rotation, which needs head sizes that
        are multiples of 64 (patches 0004/0008 refuse the rest; lacq says so before loading the model)."""
        ks, vs = self.all_types()
        for role, types, dim in (("K", ks, head_dim_k), ("V", vs, head_dim_v)):
            turbo = sorted(t for t in types if t in ROTATED)
            if turbo and dim and dim % 64:
                raise RecipeError(f"{role} cache type {turbo[0]} needs a head size that is a multiple of 64 "
                                  f"(for the Hadamard rotation); this model's is {dim}")

    def slow_pairs(self, backend: str, n_kv: int) -> dict[tuple[str, str], list[int]]:
        """(K, V) pairs of this configuration without a flash-attention kernel on `backend`, with their
        KV-layer ordinals: they run, but converted to f16 at every call (CUDA; see types.cuda_fa_pair)."""
        out: dict[tuple[str, str], list[int]] = {}
        if backend != "cuda" or self.flash_attn == "off":
            return out
        for ordinal, (k, v) in enumerate(self.per_layer(n_kv)):
            if not cuda_fa_pair(k, v):
                out.setdefault((k, v), []).append(ordinal)
        return out

    def per_layer(self, n_kv: int) -> list[tuple[str, str]]:
        """(K type, V type) for each KV-layer ordinal; validates ordinals."""
        ks, vs = [self.k] * n_kv, [self.v] * n_kv
        for types, overrides in ((ks, self.k_overrides), (vs, self.v_overrides)):
            for o in overrides:
                for i in o.ordinals(n_kv):
                    types[i] = o.type
        return list(zip(ks, vs))

    def bits_per_value(self, info: ModelInfo, ctx: int | None = None) -> tuple[float, float]:
        """Mean bits/value of K and V over the values the KV layers hold for chunks of `ctx` tokens
        (`cells.layer_values`: an iSWA model's sliding-window layers hold fewer cells than its global ones, and
        layers may differ in heads); `ctx` None: every layer as many cells."""
        layers = self.per_layer(len(info.kv_blocks))
        out = []
        for role, cache in ((0, "k"), (1, "v")):
            values = layer_values(info, ctx, cache)
            total = sum(values)
            types = [kv_type(pair[role]).bits_per_value for pair in layers]
            out.append(sum(b * n for b, n in zip(types, values)) / total if total else
                       kv_type((self.k, self.v)[role]).bits_per_value)
        return out[0], out[1]

    def argv(self) -> list[str]:
        return ["-ctk", self.k, "-ctv", self.v, "-fa", self.flash_attn]

    def env(self) -> dict[str, str]:
        env = {}
        if self.k_overrides:
            env[ENV_K] = ",".join(o.spec() for o in self.k_overrides)
        if self.v_overrides:
            env[ENV_V] = ",".join(o.spec() for o in self.v_overrides)
        return env

    def label(self) -> str:
        text = f"{self.k}/{self.v}"
        if self.policy_name:
            text += f" +{self.policy_name}"
        elif self.k_overrides or self.v_overrides:
            text += " +" + ";".join(filter(None, [
                "K:" + ",".join(o.spec() for o in self.k_overrides) if self.k_overrides else "",
                "V:" + ",".join(o.spec() for o in self.v_overrides) if self.v_overrides else ""]))
        return text

    def to_dict(self) -> dict:
        return {"k": self.k, "v": self.v, "flash_attn": self.flash_attn, "policy": self.policy_name,
                "k_overrides": [o.spec() for o in self.k_overrides],
                "v_overrides": [o.spec() for o in self.v_overrides]}
