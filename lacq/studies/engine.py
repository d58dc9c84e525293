"""Scan variants measured in place by the evaluation engine: one model load per scan, not one per variant.

The engine (llama/tools/engine.py) loads the scan's model and each candidate file once; a weight variant
points tensors at a candidate's data, a KV variant re-creates only the context. An `EngineSession` files
each outcome like `measure_kld` files a run (same metrics, the variant's tensors beside them), restarts an
engine that crashed and measures the variant in flight again (once), and stops the engine when the scan
ends or is interrupted (the engine also dies with lacq: PR_SET_PDEATHSIG, and stdin closing).

Sharding: each thread that measures has its own engine (`Engines`); with `gpus`, each thread's engine runs on
one GPU of the list (CUDA_VISIBLE_DEVICES), and the memory check is per GPU. studies/engine_ray.py puts the
engines on Ray actors instead; either way the results are filed here, in the driver's store.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Protocol

from lacq.errors import LacqError
from lacq.llama.build import Build
from lacq.llama.tools import engine as tool
from lacq.llama.tools.kld import read_logits_header
from lacq.measure.common import record
from lacq.model.info import ModelInfo
from lacq.plan.kv.config import KvConfig
from lacq.results.store import Store

log = logging.getLogger(__name__)
HOST_MARGIN = 1 << 30  # left free beside the engine's memory
# Each engine's own GPU memory beside its files and KLD: the CUDA context, compute buffers and KV cache of a scan's
# context. Measured on an H100 (bench/results/engine_cuda.md): 0.69 GB per engine with four SmolLM2-shaped
# engines sharing the GPU, 0.79 GB for one engine of the synthetic 8B (128k vocabulary, larger logits buffers).
ENGINE_GPU_BYTES = 1 << 30


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
    gpu_bytes: int  # with layers offloaded: the model, every candidate and the KLD's share on each GPU, all engines
    host_free: int | None
    gpu_free: int | None  # with several GPUs (an engine on each), the least free among them
    gpu: str | None = None  # which GPU that is, where the scan names them
    n_gpus: int = 1
    kld_bytes: int = 0  # of gpu_bytes, one engine's: the KL-divergence on the GPU (kld_device_bytes)
    engine_bytes: int = 0  # of gpu_bytes, one engine's: its context (ENGINE_GPU_BYTES)
    engines_per_gpu: int = 1  # engines sharing one GPU (--jobs without --gpus), each with its own copy

    def describe(self) -> str:
        where = (f"host {self.host_bytes / 1e9:.2f} GB (model and candidate files, mmap'd; tensors llama.cpp "
                 f"repacks for this CPU are copied)")
        if self.gpu_bytes:
            each = f" on each of {self.n_gpus} GPUs" if self.n_gpus > 1 else ""
            kld = (f", {self.kld_bytes / 1e9:.2f} GB of it the KLD's base log-probabilities" if self.kld_bytes
                   else "")
            kld += f", {self.engine_bytes / 1e9:.2f} GB the engine's context" if self.engine_bytes else ""
            engines = f", {self.engines_per_gpu} engines sharing the GPU" if self.engines_per_gpu > 1 else ""
            where += f"; GPU {self.gpu_bytes / 1e9:.2f} GB (model and candidates on the device{kld}{engines}{each})"
        free = [f"{n} {v / 1e9:.2f} GB" for n, v in (("host", self.host_free), (self._gpu_name(), self.gpu_free))
                if v is not None]
        return f"engine memory: {where}; free: {', '.join(free) or 'unknown'}"

    def _gpu_name(self) -> str:
        return f"GPU {self.gpu}" if self.gpu is not None else "GPU"


def host_available() -> int | None:
    """MemAvailable (Linux): what can be had without swapping, page cache included."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None


def gpu_available(gpu: str | None = None) -> int | None:
    """Free memory of `gpu` (an index or UUID, as nvidia-smi -i takes it) or else of the first GPU (nvidia-smi),
    None where there is none."""
    if not shutil.which("nvidia-smi"):
        return None
    try:
        out = subprocess.run(["nvidia-smi", *(["-i", gpu] if gpu is not None else []),
                              "--query-gpu=memory.free", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=20, check=False).stdout.split()
        return int(out[0]) * (1 << 20) if out else None
    except (OSError, subprocess.SubprocessError, ValueError):
        return None


def visible_gpus() -> list[str]:
    """GPU ids this process may use: CUDA_VISIBLE_DEVICES where set, else those nvidia-smi lists."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [g for g in (x.strip() for x in env.split(",")) if g and g != "-1"]
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20, check=False).stdout
        except (OSError, subprocess.SubprocessError):
            return []
        return [str(i) for i, line in enumerate(l for l in out.splitlines() if l.startswith("GPU "))]
    return []


def kld_device_bytes(logits: Path | None) -> int:
    """GPU memory of an engine's KL-divergence on the device (patch 0018's engine_kld_device): the base
    log-probabilities of every scored token unpacked twice (log p, and p where it counts), one sequence's logits,
    and the graph's work space (about four more of those); 0 where `logits` is not a base logits file."""
    if logits is None:
        return 0
    try:
        h = read_logits_header(logits)
    except (OSError, ValueError):
        return 0
    n_row = h.n_ctx - 1 - h.n_ctx // 2
    return (2 * n_row * h.n_chunk + 5 * n_row) * h.n_vocab * 4


def memory_plan(model: Path, candidates: Mapping[str, Path], ngl: int | None,
                gpus: Sequence[str] = (), gpu_backend: bool = False, logits: Path | None = None,
                engines_per_gpu: int = 1) -> MemoryPlan:
    """Where the engine's model and candidates live; with `gpus` (an engine on each), every GPU holds them all,
    so the one with the least free memory decides, and `engines_per_gpu` engines on one GPU hold a copy each.
    On a GPU build without -ngl (`gpu_backend`, `ngl` None) llama.cpp offloads every layer, so they live on the
    GPU, with the KL-divergence's base log-probabilities (`logits`); -ngl 0 keeps them on the host."""
    files = sum(p.stat().st_size for p in [model, *candidates.values()])
    on_gpu = bool(gpus) or (gpu_backend if ngl is None else ngl > 0)
    kld = kld_device_bytes(logits) if on_gpu else 0
    own = ENGINE_GPU_BYTES if on_gpu else 0
    engines = max(1, engines_per_gpu) if on_gpu else 1
    gpu_free, gpu = None, None
    if on_gpu:
        free = {g: gpu_available(g) for g in gpus} if gpus else {None: gpu_available()}
        known = {g: f for g, f in free.items() if f is not None}
        if known:
            gpu = min(known, key=lambda g: known[g])
            gpu_free = known[gpu]
    return MemoryPlan(host_bytes=0 if on_gpu else files, gpu_bytes=(files + kld + own) * engines if on_gpu else 0,
                      host_free=host_available(), gpu_free=gpu_free, gpu=gpu, n_gpus=max(1, len(gpus)),
                      kld_bytes=kld, engine_bytes=own, engines_per_gpu=engines)


def check_memory(plan: MemoryPlan) -> None:
    """Refuse, with the numbers, a scan whose model and candidates cannot fit where they would live."""
    if plan.host_free is not None and plan.host_bytes + HOST_MARGIN > plan.host_free:
        raise EngineError(f"the engine needs {plan.host_bytes / 1e9:.2f} GB of host memory for the model and its "
                          f"candidates and {plan.host_free / 1e9:.2f} GB are available (1 GB kept free); scan fewer "
                          "types, or use --no-engine (one assembled file at a time)")
    if plan.gpu_free is not None and plan.gpu_bytes + HOST_MARGIN > plan.gpu_free:
        engines = f" ({plan.engines_per_gpu} engines)" if plan.engines_per_gpu > 1 else ""
        raise EngineError(f"the engine needs {plan.gpu_bytes / 1e9:.2f} GB of GPU memory for the model and its "
                          f"candidates{engines}{' on each GPU' if plan.n_gpus > 1 else ''} and "
                          f"{'the GPU' if plan.gpu is None else 'GPU ' + plan.gpu} has {plan.gpu_free / 1e9:.2f} GB "
                          "free (1 GB kept free)")


def resolve_gpus(spec: str) -> list[str]:
    """`--gpus`: "all" (every GPU CUDA_VISIBLE_DEVICES or nvidia-smi shows) or a comma-separated list of ids as
    CUDA_VISIBLE_DEVICES takes them, each one of those visible."""
    visible = visible_gpus()
    if not visible:
        raise EngineError(f"--gpus {spec}: no GPU is visible (CUDA_VISIBLE_DEVICES, nvidia-smi)")
    gpus = visible if spec.strip() == "all" else [g.strip() for g in spec.split(",") if g.strip()]
    unknown = [g for g in gpus if g not in visible]
    if unknown or len(set(gpus)) != len(gpus):
        bad = f"not visible: {', '.join(unknown)}" if unknown else "a GPU named twice"
        raise EngineError(f"--gpus {spec}: {bad} (visible GPUs: {', '.join(visible) or 'none'})")
    return gpus


def engine_workers(backend: str, jobs: int | None, gpus: str | None, *, engine: bool,
                   ray: bool) -> tuple[int | None, list[str]]:
    """How many engines measure at once (`--jobs`, or one per `--gpus` GPU) and on which GPUs, refusing
    combinations that disagree; None workers: Ray decides (one actor per GPU of the cluster, or 1)."""
    if jobs is not None and jobs < 1:
        raise EngineError(f"--jobs must be at least 1, got {jobs}")
    if (gpus or ray) and not engine:
        raise EngineError(f"{'--gpus' if gpus else '--executor ray'} shards the evaluation engine's variants; "
                          "it cannot be used with --no-engine")
    if gpus is None:
        return (jobs if ray else jobs or 1), []
    if ray:
        raise EngineError("--gpus is for engines on this machine; on Ray each actor asks for one GPU (--jobs actors)")
    if backend == "cpu":
        raise EngineError("--gpus runs an engine per GPU, and this build's backend is cpu; use --backend cuda")
    listed = resolve_gpus(gpus)
    if jobs is not None and jobs != len(listed):
        raise EngineError(f"--gpus {gpus} runs {len(listed)} engines, one per GPU, and --jobs {jobs} disagrees; "
                          "leave --jobs out")
    return len(listed), listed


Answer = tuple[tool.VariantOutcome, str, float, str]  # outcome, its output, wall seconds, the engine's start-up output


class Engines:
    """Engines started from one argv, one per thread that measures, each started on first use and restarted
    (once per variant) after a crash; with `gpus`, each thread's engine sees only its own GPU."""

    def __init__(self, args: list[str], gpus: Sequence[str] = ()):
        self.args = args
        self._free_gpus = list(gpus)
        self._local = threading.local()
        self._all: list[tool.Engine] = []
        self._lock = threading.Lock()

    def _env(self) -> dict[str, str] | None:
        if not hasattr(self._local, "env"):
            with self._lock:  # a thread takes a GPU on its first variant and keeps it across restarts
                gpu = self._free_gpus.pop(0) if self._free_gpus else None
            self._local.env = None if gpu is None else {"CUDA_VISIBLE_DEVICES": gpu}
        return self._local.env

    def _engine(self) -> tool.Engine:
        eng = getattr(self._local, "engine", None)
        if eng is None or eng.proc is None:
            eng = tool.Engine(self.args, env=self._env())
            with self._lock:
                self._all.append(eng)
            eng.start()
            self._local.engine = eng
        return eng

    def evaluate(self, label: str, tensors: Mapping[str, str], kv_args: list[str],
                 kv_env: Mapping[str, str]) -> Answer:
        """One variant; an engine that crashes is restarted and the variant measured again, once."""
        for attempt in (1, 2):
            eng = self._engine()
            try:
                return (*eng.evaluate(label, tensors, kv_args, kv_env), eng.startup_output)
            except tool.EngineCrashed as exc:
                eng.close()
                if attempt == 2:
                    raise
                log.warning("%s; restarting the engine", str(exc).splitlines()[0])
        raise AssertionError("unreachable")

    def close(self) -> None:
        with self._lock:
            engines, self._all = self._all, []
        for eng in engines:
            eng.close()


class EnginePool(Protocol):
    """What measures a session's variants: `Engines` here, or engines elsewhere (studies/engine_ray.py)."""

    def evaluate(self, label: str, tensors: Mapping[str, str], kv_args: list[str],
                 kv_env: Mapping[str, str]) -> Answer: ...

    def close(self) -> None: ...


# Engines elsewhere, made from the engine's argv and its memory plan (checked where they run)
RemoteEngines = Callable[[list[str], Callable[[], MemoryPlan]], EnginePool]


class EngineSession:
    """The engines of one scan (one per thread that measures, see `Engines`) and the filing of their answers."""

    def __init__(self, build: Build, model: Path, info: ModelInfo, logits: Path, candidates: Mapping[str, Path], *,
                 ctx: int, threads: int | None = None, ngl: int | None = None, gpus: Sequence[str] = (),
                 remote: RemoteEngines | None = None, note: Callable[[str], None] | None = None,
                 engines_per_gpu: int = 1):
        self.build, self.model, self.info, self.logits = build, model, info, logits
        self.args = tool.argv(build.tool("llama-perplexity"), model, logits, candidates, ctx=ctx, threads=threads,
                              ngl=ngl)
        self.engines: EnginePool
        plan = partial(memory_plan, model, dict(candidates), ngl, tuple(gpus),
                       gpu_backend=getattr(build, "backend", "cpu") != "cpu", logits=logits,
                       engines_per_gpu=1 if gpus or remote is not None else engines_per_gpu)
        if remote is not None:
            self.engines = remote(self.args, plan)
            return
        said = plan()
        if note:
            note(said.describe())
        log.info(said.describe())
        check_memory(said)
        self.engines = Engines(self.args, gpus)

    def evaluate(self, label: str, tensors: Mapping[str, str], kv: KvConfig) -> tuple[tool.VariantOutcome, str, float]:
        """One variant's outcome, the engine's output for it and its wall seconds."""
        return self.engines.evaluate(label, tensors, kv.argv(), kv.env())[:3]

    def measure(self, store: Store, *, label: str, study: str | None, tensors: Mapping[str, str], kv: KvConfig,
                corpus: Path, record_model: Path, base: Path, base_sha256: str,
                annotations: dict | None = None) -> int:
        """Measure and file one variant (kind "kld", like `measure_kld`: `base` is the model whose logits it is
        compared with, filed as base_model and base_model_sha256); the result id."""
        outcome, text, seconds, startup = self.engines.evaluate(label, tensors, kv.argv(), kv.env())
        if not outcome.ok:
            raise EngineError(f"the engine refused {label}: {outcome.error}")
        result = outcome.result
        metrics = asdict(result)
        metrics.update(base_model_sha256=base_sha256, base_model=str(base), base_logits=str(self.logits),
                       logits_key=self.logits.stem, engine=True, engine_tensors=dict(tensors), kld_on=outcome.kld_on,
                       **(annotations or {}))
        return record(store, kind="kld", label=label, model=record_model, build=self.build, kv=kv,
                      command=self.args, metrics=metrics, wall_seconds=seconds, study=study, corpus=corpus,
                      ctx=result.n_ctx, chunks=result.n_chunks, info=self.info, tool_output=startup + text)

    def close(self) -> None:
        self.engines.close()
