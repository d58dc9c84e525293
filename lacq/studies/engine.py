"""Scan variants measured in place by the evaluation engine: one model load per scan, not one per variant.

The engine (llama/tools/engine.py) loads the scan's model and each candidate file once; a weight variant
points tensors at a candidate's data, a KV variant re-creates only the context. An `EngineSession` files
each outcome like `measure_kld` files a run (same metrics, the variant's tensors beside them), restarts an
engine that crashed and measures the variant in flight again (once), and stops the engine when the scan
ends or is interrupted (the engine also dies with lacq: PR_SET_PDEATHSIG, and stdin closing).
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import threading
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

from lacq.errors import LacqError
from lacq.llama.build import Build
from lacq.llama.tools import engine as tool
from lacq.measure.common import record
from lacq.model.info import ModelInfo
from lacq.plan.kv.config import KvConfig
from lacq.results.store import Store

log = logging.getLogger(__name__)
HOST_MARGIN = 1 << 30  # left free beside the engine's memory


class EngineError(LacqError):
    """The engine cannot run as asked (memory, inputs)."""


ENGINE_PATCH = "evaluation-engine"  # in the name of the patch that adds it (patches/series)


def engine_available(build: Build, note: Callable[[str], None] | None = None) -> bool:
    """Whether `build` has the engine; a build made before its patch measures as before, and says so."""
    if any(ENGINE_PATCH in p for p in build.patches):
        return True
    msg = ("this build lacks the evaluation engine (patch *-evaluation-engine-*); each variant runs as its own "
           "llama-perplexity process. Rebuild (`lacq build`) with the current patches/series for the engine")
    log.warning(msg)
    if note:
        note(msg)
    return False


@dataclass(frozen=True)
class MemoryPlan:
    host_bytes: int  # the model and candidate files: mmap'd (page cache); repacked tensors are copies
    gpu_bytes: int  # with layers offloaded: the model and every candidate on the device
    host_free: int | None
    gpu_free: int | None

    def describe(self) -> str:
        where = (f"host {self.host_bytes / 1e9:.2f} GB (model and candidate files, mmap'd; tensors llama.cpp "
                 f"repacks for this CPU are copied)")
        if self.gpu_bytes:
            where += f"; GPU {self.gpu_bytes / 1e9:.2f} GB (model and candidates on the device)"
        free = [f"{n} {v / 1e9:.2f} GB" for n, v in (("host", self.host_free), ("GPU", self.gpu_free)) if v is not None]
        return f"engine memory: {where}; free: {', '.join(free) or 'unknown'}"


def host_available() -> int | None:
    """MemAvailable (Linux): what can be had without swapping, page cache included."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None


def gpu_available() -> int | None:
    """Free memory of the first visible GPU (nvidia-smi), None where there is none."""
    if not shutil.which("nvidia-smi"):
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.free", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=20, check=False).stdout.split()
        return int(out[0]) * (1 << 20) if out else None
    except (OSError, subprocess.SubprocessError, ValueError):
        return None


def memory_plan(model: Path, candidates: Mapping[str, Path], ngl: int | None) -> MemoryPlan:
    files = sum(p.stat().st_size for p in [model, *candidates.values()])
    on_gpu = bool(ngl)
    return MemoryPlan(host_bytes=0 if on_gpu else files, gpu_bytes=files if on_gpu else 0,
                      host_free=host_available(), gpu_free=gpu_available() if on_gpu else None)


def check_memory(plan: MemoryPlan) -> None:
    """Refuse, with the numbers, a scan whose model and candidates cannot fit where they would live."""
    if plan.host_free is not None and plan.host_bytes + HOST_MARGIN > plan.host_free:
        raise EngineError(f"the engine needs {plan.host_bytes / 1e9:.2f} GB of host memory for the model and its "
                          f"candidates and {plan.host_free / 1e9:.2f} GB are available (1 GB kept free); scan fewer "
                          "types, or use --no-engine (one assembled file at a time)")
    if plan.gpu_free is not None and plan.gpu_bytes + HOST_MARGIN > plan.gpu_free:
        raise EngineError(f"the engine needs {plan.gpu_bytes / 1e9:.2f} GB of GPU memory for the model and its "
                          f"candidates and the GPU has {plan.gpu_free / 1e9:.2f} GB free (1 GB kept free)")


class EngineSession:
    """The engines of one scan (one per thread that measures), each started on first use."""

    def __init__(self, build: Build, model: Path, info: ModelInfo, logits: Path, candidates: Mapping[str, Path], *,
                 ctx: int, threads: int | None = None, ngl: int | None = None,
                 note: Callable[[str], None] | None = None):
        self.build, self.model, self.info, self.logits = build, model, info, logits
        self.args = tool.argv(build.tool("llama-perplexity"), model, logits, candidates, ctx=ctx, threads=threads,
                              ngl=ngl)
        plan = memory_plan(model, candidates, ngl)
        if note:
            note(plan.describe())
        log.info(plan.describe())
        check_memory(plan)
        self._local = threading.local()
        self._all: list[tool.Engine] = []
        self._lock = threading.Lock()

    def _engine(self) -> tool.Engine:
        eng = getattr(self._local, "engine", None)
        if eng is None or eng.proc is None:
            eng = tool.Engine(self.args)
            with self._lock:
                self._all.append(eng)
            eng.start()
            self._local.engine = eng
        return eng

    def evaluate(self, label: str, tensors: Mapping[str, str], kv: KvConfig) -> tuple[tool.VariantOutcome, str, float]:
        """One variant; an engine that crashes is restarted and the variant measured again, once."""
        for attempt in (1, 2):
            eng = self._engine()
            try:
                return eng.evaluate(label, tensors, kv.argv(), kv.env())
            except tool.EngineCrashed as exc:
                eng.close()
                if attempt == 2:
                    raise
                log.warning("%s; restarting the engine", str(exc).splitlines()[0])
        raise AssertionError("unreachable")

    def measure(self, store: Store, *, label: str, study: str, tensors: Mapping[str, str], kv: KvConfig,
                corpus: Path, record_model: Path, annotations: dict | None = None) -> int:
        """Measure and file one variant (kind "kld", like `measure_kld`); the result id."""
        outcome, text, seconds = self.evaluate(label, tensors, kv)
        if not outcome.ok:
            raise EngineError(f"the engine refused {label}: {outcome.error}")
        result = outcome.result
        metrics = asdict(result)
        metrics.update(base_logits=str(self.logits), logits_key=self.logits.stem, engine=True,
                       engine_tensors=dict(tensors), **(annotations or {}))
        eng = self._local.engine
        return record(store, kind="kld", label=label, model=record_model, build=self.build, kv=kv,
                      command=self.args, metrics=metrics, wall_seconds=seconds, study=study, corpus=corpus,
                      ctx=result.n_ctx, chunks=result.n_chunks, info=self.info,
                      tool_output=eng.startup_output + text)

    def close(self) -> None:
        with self._lock:
            engines, self._all = self._all, []
        for eng in engines:
            eng.close()

