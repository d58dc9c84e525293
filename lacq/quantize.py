"""The operations lacq's commands run: quantize with a plan, measure perplexity.

Each takes a Build and plain values, reports progress through a callback,
and returns a frozen dataclass; the CLI only wires and prints.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from lacq.llama.build import Build
from lacq.errors import LacqError, OutputExistsError, RecipeError
from lacq.fsutil import atomic_output, canonical_hash
from lacq.model.info import ModelInfo
from lacq.plan.kv.config import KvConfig
from lacq.plan.recipe import Plan, compare_with_dry_run
from lacq.results.store import Store
from lacq.llama.tools import perplexity, quantize

log = logging.getLogger(__name__)

Progress = Callable[[float, str], None]

# llama-quantize's non-quantized output types.
_FLOAT_FTYPES = {"F32", "F16", "BF16"}


@dataclass(frozen=True)
class QuantizeOutcome:
    output: Path
    plan: Plan
    predicted_bytes: int
    actual_bytes: int
    mismatches: tuple  # recipe.TypeMismatch rows from the dry run
    skipped: bool  # the same input, plan and build had already produced it
    seconds: float


def default_output(model: Path, recipe_name: str) -> Path:
    return model.with_name(f"{model.stem}.{recipe_name}.gguf")


def _is_quantized(info: ModelInfo) -> bool:
    return any(t.type not in ("f32", "f16", "bf16") for t in info.tensors if t.n_elements > 1 and len(t.shape) > 1)


def quantize_with_plan(build: Build, store: Store, model: Path, info: ModelInfo, plan: Plan, *,
                       output: Path | None = None, force: bool = False, imatrix: Path | None = None,
                       strict: bool = False, dry_run: bool = False, workdir: Path | None = None,
                       progress: Progress | None = None) -> QuantizeOutcome:
    """Verify `plan` with --dry-run, then quantize `model` atomically (cached)."""
    t0 = time.monotonic()
    output = Path(output) if output else default_output(model, plan.recipe)
    if output.resolve() == model.resolve():
        raise OutputExistsError(f"output {output} is the input model; choose another -o")
    requant = _is_quantized(info)
    key = canonical_hash({"input": store.sha256(model), "plan": plan.plan_hash, "build": build.key,
                          "imatrix": store.sha256(imatrix) if imatrix else None})
    if not dry_run and output.exists():
        cached = store.cache.artifact(key)
        if cached is not None and cached.resolve() == output.resolve():
            return QuantizeOutcome(output, plan, plan.predicted_bytes, output.stat().st_size, (), True,
                                   time.monotonic() - t0)
        if not force:
            raise OutputExistsError(f"{output} exists and was not made from this input, plan and build; "
                                    "pass --force to overwrite it or -o to choose another path")
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        ttf = Path(tmp) / "tensor-types.txt"
        ttf.write_text(plan.tensor_type_file_text())
        binary = build.tool("llama-quantize")
        if progress:
            progress(0.05, "checking the plan with --dry-run")
        args = quantize.argv(binary, model, None, plan.base_ftype, tensor_type_file=ttf, imatrix=imatrix,
                             dry_run=True, allow_requantize=requant)
        _, report = quantize.run(args, log_path=Path(tmp) / "dry-run.log")
        mismatches = tuple(compare_with_dry_run(plan, report.types()))
        if strict and mismatches:
            rows = "\n".join(f"  {m.name}: planned {m.predicted}, llama-quantize chose {m.actual}" for m in mismatches[:20])
            raise RecipeError(f"--strict: {len(mismatches)} tensor(s) would not get the planned type:\n{rows}")
        if dry_run:
            return QuantizeOutcome(output, plan, plan.predicted_bytes, round((report.quant_mib or 0) * 2**20),
                                   mismatches, False, time.monotonic() - t0)
        total = len(report.tensors)
        done = [0]

        def on_line(line: str) -> None:
            if line.lstrip().startswith("[") and "/" in line[:12]:
                done[0] += 1
                if progress:
                    progress(0.1 + 0.9 * done[0] / max(total, 1), line.split("]")[1].split()[0] if "]" in line else "")

        with atomic_output(output) as part:
            args = quantize.argv(binary, model, part, plan.base_ftype, tensor_type_file=ttf, imatrix=imatrix,
                                 allow_requantize=requant, threads=os.cpu_count())
            quantize.run(args, log_path=Path(tmp) / "quantize.log", on_line=on_line)
    store.cache.record_artifact(key, output, {"model": str(model), "plan": plan.plan_hash, "recipe": plan.recipe})
    return QuantizeOutcome(output, plan, plan.predicted_bytes, output.stat().st_size, mismatches, False,
                           time.monotonic() - t0)


def convert_ftype(build: Build, store: Store, model: Path, output: Path, ftype: str = "F16",
                  progress: Progress | None = None, force: bool = False) -> Path:
    """Whole-model conversion (e.g. dequantize Q4_1 -> F16 for weight studies), cached.

    The key leaves the build out on purpose: dequantizing to a float type is exact
    arithmetic in every build of ggml, so a rebuild (a new patch) must not strand
    the base every study was measured on.
    """
    key = canonical_hash({"input": store.sha256(model), "ftype": ftype})
    if output.exists() and (cached := store.cache.artifact(key)) is not None and cached.resolve() == output.resolve():
        return output
    if output.exists() and not force:
        raise OutputExistsError(f"{output} exists; remove it or choose another path")
    with tempfile.TemporaryDirectory() as tmp, atomic_output(output) as part:
        args = quantize.argv(build.tool("llama-quantize"), model, part, ftype, allow_requantize=True,
                             threads=os.cpu_count())
        quantize.run(args, log_path=Path(tmp) / "convert.log",
                     on_line=(lambda l: progress(0.5, "converting")) if progress else None)
    store.cache.record_artifact(key, output, {"model": str(model), "ftype": ftype})
    return output


def check_kv(kv: KvConfig, info: ModelInfo, backend: str) -> KvConfig:
    """The checks that need no build: switches flash attention on where the types need it,
    refuses types the backend cannot run or the model's head size cannot take, and
    validates ordinals. Returns the configuration with flash attention resolved."""
    kv = kv.with_fa_resolved()
    kv.check_backend(backend)
    kv.check_head_size(info.head_dim, info.head_dim_v)
    kv.per_layer(len(info.kv_blocks))
    return kv


def prepare_kv(build: Build, kv: KvConfig, info: ModelInfo) -> KvConfig:
    """Every check of a KV configuration against this build and model, before any work:
    `check_kv`, and the per-layer patch where the configuration has per-layer types."""
    kv = check_kv(kv, info, build.backend)
    if (kv.k_overrides or kv.v_overrides) and not any("per-layer" in p for p in build.patches):
        raise RecipeError("this build lacks the patch for per-layer K/V types by KV-layer ordinal; "
                          "rebuild with the current patches/series")
    return kv


@dataclass(frozen=True)
class PplOutcome:
    result: perplexity.PerplexityResult
    result_id: int
    seconds: float
    k_bits_per_value: float
    v_bits_per_value: float


def measure_ppl(build: Build, store: Store, model: Path, info: ModelInfo, kv: KvConfig, corpus: Path, *,
                ctx: int = 512, chunks: int | None = 20, threads: int | None = None, ngl: int | None = None,
                label: str | None = None, study: str | None = None, recipe: str | None = None,
                plan_hash: str | None = None, progress: Progress | None = None,
                log_dir: Path | None = None) -> PplOutcome:
    if not corpus.exists():
        raise LacqError(f"corpus {corpus} does not exist")
    kv = prepare_kv(build, kv, info)
    k_bpv, v_bpv = kv.bits_per_value(len(info.kv_blocks))
    args = perplexity.argv(build.tool("llama-perplexity"), model, corpus, ctx=ctx, chunks=chunks,
                           threads=threads, ngl=ngl, kv_args=kv.argv())
    env = kv.env()
    expected = chunks or 0

    def on_line(line: str) -> None:
        if progress and line.startswith("[") and expected:
            n = line.count(",")
            progress(min(n / expected, 1.0), f"chunk {n}/{expected}")

    log_path = None
    if log_dir:
        log_dir.mkdir(parents=True, exist_ok=True)
        log_path = log_dir / f"ppl-{int(time.time() * 1000)}.log"
    run, result = perplexity.run(args, env=env, log_path=log_path, on_line=on_line)
    if result.k_bits_per_value is not None:  # measured by the patch from allocated bytes
        k_bpv, v_bpv = result.k_bits_per_value, result.v_bits_per_value
    metrics = asdict(result)
    metrics.update(k_bits_per_value=k_bpv, v_bits_per_value=v_bpv)
    rid = store.add(kind="ppl", label=label or f"{model.name} {kv.label()}", model=model, build=build.provenance(),
                    command=list(run.argv), metrics=metrics, study=study, recipe=recipe, plan_hash=plan_hash,
                    kv=kv.to_dict(), corpus=corpus, ctx=ctx, chunks=result.n_chunks or chunks, env=env,
                    wall_seconds=run.seconds)
    return PplOutcome(result, rid, run.seconds, k_bpv, v_bpv)
