"""The KV configuration the command-line flags describe: `--ctk/--ctv/--fa`, `--boundary N`
with its type and `--boundary-k`, or `--kv-policy NAME|FILE`."""

from __future__ import annotations

from lacq.errors import RecipeError
from lacq.plan.kv.config import KvConfig, boundary, check_kv_type
from lacq.plan.kv.policy import load_kv_policy


def kv_from_flags(ctk: str | None = None, ctv: str | None = None, flash_attn: str = "auto",
                  boundary_n: int | None = None, boundary_type: str = "q8_0", boundary_k: bool = False,
                  kv_policy: str | None = None) -> KvConfig:
    if kv_policy:
        if boundary_n is not None:
            raise RecipeError("give either --boundary or --kv-policy, not both")
        return load_kv_policy(kv_policy).config(ctk=ctk, ctv=ctv, flash_attn=flash_attn)
    ctk, ctv = ctk or "f16", ctv or "f16"
    if boundary_n is None:
        return KvConfig(ctk, ctv, flash_attn)
    high = check_kv_type(boundary_type)
    over = boundary(boundary_n, high)
    # one name for a boundary policy wherever it is made (CLI, bench scripts)
    name = f"boundary {boundary_n} {high}" + (" K+V" if boundary_k else "")
    return KvConfig(ctk, ctv, flash_attn, over if boundary_k else (), over, policy_name=name)
