"""KL-divergence of a model against its base (llama-perplexity --kl-divergence).

The base's logits are made once per (base, corpus, ctx, chunks, build) and
cached; each measured model is then compared on exactly the same tokens.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from lacq import paths
from lacq.corpus import check_length
from lacq.errors import LacqError
from lacq.fsutil import atomic_output, canonical_hash
from lacq.llama.build import Build
from lacq.llama.tools import kld, perplexity
from lacq.measure.common import Progress, check_context, prepare_kv, record
from lacq.model.info import ModelInfo
from lacq.model.tokenizer import tokenizer_fingerprint
from lacq.plan.kv.config import KvConfig
from lacq.results.store import Store

DISK_MARGIN = 1 << 30  # keep a GiB free beyond the logits file


@dataclass(frozen=True)
class KldOutcome:
    result: kld.KldResult
    result_id: int
    logits: Path
    logits_cached: bool
    seconds: float


def check_same_model(base_info: ModelInfo, info: ModelInfo, base: Path, model: Path) -> None:
    """The base may differ from the evaluated model only in quantization."""
    for what in ("architecture", "n_blocks", "n_embd", "n_vocab"):
        a, b = getattr(base_info, what), getattr(info, what)
        if a != b:
            raise LacqError(f"{model.name} is not a quantization of {base.name}: {what} {b} vs {a} in the base")
    fa, fb = tokenizer_fingerprint(base), tokenizer_fingerprint(model)
    diff = [k for k in fa if fa[k] != fb[k]]
    if diff:
        raise LacqError(f"{model.name} and the base {base.name} tokenize differently ({', '.join(diff)} differ); "
                        "KL-divergence needs the same vocabulary and tokenizer")


def check_logits_matches(header: kld.LogitsHeader, logits: Path, info: ModelInfo) -> None:
    if info.n_vocab is not None and header.n_vocab != info.n_vocab:
        raise LacqError(f"logits file {logits} was made with a vocabulary of {header.n_vocab} tokens; "
                        f"{Path(info.path).name} has {info.n_vocab}")
    size = logits.stat().st_size
    if size != header.expected_bytes:
        raise LacqError(f"logits file {logits} is {size:,} bytes; its header ({header.n_chunk} chunks of "
                        f"{header.n_ctx}, vocabulary {header.n_vocab}) needs {header.expected_bytes:,}: truncated?")


MIN_KLD_TOKENS = 100  # llama-perplexity prints no KL-divergence statistics below this many scored tokens


def check_kld_tokens(ctx: int, chunks: int) -> None:
    """llama-perplexity scores the second half of each chunk and prints KLD statistics only over at least
    MIN_KLD_TOKENS tokens (tools/perplexity/perplexity.cpp): refuse fewer before any work."""
    scored = chunks * (ctx - 1 - ctx // 2)
    if scored < MIN_KLD_TOKENS:
        raise LacqError(f"{chunks} chunk(s) of {ctx} tokens score {scored} tokens (the second half of each chunk); "
                        f"llama-perplexity gives KL-divergence statistics from {MIN_KLD_TOKENS} on: use more --chunks "
                        "or a longer -c")


def base_logits(build: Build, store: Store, base: Path, base_info: ModelInfo, corpus: Path, *, ctx: int,
                chunks: int, threads: int | None = None, ngl: int | None = None,
                progress: Progress | None = None) -> tuple[Path, bool]:
    """The base model's logits file for (base, corpus, ctx, chunks, build), made once and cached."""
    check_kld_tokens(ctx, chunks)
    key = canonical_hash({"kind": "kld-base-logits", "base": store.sha256(base), "corpus": store.sha256(corpus),
                          "ctx": ctx, "chunks": chunks, "build": build.key})
    cached = store.cache.artifact(key)
    if cached is not None:
        return cached, True
    out = paths.sub("logits") / f"{key[:24]}.logits"
    if base_info.n_vocab is None:
        raise LacqError(f"{base}: cannot tell the vocabulary size, so not the size of its logits file")
    need = kld.logits_file_bytes(ctx, base_info.n_vocab, chunks)
    free = shutil.disk_usage(out.parent).free
    if need + DISK_MARGIN > free:
        raise LacqError(f"the base logits for {chunks} chunks of {ctx} tokens take {need / 1e6:,.0f} MB "
                        f"({chunks}×{ctx - 1 - ctx // 2} tokens × vocabulary {base_info.n_vocab} × 2 bytes); "
                        f"{out.parent} has {free / 1e6:,.0f} MB free. Use fewer --chunks or free space")
    check_length(corpus, chunks, ctx)
    with atomic_output(out) as part:
        args = kld.base_argv(build.tool("llama-perplexity"), base, corpus, part, ctx=ctx, chunks=chunks,
                             threads=threads, ngl=ngl)

        def on_line(line: str) -> None:
            if progress and line.startswith("["):
                progress(min(line.count(",") / chunks, 1.0), "base logits")

        run, _ = perplexity.run(args, on_line=on_line)
        kld.check_base_run(run.output)
        header = kld.read_logits_header(part)
        if header.n_chunk != chunks:
            raise LacqError(f"the corpus gives only {header.n_chunk} chunks of {ctx} tokens, not {chunks}; "
                            "use fewer --chunks")
        check_logits_matches(header, part, base_info)
    store.cache.record_artifact(key, out, {"base": str(base), "ctx": ctx, "chunks": chunks})
    return out, False


def check_kld_run(build: Build, kv: KvConfig, ctx: int, model: Path, info: ModelInfo, base: Path,
                  base_info: ModelInfo, allow_long_context: bool = False) -> KvConfig:
    """What every KLD run checks before it runs (a process of its own or an engine's variant): both models take
    the context, the KV configuration runs with this build and model, the base is the model's parent. The KV
    configuration prepared for the run."""
    for i in (info, base_info):
        check_context(ctx, i, allow_long_context)
    kv = prepare_kv(build, kv, info)
    check_same_model(base_info, info, base, model)
    return kv


def checked_logits_header(logits: Path, info: ModelInfo) -> kld.LogitsHeader:
    """The base logits file's header, refused where it does not fit `info`'s model."""
    header = kld.read_logits_header(logits)
    check_logits_matches(header, logits, info)
    return header


def measure_kld(build: Build, store: Store, model: Path, info: ModelInfo, base: Path, base_info: ModelInfo,
                kv: KvConfig, corpus: Path, *, ctx: int = 512, chunks: int = 20, threads: int | None = None,
                ngl: int | None = None, label: str | None = None, study: str | None = None,
                recipe: str | None = None, plan_hash: str | None = None, progress: Progress | None = None,
                annotations: dict | None = None, allow_long_context: bool = False,
                logits: Path | None = None) -> KldOutcome:
    """KLD of `model` against `base` on the base's cached logits; `annotations` are stored beside the
    metrics (a verification stores the KLD it predicted). `logits` gives the base's logits file
    instead (made elsewhere, e.g. on another backend: `lacq parity --base-logits`); its chunk count
    and context then decide the run's."""
    if not corpus.exists():
        raise LacqError(f"corpus {corpus} does not exist")
    kv = check_kld_run(build, kv, ctx, model, info, base, base_info, allow_long_context)
    t0 = time.monotonic()
    if logits is not None:
        if not logits.is_file():
            raise LacqError(f"base logits file {logits} does not exist")
        cached = True
    else:
        logits, cached = base_logits(build, store, base, base_info, corpus, ctx=ctx, chunks=chunks,
                                     threads=threads, ngl=ngl,
                                     progress=(lambda f, d: progress(0.5 * f, d)) if progress else None)
    header = checked_logits_header(logits, info)
    args = kld.argv(build.tool("llama-perplexity"), model, logits, ctx=header.n_ctx, threads=threads, ngl=ngl,
                    kv_args=kv.argv())
    done = [0]

    def on_line(line: str) -> None:
        if progress and line[:5].strip().isdigit():
            done[0] += 1
            progress(0.5 + 0.5 * min(done[0] / header.n_chunk, 1.0), f"chunk {done[0]}/{header.n_chunk}")

    run, result = kld.run(args, env=kv.env(), on_line=on_line)
    metrics = asdict(result)
    metrics.update(base_model_sha256=store.sha256(base), base_model=str(base), logits_key=logits.stem,
                   **(annotations or {}))
    rid = record(store, kind="kld", label=label or f"{model.name} {kv.label()}", model=model, build=build, kv=kv,
                 command=list(run.argv), metrics=metrics, wall_seconds=run.seconds, study=study, recipe=recipe,
                 plan_hash=plan_hash, corpus=corpus, ctx=header.n_ctx, chunks=header.n_chunk, info=info,
                 tool_output=run.output)
    return KldOutcome(result, rid, logits, cached, time.monotonic() - t0)
