"""Perplexity of a model and KV configuration on a corpus (llama-perplexity)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from lacq.corpus import check_length
from lacq.errors import LacqError
from lacq.llama.build import Build
from lacq.llama.tools import perplexity
from lacq.measure.common import Progress, check_context, prepare_kv, record
from lacq.model.info import ModelInfo
from lacq.plan.kv.config import KvConfig
from lacq.results.store import Store


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
                allow_long_context: bool = False) -> PplOutcome:
    if not corpus.exists():
        raise LacqError(f"corpus {corpus} does not exist")
    check_context(ctx, info, allow_long_context)
    check_length(corpus, chunks, ctx)
    kv = prepare_kv(build, kv, info)
    k_bpv, v_bpv = kv.bits_per_value(info, ctx)  # the patch's own count, where it reports one, wins
    args = perplexity.argv(build.tool("llama-perplexity"), model, corpus, ctx=ctx, chunks=chunks,
                           threads=threads, ngl=ngl, kv_args=kv.argv())
    expected = chunks or 0

    def on_line(line: str) -> None:
        if progress and line.startswith("[") and expected:
            n = line.count(",")
            progress(min(n / expected, 1.0), f"chunk {n}/{expected}")

    run, result = perplexity.run(args, env=kv.env(), on_line=on_line)
    if chunks and result.n_chunks is not None and result.n_chunks < chunks:  # the tool runs what the text gives
        raise LacqError(f"{corpus.name} gives only {result.n_chunks} chunks of {ctx} tokens, not {chunks}; "
                        "use fewer --chunks or a longer text")
    if result.k_bits_per_value is not None:  # measured by the patch from allocated bytes
        k_bpv, v_bpv = result.k_bits_per_value, result.v_bits_per_value
    metrics = asdict(result)
    metrics.update(k_bits_per_value=k_bpv, v_bits_per_value=v_bpv)
    rid = record(store, kind="ppl", label=label or f"{model.name} {kv.label()}", model=model, build=build, kv=kv,
                 command=list(run.argv), metrics=metrics, wall_seconds=run.seconds, study=study, recipe=recipe,
                 plan_hash=plan_hash, corpus=corpus, ctx=ctx, chunks=result.n_chunks or chunks, info=info,
                 tool_output=run.output)
    return PplOutcome(result, rid, run.seconds, k_bpv, v_bpv)
