"""What every measurement shares: checking a KV configuration before work, and filing a result.

A measurement job takes a Build and plain values, checks its inputs before long
work, reports progress through a callback, files one result with `record` and
returns a frozen dataclass; the CLI only wires and prints.
"""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Callable

from lacq.errors import LacqError, RecipeError
from lacq.llama.build import Build
from lacq.llama.tools.base import system_info
from lacq.llama.tools.devices import tool_devices
from lacq.model.info import ModelInfo
from lacq.plan.kv.config import KvConfig
from lacq.results.store import Store

Progress = Callable[[float, str], None]


def check_kv(kv: KvConfig, info: ModelInfo, backend: str) -> KvConfig:
    """The checks that need no build: switches flash attention on where the types need it,
    refuses types the backend cannot run or the model's head size cannot take, and
    validates ordinals. Returns the configuration with flash attention resolved."""
    kv = kv.with_fa_resolved()
    kv.check_backend(backend)
    kv.check_head_size(info.head_dim, info.head_dim_v)
    kv.per_layer(len(info.kv_blocks))
    return kv


def check_context(ctx: int, info: ModelInfo, allow_long: bool = False) -> None:
    """Refuse a context longer than the model's training context unless the caller insists:
    such a run takes hours (`-c 100000` on an 8192-token model) and measures a model outside
    what it was trained for."""
    if ctx < 1:
        raise LacqError(f"context {ctx} must be at least 1 token")
    if info.n_ctx_train and ctx > info.n_ctx_train and not allow_long:
        raise LacqError(f"context {ctx} is longer than {Path(info.path).name} was trained for "
                        f"({info.n_ctx_train} tokens); use -c {info.n_ctx_train} or less, or pass "
                        "--allow-long-context to run it anyway")


def prepare_kv(build: Build, kv: KvConfig, info: ModelInfo) -> KvConfig:
    """Every check of a KV configuration against this build and model, before any work:
    `check_kv`, and the per-layer patch where the configuration has per-layer types."""
    kv = check_kv(kv, info, build.backend)
    if (kv.k_overrides or kv.v_overrides) and not any("per-layer" in p for p in build.patches):
        raise RecipeError("this build lacks the patch for per-layer K/V types by KV-layer ordinal; "
                          "rebuild with the current patches/series")
    return kv


def cpu_model() -> str:
    """The CPU's model name (Linux /proc/cpuinfo; elsewhere what platform knows)."""
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "Model", "cpu model") and value.strip():
                return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_record(tool_output: str | None) -> dict:
    """Where a result was measured: the CPU model, the ggml CPU features the tool reported, and the
    GPUs the tool said it used (it sees only those CUDA_VISIBLE_DEVICES leaves it).
    A native build (GGML_NATIVE, the default) compiles for the CPU it is built on, and ggml picks
    kernels by these features: the same commit gives slightly different numbers on another CPU."""
    info = system_info(tool_output) if tool_output else None
    return {"cpu": cpu_model(), "arch": platform.machine(),
            "ggml_cpu": info.get("CPU") if info else None,
            "devices": tool_devices(tool_output) if tool_output else []}


def kv_record(kv: KvConfig, info: ModelInfo | None, ctx: int | None = None) -> dict:
    """The KV configuration as stored: its settings and, given the model, the per-layer map
    (block, KV-layer ordinal, K and V type, and the cache of iSWA models) and bits/value (at `ctx`)."""
    out = kv.to_dict()
    if info is None or not info.kv_blocks:
        return out
    swa = set(info.swa_blocks)
    out["layers"] = [{"block": b, "ordinal": i, "k": k, "v": v,
                      **({"cache": "swa" if b in swa else "full"} if info.is_iswa else {})}
                     for i, (b, (k, v)) in enumerate(zip(info.kv_blocks, kv.per_layer(len(info.kv_blocks))))]
    out["k_bits_per_value"], out["v_bits_per_value"] = kv.bits_per_value(info, ctx)
    return out


def record(store: Store, *, kind: str, label: str, model: Path, build: Build, kv: KvConfig, command: list,
           metrics: dict, wall_seconds: float, study: str | None = None, recipe: str | None = None,
           plan_hash: str | None = None, corpus: Path | None = None, ctx: int | None = None,
           chunks: int | None = None, info: ModelInfo | None = None, tool_output: str | None = None) -> int:
    """File one measurement with its provenance: build, KV configuration (with the per-layer map
    where `info` is given), the environment it set and the machine (CPU features from
    `tool_output`, the tool's log)."""
    return store.add(kind=kind, label=label, model=model, build=build.provenance(), command=command,
                     metrics=metrics, study=study, recipe=recipe, plan_hash=plan_hash, kv=kv_record(kv, info, ctx),
                     corpus=corpus, ctx=ctx, chunks=chunks, env=kv.env(), wall_seconds=wall_seconds,
                     machine=machine_record(tool_output))
