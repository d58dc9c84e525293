"""KV policy files (recipes/kv/*.toml): per-layer KV types by KV-layer ordinal.

    name = "boundary_v2"
    description = "..."
    k = "q8_0"            # optional defaults; --ctk/--ctv given on the command line win
    v = "q4_0"
    [params]
    high = "q8_0"
    [[v_layers]]          # ordered overrides; later ones win, as in the patch
    layers = "0..1"       # ordinal, negative ordinal, or inclusive range A..B
    type = "{high}"

`k_layers` works the same for K.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from lacq import paths
from lacq.errors import RecipeError
from lacq.plan.files import find_file, list_names, load_toml, substitute, undefined_refs, with_overrides
from lacq.plan.kv.config import KvConfig, Override, check_kv_type, parse_overrides

_KEYS = {"name", "description", "k", "v", "params", "k_layers", "v_layers"}


@dataclass(frozen=True)
class KvPolicy:
    name: str
    description: str
    k: str | None
    v: str | None
    params: dict = field(default_factory=dict)
    k_layers: tuple[tuple[str, str], ...] = ()  # (layers, type template)
    v_layers: tuple[tuple[str, str], ...] = ()
    source: str = ""

    def config(self, ctk: str | None = None, ctv: str | None = None, flash_attn: str = "auto",
               overrides: dict[str, str] | None = None) -> KvConfig:
        params = with_overrides(self.params, overrides, f"KV policy '{self.name}'")

        def layers(items) -> tuple[Override, ...]:
            out = []
            for where, typ in items:
                out.extend(parse_overrides(f"{where}={check_kv_type(substitute(typ, params))}"))
            return tuple(out)

        k = ctk or (substitute(self.k, params) if self.k else "f16")
        v = ctv or (substitute(self.v, params) if self.v else "f16")
        return KvConfig(k, v, flash_attn, layers(self.k_layers), layers(self.v_layers), policy_name=self.name)


def kv_policy_dir() -> Path:
    return paths.recipes_dir() / "kv"


def list_kv_policies() -> list[str]:
    return list_names(kv_policy_dir())


def load_kv_policy(name_or_path: str | Path) -> KvPolicy:
    path = find_file(name_or_path, kv_policy_dir(), "KV policy")
    data = load_toml(path)
    unknown = set(data) - _KEYS
    if unknown:
        raise RecipeError(f"{path}: unknown keys {', '.join(sorted(unknown))}; allowed: {', '.join(sorted(_KEYS))}")
    for key in ("name", "description"):
        if not isinstance(data.get(key), str):
            raise RecipeError(f"{path}: missing string key {key!r}")

    def rules(key: str) -> tuple[tuple[str, str], ...]:
        out = []
        for i, item in enumerate(data.get(key, []), 1):
            if not isinstance(item, dict) or set(item) != {"layers", "type"}:
                raise RecipeError(f"{path}: {key} entry {i} needs exactly `layers` and `type`")
            out.append((str(item["layers"]), str(item["type"])))
        return tuple(out)

    policy = KvPolicy(name=data["name"], description=data["description"], k=data.get("k"), v=data.get("v"),
                      params={str(k): str(v) for k, v in data.get("params", {}).items()},
                      k_layers=rules("k_layers"), v_layers=rules("v_layers"), source=str(path))
    templates = [t for _, t in policy.k_layers + policy.v_layers] + [x for x in (policy.k, policy.v) if x]
    for value in undefined_refs(templates, policy.params):
        raise RecipeError(f"{path}: '{value}' refers to no parameter; defined: {', '.join(sorted(policy.params)) or 'none'}")
    if not policy.k_layers and not policy.v_layers:
        raise RecipeError(f"{path}: a KV policy needs at least one k_layers or v_layers entry")
    policy.config()  # validates types and parameters now, not at run time
    return policy
