"""Prefill and decode speed per KV configuration and depth (llama-bench -o json)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from lacq.errors import LacqError
from lacq.llama.build import Build
from lacq.llama.tools import bench
from lacq.measure.common import Progress, prepare_kv, record
from lacq.model.info import ModelInfo
from lacq.plan.kv.config import KvConfig
from lacq.results.store import Store


@dataclass(frozen=True)
class BenchOutcome:
    rows: tuple  # bench.BenchRow
    result_id: int
    seconds: float


def measure_bench(build: Build, store: Store, model: Path, info: ModelInfo, kv: KvConfig, *, pp: int = 512,
                  tg: int = 128, depths: tuple[int, ...] = (0,), repetitions: int = 5, threads: int | None = None,
                  ngl: int | None = None, label: str | None = None, study: str | None = None,
                  progress: Progress | None = None) -> BenchOutcome:
    kv = prepare_kv(build, kv, info)
    for d in depths:
        if d < 0:
            raise LacqError(f"depth {d} must be 0 or more")
        if info.n_ctx_train and d + max(pp, tg) > info.n_ctx_train:
            raise LacqError(f"depth {d} + {max(pp, tg)} tokens is longer than the model supports "
                            f"({info.n_ctx_train} tokens)")
    args = bench.argv(build.tool("llama-bench"), model, pp=pp, tg=tg, depths=depths, repetitions=repetitions,
                      threads=threads, ngl=ngl, kv_args=kv.argv())
    def on_line(line: str) -> None:
        if progress and (step := bench.progress_of(line)):
            progress((step[0] - 1) / step[1], f"test {step[0]}/{step[1]}")

    run, rows = bench.run(args, env=kv.env(), on_line=on_line)
    if progress:
        progress(1.0, "done")
    metrics = {"rows": [asdict(r) for r in rows], "device": rows[0].device, "backends": rows[0].backends,
               "build_key": build.key}
    rid = record(store, kind="bench", label=label or f"{model.name} {kv.label()}", model=model, build=build,
                 kv=kv, command=list(run.argv), metrics=metrics, wall_seconds=run.seconds, study=study, info=info,
                 tool_output=run.output)
    return BenchOutcome(rows, rid, run.seconds)
