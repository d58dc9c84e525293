"""Quantizing a model with a resolved plan (llama-quantize), and whole-model conversions.

Each job takes a Build and plain values, reports progress through a callback,
writes its output atomically, records it in the artifact cache and returns a
frozen dataclass.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from lacq.errors import ImatrixError, OutputExistsError, RecipeError
from lacq.fsutil import atomic_output, canonical_hash
from lacq.llama.build import Build
from lacq.llama.tools import quantize
from lacq.model.imatrix import check_imatrix, read_imatrix
from lacq.model.info import ModelInfo
from lacq.plan.recipe import Plan, compare_with_dry_run
from lacq.results.store import Store

Progress = Callable[[float, str], None]


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


def check_plan_imatrix(plan: Plan, info: ModelInfo, imatrix: Path | None, model_name: str = "the model") -> None:
    """Before llama-quantize runs: a plan with types that need importance data gets an imatrix, and the imatrix
    is one, made from this model, with data for every tensor the plan quantizes."""
    if imatrix is None:
        if plan.needs_imatrix:
            first = plan.needs_imatrix[0]
            more = f" and {len(plan.needs_imatrix) - 1} more" if len(plan.needs_imatrix) > 1 else ""
            raise ImatrixError(f"recipe '{plan.recipe}' gives {first}{more} type {plan.tensor_types[first]}, which "
                               "llama-quantize writes only with an importance matrix: pass --imatrix FILE "
                               "(`lacq imatrix MODEL` makes one)")
        return
    if not plan.imatrix:
        raise ValueError(f"plan '{plan.recipe}' was resolved for a run without an imatrix; "
                         "resolve it with imatrix=True to quantize with one")
    check_imatrix(read_imatrix(imatrix), info, plan.quantized_tensors(), model_name)


def quantize_with_plan(build: Build, store: Store, model: Path, info: ModelInfo, plan: Plan, *,
                       output: Path | None = None, force: bool = False, imatrix: Path | None = None,
                       strict: bool = False, dry_run: bool = False,
                       progress: Progress | None = None) -> QuantizeOutcome:
    """Verify `plan` with --dry-run, then quantize `model` atomically (cached). With `imatrix`, `plan` must have
    been resolved with imatrix=True; its sha256 is in the cache key and the artifact's record."""
    t0 = time.monotonic()
    check_plan_imatrix(plan, info, imatrix, Path(model).name)
    output = Path(output) if output else default_output(model, plan.recipe)
    if output.resolve() == model.resolve():
        raise OutputExistsError(f"output {output} is the input model; choose another -o")
    requant = info.is_quantized
    imatrix_sha = store.sha256(imatrix) if imatrix else None
    key = canonical_hash({"input": store.sha256(model), "plan": plan.plan_hash, "build": build.key,
                          "imatrix": imatrix_sha})
    if not dry_run and output.exists():
        cached = store.cache.artifact(key)
        # The cache keeps one path per key: a second file made from the same input, plan and build elsewhere
        # (a scan's candidate file, say) moves the key there, and this one is still up to date by its bytes.
        if cached is not None and (cached.resolve() == output.resolve()
                                   or store.sha256(cached) == store.sha256(output)):
            return QuantizeOutcome(output, plan, plan.predicted_bytes, output.stat().st_size, (), True,
                                   time.monotonic() - t0)
        if not force:
            raise OutputExistsError(f"{output} exists and was not made from this input, plan and build; "
                                    "pass --force to overwrite it or -o to choose another path")
    with tempfile.TemporaryDirectory() as tmp:
        ttf = Path(tmp) / "tensor-types.txt"
        ttf.write_text(plan.tensor_type_file_text())
        binary = build.tool("llama-quantize")
        if progress:
            progress(0.05, "checking the plan with --dry-run")
        args = quantize.argv(binary, model, None, plan.base_ftype, tensor_type_file=ttf, imatrix=imatrix,
                             dry_run=True, allow_requantize=requant)
        _, report = quantize.run(args, log_path=Path(tmp) / "dry-run.log")
        mismatches = tuple(compare_with_dry_run(plan, report.types()))
        if report.needs_imatrix and imatrix is None:  # a type the mirror (requires_imatrix) does not know to refuse
            raise ImatrixError(f"llama-quantize --dry-run says recipe '{plan.recipe}' needs an importance matrix; "
                               "pass --imatrix FILE (`lacq imatrix MODEL` makes one)")
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
    store.cache.record_artifact(key, output, {"model": str(model), "plan": plan.plan_hash, "recipe": plan.recipe,
                                              **({"imatrix_sha256": imatrix_sha} if imatrix_sha else {})})
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
