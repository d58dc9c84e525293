"""The backend parity suite (`lacq parity`): a fixed, versioned set of KV configurations measured on
one backend against one shared f16 reference, plus test-backend-ops counts, as one JSON document.

Every configuration is scored by one `llama-perplexity --kl-divergence` run against the base
logits of the same model with an f16 cache, made on the CPU: that one run gives the PPL, the mean
KLD and same-top-p on exactly the reference's tokens, so two backends that take the same logits
file (`--base-logits`) are compared token for token. A configuration the backend cannot run
(checked before any work, as every lacq measurement does) is recorded as unsupported with the
reason, never measured and never counted as agreement; one whose tool fails is recorded as failed
with the log's tail, and the suite goes on.

Changing the configurations, the context or what is counted is a new SUITE_VERSION: `lacq compare`
refuses documents of different versions.
"""

from __future__ import annotations

import os
import platform
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from lacq import __version__
from lacq.errors import BuildError, LacqError, RecipeError, ToolError
from lacq.llama.build import Build
from lacq.llama.tools import backend_ops, kv_bytes
from lacq.llama.tools import kld as kld_tool
from lacq.measure.common import check_kv
from lacq.measure.kld import base_logits, check_logits_matches, measure_kld
from lacq.model.info import inspect_model
from lacq.plan.kv.config import KvConfig, Override
from lacq.plan.kv.flags import kv_from_flags
from lacq.results.store import Store

SUITE = "lacq-parity"
SUITE_VERSION = 1
CTX = 512
DEFAULT_CHUNKS = 10

Step = Callable[[str, float, str], None]  # (stage, fraction, detail)


@dataclass(frozen=True)
class SuiteConfig:
    name: str
    kv: KvConfig


def suite_configs() -> list[SuiteConfig]:
    """The suite's KV configurations, in table order (part of SUITE_VERSION)."""
    # K q8_0 with V turbo3, V of the first two KV layers q8_0 and of the last two turbo4:
    # three per-layer V types, each pair one that CPU and CUDA flash attention run.
    mixed = KvConfig("q8_0", "turbo3", "auto", (), (Override(0, 1, "q8_0"), Override(-2, -1, "turbo4")),
                     policy_name="parity mixed: V 0..1 q8_0, -2..-1 turbo4")
    return [
        SuiteConfig("f16/f16", kv_from_flags()),
        SuiteConfig("q8_0/q4_0", kv_from_flags("q8_0", "q4_0")),
        SuiteConfig("q8_0/turbo4", kv_from_flags("q8_0", "turbo4")),
        SuiteConfig("q8_0/turbo3", kv_from_flags("q8_0", "turbo3")),
        SuiteConfig("q8_0/turbo2 +boundary 2", kv_from_flags("q8_0", "turbo2", boundary_n=2)),
        SuiteConfig("turbo4/turbo4", kv_from_flags("turbo4", "turbo4")),
        SuiteConfig("mixed per-layer", mixed),
    ]


def study_name(backend: str, model_sha: str, build_key: str, chunks: int) -> str:
    return f"parity:v{SUITE_VERSION}:{backend}:{model_sha[:12]}:{build_key}:n{chunks}"


def first_visible_gpu() -> str | None:
    """The GPU CUDA's device 0 is here: the first entry of CUDA_VISIBLE_DEVICES (an index or a
    UUID, both of which `nvidia-smi -i` takes), "0" where it is unset, None where it hides every GPU."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is None:
        return "0"
    first = env.split(",")[0].strip()
    return None if not first or first.startswith("-") else first


def device_description(backend: str, reported: Sequence[str] = ()) -> str:
    """What the backend ran on. The devices the tool itself `reported` (its log, read by
    `tool_devices`) win: it sees only the GPUs CUDA_VISIBLE_DEVICES leaves it, in CUDA's order.
    Else, best effort: on CUDA `nvidia-smi -i` of the first visible GPU (CUDA may order GPUs
    differently from nvidia-smi unless CUDA_DEVICE_ORDER=PCI_BUS_ID, hence the tool first), the
    CPU's model otherwise."""
    if reported:
        return ", ".join(reported)
    try:
        if backend == "cuda" and shutil.which("nvidia-smi"):
            gpu = first_visible_gpu()
            if gpu is None:
                return "no CUDA device visible (CUDA_VISIBLE_DEVICES hides them all)"
            out = subprocess.run(["nvidia-smi", "-i", gpu, "--query-gpu=name", "--format=csv,noheader"],
                                 capture_output=True, check=False, text=True, timeout=20).stdout.strip()
            if out:
                return out.splitlines()[0]
        if sys.platform == "darwin":
            out = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True,
                                 check=False, timeout=20).stdout.strip()
            if out:
                return out
        cpuinfo = Path("/proc/cpuinfo")
        if cpuinfo.exists():
            for line in cpuinfo.read_text(errors="replace").splitlines():
                if line.startswith("model name"):
                    return line.partition(":")[2].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or platform.machine()


def _config_row(cfg: SuiteConfig, kv: KvConfig | None, outcome, reason: str | None) -> dict:
    row = {"name": cfg.name, "kv": (kv or cfg.kv).to_dict()}
    if outcome is None:
        row.update(status="unsupported", reason=reason)
        return row
    r = outcome.result
    row.update(status="ok", ppl=r.ppl_q, ppl_error=r.ppl_q_error, kld=r.kld_mean, kld_error=r.kld_mean_error,
               kld_p99=r.kld_quantiles.get("p99"), same_top_p_pct=r.same_top_p_pct,
               same_top_p_error_pct=r.same_top_p_error_pct, ppl_base=r.ppl_base, result_id=outcome.result_id,
               seconds=round(outcome.seconds, 2))
    return row


def run_backend_ops(build: Build, log_dir: Path, step: Step | None = None) -> dict:
    """test-backend-ops on the build's device for the suite's four ops: counts per op."""
    device = backend_ops.DEVICE_NAMES[build.backend]
    tool = build.tool("test-backend-ops")
    log_dir.mkdir(parents=True, exist_ok=True)
    ops, description, errors = {}, None, []
    for i, op in enumerate(backend_ops.OPS):
        if step:
            step("test-backend-ops", i / len(backend_ops.OPS), op)
        try:
            result = backend_ops.run(tool, device, op, log_dir / f"{op}.log")
        except ToolError as exc:  # crashed, or tested nothing: kept in the document, never a pass
            errors.append(f"{op}: {str(exc).splitlines()[0]}")
            ops[op] = {k: 0 for k in (*backend_ops.COLUMNS, *(f"turbo {c}" for c in backend_ops.COLUMNS))}
            continue
        ops[op] = result.per_op.get(op, {k: 0 for k in backend_ops.COLUMNS})
        description = description or result.description
    kv_bytes_doc = None
    try:  # patch 0011's byte-exactness check of the turbo/tqs writes, beside the tolerance-based cases
        kv_bytes_doc = kv_bytes.run(build.tool(kv_bytes.TARGET), device, log_dir / "kv_bytes.log")
    except (ToolError, BuildError) as exc:
        errors.append(f"{kv_bytes.TARGET}: {str(exc).splitlines()[0]}")
    if step:
        step("test-backend-ops", 1.0, "done")
    note = ("test-backend-ops compares a backend with the CPU: on the CPU it checks the CPU against itself, "
            "so these counts say which cases exist and run there, not that they agree with another backend"
            if build.backend == "cpu" else None)
    return {"status": "ran", "device": device, "description": description, "ops": ops, "note": note,
            "failed": sum(c.get("failed", 0) for c in ops.values()), "kv_bytes": kv_bytes_doc, "errors": errors,
            "logs": str(log_dir)}


def run_parity(build: Build, store: Store, model: Path, corpus: Path, *, chunks: int = DEFAULT_CHUNKS,
               logits: Path | None = None, reference_build: Build | None = None, threads: int | None = None,
               ngl: int | None = None, backend_ops_run: bool = True, argv: list[str] | None = None,
               step: Step | None = None) -> dict:
    """Run the suite on `build`'s backend and return the parity document (also filed in the store).

    The reference is `logits` when given; otherwise the base logits of `model` with an f16 cache,
    made (once, cached) by `reference_build`, which must be a CPU build."""
    if not model.is_file():
        raise LacqError(f"model {model} does not exist")
    if not corpus.is_file():
        raise LacqError(f"corpus {corpus} does not exist")
    info = inspect_model(model)
    if logits is not None:
        if not logits.is_file():
            raise LacqError(f"base logits file {logits} does not exist; make it with `lacq parity --backend cpu` "
                            "(the document names it) and copy it here")
        header = kld_tool.read_logits_header(logits)
        check_logits_matches(header, logits, info)
        made_by = None
    else:
        if reference_build is None or reference_build.backend != "cpu":
            raise LacqError("the parity reference is made on the CPU: give a CPU build or --base-logits FILE")
        logits, _ = base_logits(reference_build, store, model, info, corpus, ctx=CTX, chunks=chunks,
                                threads=threads,
                                progress=(lambda f, d: step("reference logits (CPU, f16)", f, d)) if step else None)
        header = kld_tool.read_logits_header(logits)
        made_by = reference_build.key
    if step:
        step("reference logits (CPU, f16)", 1.0, logits.name)
    model_sha = store.sha256(model)
    study = study_name(build.backend, model_sha, build.key, header.n_chunk)
    t0 = time.monotonic()
    rows = []
    reported: list[str] = []  # the GPUs llama-perplexity said it used
    configs = suite_configs()
    for i, cfg in enumerate(configs):
        try:
            kv = check_kv(cfg.kv, info, build.backend)
        except RecipeError as exc:
            rows.append(_config_row(cfg, None, None, str(exc)))
            continue

        def progress(frac: float, detail: str, i=i, name=cfg.name) -> None:
            if step:
                step("suite", (i + frac) / len(configs), f"{name}: {detail}")

        try:
            outcome = measure_kld(build, store, model, info, model, info, kv, corpus, ctx=header.n_ctx,
                                  chunks=header.n_chunk, threads=threads, ngl=ngl, label=cfg.name, study=study,
                                  progress=progress, logits=logits)
        except ToolError as exc:  # a kernel that crashes or refuses: recorded, and the suite goes on
            rows.append({"name": cfg.name, "kv": kv.to_dict(), "status": "failed", "reason": str(exc)[-2000:]})
            continue
        rows.append(_config_row(cfg, kv, outcome, None))
        reported = reported or (store.get(outcome.result_id).machine or {}).get("devices") or []
    if step:
        step("suite", 1.0, "done")
    if backend_ops_run:
        from lacq import paths
        ops = run_backend_ops(build, paths.sub("work") / "parity" / study.replace(":", "_"), step)
    else:
        ops = {"status": "not run", "reason": "--no-backend-ops"}
    doc = {
        "suite": SUITE, "suite_version": SUITE_VERSION, "study": study,
        "backend": build.backend,
        "device": device_description(build.backend, reported or (
            [ops["description"]] if build.backend != "cpu" and ops.get("description") else [])),
        "build": build.provenance(),
        "build_key": build.key, "patch_series": {"hash": build.series_hash, "patches": list(build.patches)},
        "model": {"path": str(model.resolve()), "name": model.name, "sha256": model_sha,
                  "bytes": model.stat().st_size},
        "corpus": {"path": str(corpus), "sha256": store.sha256(corpus)},
        "ctx": header.n_ctx, "chunks": header.n_chunk,
        "reference": {"kind": "f16 KV base logits made on the CPU", "path": str(logits.resolve()),
                      "sha256": store.sha256(logits), "bytes": logits.stat().st_size, "made_by_build": made_by,
                      "n_vocab": header.n_vocab},
        "configs": rows,
        "backend_ops": ops,
        "provenance": {"host": socket.gethostname(), "lacq_version": __version__, "created": time.time(),
                       "python": platform.python_version(), "platform": platform.platform(),
                       "argv": argv or [], "env": {k: os.environ[k] for k in ("CUDA_VISIBLE_DEVICES",)
                                                  if k in os.environ},
                       "seconds": round(time.monotonic() - t0, 1)},
    }
    store.add(kind="parity", label=f"parity {build.backend}", model=model, build=build.provenance(),
              command=argv or [], metrics=doc, study=study, corpus=corpus, ctx=header.n_ctx, chunks=header.n_chunk,
              wall_seconds=doc["provenance"]["seconds"])
    return doc
