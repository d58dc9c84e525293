"""Measuring an optimized recipe or KV policy: the scan's prediction, the judged and the measured KLD, stored side
by side, each with its chunk count. The measurement is a judgement: on the judge text, at `judge_chunks` chunks
(never fewer than the scan's), as refine.py judges its proposals."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from lacq import paths
from lacq.errors import ImatrixError, LacqError
from lacq.llama.build import Build
from lacq.measure.kld import measure_kld
from lacq.model.info import inspect_model
from lacq.plan.kv.config import KvConfig
from lacq.plan.kv.policy import load_kv_policy
from lacq.plan.recipe import load_recipe, resolve_recipe
from lacq.quantize import quantize_with_plan
from lacq.results.store import Store
from lacq.studies.artifact import Scan
from lacq.studies.optimize import Solution


def scan_imatrix(store: Store, scan: Scan, imatrix: Path | None) -> Path | None:
    """The importance matrix the measured files of a weights scan are quantized with: the one its candidates were
    made with (`--imatrix` must name it when the scan used one), or the one given for a scan made without."""
    want = scan.base.get("imatrix_sha256")
    if want and imatrix is None:
        raise ImatrixError(f"the scan's candidate files were quantized with an importance matrix (sha256 {want[:16]}); "
                           "pass it with --imatrix so the measured files are made the same way")
    if want and imatrix is not None and store.sha256(imatrix) != want:
        raise ImatrixError(f"{imatrix} is not the importance matrix the scan was made with (sha256 {want[:16]})")
    return imatrix


def check_verify_inputs(store: Store, scan: Scan, imatrix: Path | None = None) -> None:
    """Refuse, before anything runs or is written, a scan that --verify or --refine cannot measure: the file it
    measured is gone (a weights scan's base, a KV scan's model) or the importance matrix is not the scan's."""
    role = "base" if scan.kind == "weights" else "model"
    path = (scan.base if scan.kind == "weights" else scan.model).get("path")
    if not path or not Path(path).is_file():
        raise LacqError(f"the scan's {role} file {path} does not exist; --verify and --refine measure on it")
    if scan.kind == "weights":
        scan_imatrix(store, scan, imatrix)


def judge_chunk_count(scan: Scan, judge_chunks: int | None) -> int:
    """Chunks a judgement runs on: `judge_chunks`, never fewer than the scan's (None: the scan's)."""
    return max(scan.chunks, judge_chunks or 0)


def verify_weights(build: Build, store: Store, scan: Scan, solution: Solution, recipe_path: Path, corpus: Path, *,
                   label: str, study: str | None = None, threads: int | None = None,
                   imatrix: Path | None = None, judge_chunks: int | None = None) -> tuple[int, float, Path]:
    """Quantize the scan's base with the recipe (and `imatrix`) and measure it on `corpus` (the judge text) at
    `judge_chunk_count` chunks of the scan's context; (result id, KLD, file)."""
    base = Path(scan.base["path"])
    base_info = inspect_model(base)
    imatrix = scan_imatrix(store, scan, imatrix)
    plan = resolve_recipe(load_recipe(recipe_path), base_info, imatrix=imatrix is not None)
    tag = f".imatrix-{store.sha256(imatrix)[:12]}" if imatrix else ""
    out = quantize_with_plan(build, store, base, base_info, plan, imatrix=imatrix, force=True,
                             output=paths.sub("work") / "optimized" / f"{base.stem}.{plan.recipe}{tag}.gguf")
    r = measure_kld(build, store, out.output, inspect_model(out.output), base, base_info, KvConfig(), corpus,
                    ctx=scan.ctx, chunks=judge_chunk_count(scan, judge_chunks), threads=threads, label=label,
                    study=study, recipe=plan.recipe, plan_hash=plan.plan_hash, annotations=annotations(solution))
    return r.result_id, r.result.kld_mean, out.output


def verify_kv(build: Build, store: Store, scan: Scan, solution: Solution, policy_path: Path, corpus: Path, *,
              label: str, study: str | None = None, threads: int | None = None,
              judge_chunks: int | None = None) -> tuple[int, float]:
    """Run the model with the KV policy against its own f16-cache logits, on `corpus` (the judge text) at
    `judge_chunk_count` chunks of the scan's context."""
    model = Path(scan.model["path"])
    info = inspect_model(model)
    kv: KvConfig = load_kv_policy(policy_path).config()
    r = measure_kld(build, store, model, info, model, info, kv, corpus, ctx=scan.ctx,
                    chunks=judge_chunk_count(scan, judge_chunks), threads=threads, label=label, study=study,
                    annotations=annotations(solution))
    return r.result_id, r.result.kld_mean


def annotations(solution: Solution) -> dict:
    """What the measured result is filed with: the scan's prediction (on the scan's chunks) and, where
    --verify or --refine measured the choice on its assembled file, that judgement (on its chunks)."""
    return {"predicted": {"kld": solution.kld, "kld_low": solution.kld_low, "kld_high": solution.kld_high,
                          "kld_error": solution.kld_error, "chunks": solution.chunks, "budget": solution.budget,
                          "cost": solution.cost, "method": solution.method},
            "judged": asdict(solution.judged) if solution.judged is not None else None}
