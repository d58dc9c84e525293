"""Jobs for `lacq niah`, `lacq kld` and `lacq bench`, and the tables of their stored results.

Like jobs.py: each job takes a Build and plain values, checks its inputs before
long work, reports progress through a callback, stores one result and returns
a frozen dataclass.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import pandas as pd

from lacq import paths
from lacq.llama.build import Build
from lacq.errors import LacqError
from lacq.fsutil import atomic_output, canonical_hash
from lacq.model.info import ModelInfo
from lacq.quantize import prepare_kv
from lacq.plan.kv.config import KvConfig
from lacq.results.store import Result, Store, latest_by_label
from lacq.llama.tools import bench, kld, perplexity

log = logging.getLogger(__name__)

Progress = Callable[[float, str], None]
DISK_MARGIN = 1 << 30  # keep a GiB free beyond the logits file


def parse_kv_label(text: str, fa: str = "auto", boundary_type: str = "q8_0") -> tuple[str, KvConfig]:
    """'K/V' or 'K/V+bN' (V of the first and last N KV layers at boundary_type, by ordinal), as bench scripts use."""
    from lacq.plan.kv.config import boundary
    kv, _, pol = text.strip().partition("+")
    k, _, v = kv.partition("/")
    if pol and not (pol.startswith("b") and pol[1:].isdigit()):
        raise LacqError(f"bad configuration {text!r}; expected K/V or K/V+bN, e.g. q8_0/q4_0+b2")
    over = boundary(int(pol[1:]), boundary_type) if pol else ()
    return text.strip(), KvConfig(k, v or k, fa, (), over, policy_name=f"boundary {pol[1:]}" if pol else None)


def results_header(title: str, build: Build, argv: list[str]) -> list[str]:
    """Markdown lines heading a bench table: title, exact command, time, host, build."""
    import datetime
    import platform
    import shlex
    return [f"### {title}", "", f"`{' '.join(shlex.quote(a) for a in argv)}`", "",
            f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, host {platform.node()}, "
            f"build {build.key} ({build.backend}; {', '.join(build.patches) or 'no patches'})", ""]


# ---------------------------------------------------------------- NIAH
@dataclass(frozen=True)
class NiahOutcome:
    trials: tuple  # niah.NiahTrial
    grid: dict  # (length, depth) -> (passed, run)
    result_id: int
    seconds: float
    runner: str


def measure_niah(build: Build, store: Store, model: Path, info: ModelInfo, kv: KvConfig, *,
                 lengths: list[int], depths: list[int], trials: int = 5, seed: int = 0,
                 haystack: Path | None = None, chat_template: str = "auto", runner: str = "bindings",
                 n_predict: int = 16, threads: int | None = None, ngl: int | None = None,
                 label: str | None = None, study: str | None = None, progress: Progress | None = None):
    from lacq.measure.niah import runners as niah
    kv = prepare_kv(build, kv, info)
    niah.check_lengths(lengths, info.n_ctx_train)
    niah.check_depths(depths)
    if trials < 1:
        raise niah.NiahError("--trials must be at least 1")
    haystack = Path(haystack) if haystack else paths.default_corpus()
    if not haystack.is_file():
        raise niah.NiahError(f"haystack {haystack} does not exist")
    niah.check_tokenizer(model)
    template = niah.resolve_template(chat_template, model)
    if runner == "bindings":
        run = niah.BindingsRunner(build, model, kv, threads=threads, ngl=ngl)
    elif runner == "completion":
        run = niah.CompletionRunner(build, model, kv, threads=threads, ngl=ngl)
    else:
        raise niah.NiahError(f"unknown runner {runner!r}; use bindings or completion")
    t0 = time.monotonic()
    cache = store.cache
    journal = niah.Journal(paths.sub("work") / "niah" / (canonical_hash({
        "niah_version": niah.NIAH_VERSION, "model": cache.sha256(model), "build": build.key, "kv": kv.to_dict(),
        "runner": run.name, "ngl": ngl, "haystack": cache.sha256(haystack), "template": [template.name,
        template.source], "seed": seed, "n_predict": n_predict})[:24] + ".jsonl"))
    total = len(lengths) * len(depths) * trials
    try:
        builder = niah.PromptBuilder(haystack.read_text(errors="replace"), template, run.count_tokens,
                                     seed=seed, n_predict=n_predict)
        for n in lengths:  # every length is checked before the first generation
            builder.check_fits(n)
        if progress:
            progress(0.0, f"resuming, {len(journal.done)} probes done before" if journal.done
                     else "building haystacks")
        results = niah.run_grid(run, builder, lengths, depths, trials, progress, journal)
    finally:
        run.close()
        if journal.path.exists() and len(journal.done) < total:
            log.warning("%d of %d probes are saved; the same command resumes from there",
                        len(journal.done), total)
    grid = niah.pass_rates(results)
    metrics = {
        "niah_version": niah.NIAH_VERSION, "runner": run.name, "lengths": lengths, "depths": depths,
        "trials": trials, "seed": seed, "template": template.name, "n_predict": n_predict,
        "needle": niah.NEEDLE, "question": niah.QUESTION,
        "grid": [{"length": l, "depth": d, "passed": p, "n": n} for (l, d), (p, n) in sorted(grid.items())],
        "pass_rate": sum(t.passed for t in results) / len(results),
        "results": [asdict(t) for t in results],
    }
    seconds = time.monotonic() - t0
    rid = store.add(kind="niah", label=label or f"{model.name} {kv.label()}", model=model,
                    build=build.provenance(), command=["niah", runner, str(haystack)], metrics=metrics, study=study,
                    kv=kv.to_dict(), corpus=haystack, ctx=max(lengths), chunks=None, env=kv.env(),
                    wall_seconds=seconds)
    journal.remove()
    return NiahOutcome(tuple(results), grid, rid, seconds, run.name)


def niah_grid_frame(metrics: dict) -> pd.DataFrame:
    """Depth rows × length columns of pass rates (0..1) from a stored NIAH result."""
    cells = {(c["depth"], c["length"]): c["passed"] / c["n"] for c in metrics["grid"]}
    depths = sorted({d for d, _ in cells})
    lengths = sorted({l for _, l in cells})
    return pd.DataFrame([[cells.get((d, l)) for l in lengths] for d in depths],
                        index=pd.Index(depths, name="depth %"), columns=pd.Index(lengths, name="context"))


def niah_summary_frame(results: list[Result]) -> pd.DataFrame:
    """Per configuration (latest NIAH result): overall pass rate and pass rate per context length.

    For `lacq report`: join on `configuration` to put a NIAH column beside PPL/KLD.
    """
    latest = latest_by_label(results, "niah")
    rows = []
    for r in latest.values():
        by_len: dict[int, list[int]] = {}
        for c in r.metrics["grid"]:
            p, n = by_len.setdefault(c["length"], [0, 0])
            by_len[c["length"]] = [p + c["passed"], n + c["n"]]
        rows.append({"configuration": r.label, "niah_pass_pct": 100 * r.metrics["pass_rate"],
                     "niah_by_length": " ".join(f"{l}:{p / n:.0%}" for l, (p, n) in sorted(by_len.items())),
                     "niah_trials": r.metrics["trials"]})
    return pd.DataFrame(rows, columns=["configuration", "niah_pass_pct", "niah_by_length", "niah_trials"])


def plot_niah(frames: dict[str, pd.DataFrame], out: Path) -> Path:
    """One heatmap per configuration, side by side."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    n = len(frames)
    fig, axes = plt.subplots(1, n, figsize=(3.2 * n + 1, 3.4), squeeze=False)
    for ax, (name, df) in zip(axes[0], frames.items()):
        im = ax.imshow(df.values.astype(float), vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        ax.set_xticks(range(len(df.columns)), [str(c) for c in df.columns])
        ax.set_yticks(range(len(df.index)), [f"{d}%" for d in df.index] if ax is axes[0][0] else [])
        ax.set_xlabel("context (tokens)")
        ax.set_title(name, fontsize=9)
        for i in range(df.shape[0]):
            for j in range(df.shape[1]):
                v = df.values[i, j]
                ax.text(j, i, "-" if v is None else f"{v:.0%}", ha="center", va="center", fontsize=8)
    axes[0][0].set_ylabel("needle depth")
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="pass rate")
    with atomic_output(out) as part:
        fig.savefig(part, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    return out


# ---------------------------------------------------------------- KLD
@dataclass(frozen=True)
class KldOutcome:
    result: kld.KldResult
    result_id: int
    logits: Path
    logits_cached: bool
    seconds: float


def tokenizer_fingerprint(model: Path) -> dict:
    """What must agree between a base and a quantized model for their logits to be comparable."""
    import gguf
    import hashlib
    reader = gguf.GGUFReader(model)
    out = {}
    for name in ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.bos_token_id",
                 "tokenizer.ggml.eos_token_id", "tokenizer.ggml.add_bos_token"):
        f = reader.fields.get(name)
        out[name] = f.contents() if f is not None else None
    h = hashlib.sha256()
    for name in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges"):
        f = reader.fields.get(name)
        if f is not None:
            for i in f.data:
                h.update(bytes(f.parts[i]))
                h.update(b"\0")
    out["tokens_sha256"] = h.hexdigest()
    return out


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


def base_logits(build: Build, store: Store, base: Path, base_info: ModelInfo, corpus: Path, *, ctx: int,
                chunks: int, threads: int | None = None, ngl: int | None = None,
                progress: Progress | None = None) -> tuple[Path, bool]:
    """The base model's logits file for (base, corpus, ctx, chunks, build), made once and cached."""
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


def measure_kld(build: Build, store: Store, model: Path, info: ModelInfo, base: Path, base_info: ModelInfo,
                kv: KvConfig, corpus: Path, *, ctx: int = 512, chunks: int = 20, threads: int | None = None,
                ngl: int | None = None, label: str | None = None, study: str | None = None,
                recipe: str | None = None, plan_hash: str | None = None,
                progress: Progress | None = None) -> KldOutcome:
    if not corpus.exists():
        raise LacqError(f"corpus {corpus} does not exist")
    kv = prepare_kv(build, kv, info)
    check_same_model(base_info, info, base, model)
    t0 = time.monotonic()
    logits, cached = base_logits(build, store, base, base_info, corpus, ctx=ctx, chunks=chunks, threads=threads,
                                 ngl=ngl, progress=(lambda f, d: progress(0.5 * f, d)) if progress else None)
    header = kld.read_logits_header(logits)
    check_logits_matches(header, logits, info)
    args = kld.argv(build.tool("llama-perplexity"), model, logits, ctx=header.n_ctx, threads=threads, ngl=ngl,
                    kv_args=kv.argv())
    done = [0]

    def on_line(line: str) -> None:
        if progress and line[:5].strip().isdigit():
            done[0] += 1
            progress(0.5 + 0.5 * min(done[0] / header.n_chunk, 1.0), f"chunk {done[0]}/{header.n_chunk}")

    run, result = kld.run(args, env=kv.env(), on_line=on_line)
    metrics = asdict(result)
    metrics.update(base_model_sha256=store.sha256(base), base_model=str(base), logits_key=logits.stem)
    rid = store.add(kind="kld", label=label or f"{model.name} {kv.label()}", model=model, build=build.provenance(),
                    command=list(run.argv), metrics=metrics, study=study, recipe=recipe, plan_hash=plan_hash,
                    kv=kv.to_dict(), corpus=corpus, ctx=header.n_ctx, chunks=header.n_chunk, env=kv.env(),
                    wall_seconds=run.seconds)
    return KldOutcome(result, rid, logits, cached, time.monotonic() - t0)


KLD_COLUMNS = {
    "configuration": "Configuration", "size_mb": "Size (MB)", "kld_mean": "Mean KLD", "kld_mean_error": "±",
    "kld_p99": "KLD 99%", "kld_max": "KLD max", "dp_rms_pct": "RMS Δp %", "same_top_p_pct": "Same top p %",
    "ppl_q": "PPL", "ppl_ratio": "PPL ratio",
}


def kld_frame(results: list[Result]) -> pd.DataFrame:
    latest = latest_by_label(results, "kld")
    rows = []
    for r in latest.values():
        m = r.metrics
        rows.append({"configuration": r.label, "size_mb": r.model_bytes / 1e6, "kld_mean": m["kld_mean"],
                     "kld_mean_error": m["kld_mean_error"], "kld_p99": m["kld_quantiles"].get("p99"),
                     "kld_max": m["kld_quantiles"].get("max"), "dp_rms_pct": m["dp_rms_pct"],
                     "same_top_p_pct": m["same_top_p_pct"], "ppl_q": m["ppl_q"], "ppl_ratio": m["ppl_ratio"],
                     "recipe": r.recipe})
    df = pd.DataFrame(rows, columns=list(KLD_COLUMNS) + ["recipe"])
    df = df.round({"kld_mean": 6, "kld_mean_error": 6, "kld_p99": 5, "kld_max": 4, "dp_rms_pct": 3,
                   "same_top_p_pct": 3, "ppl_q": 4, "ppl_ratio": 5})
    return df.sort_values("kld_mean").reset_index(drop=True)


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman's rank correlation (average ranks for ties)."""
    ra, rb = pd.Series(a).rank(), pd.Series(b).rank()
    return float(ra.corr(rb))


# ---------------------------------------------------------------- bench
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
    if progress:
        progress(0.0, kv.label())
    run, rows = bench.run(args, env=kv.env())
    metrics = {"rows": [asdict(r) for r in rows], "device": rows[0].device, "backends": rows[0].backends,
               "build_key": build.key}
    rid = store.add(kind="bench", label=label or f"{model.name} {kv.label()}", model=model, build=build.provenance(),
                    command=list(run.argv), metrics=metrics, study=study, kv=kv.to_dict(), env=kv.env(),
                    wall_seconds=run.seconds)
    return BenchOutcome(rows, rid, run.seconds)


BENCH_COLUMNS = {"configuration": "Configuration", "depth": "Depth", "pp_ts": "Prefill t/s", "pp_sd": "±",
                 "tg_ts": "Decode t/s", "tg_sd": "±", "device": "Device", "build_key": "Build"}


def bench_frame(results: list[Result]) -> pd.DataFrame:
    rows = {}
    for r in results:
        if r.kind != "bench":
            continue
        for b in r.metrics["rows"]:
            row = rows.setdefault((r.label, b["n_depth"]), {
                "configuration": r.label, "depth": b["n_depth"], "device": r.metrics.get("device"),
                "build_key": r.metrics.get("build_key")})
            kind = "pp" if b["n_prompt"] and not b["n_gen"] else "tg"
            row[f"{kind}_ts"], row[f"{kind}_sd"] = round(b["avg_ts"], 2), round(b["stddev_ts"], 2)
    return pd.DataFrame(list(rows.values()), columns=list(BENCH_COLUMNS))


def plot_bench(df: pd.DataFrame, out: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, col, sd, title in ((axes[0], "pp_ts", "pp_sd", "prefill"), (axes[1], "tg_ts", "tg_sd", "decode")):
        for name, g in df.groupby("configuration", sort=False):
            ax.errorbar(g["depth"], g[col], yerr=g[sd], marker="o", capsize=3, label=name)
        ax.set_xlabel("depth (tokens in the KV cache)")
        ax.set_ylabel("tokens/s")
        ax.set_title(title)
    axes[1].legend(fontsize=7)
    with atomic_output(out) as part:
        fig.savefig(part, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    return out


def emit_table(lines: list[str], out: Path | None) -> None:
    """Print a bench table and append it to `out` (bench/results/...), where given."""
    text = "\n".join(lines) + "\n"
    print(text)
    if out is None:
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "a") as f:
        f.write(text + "\n")


def run_script(main: Callable[[], None]) -> int:
    """Run a bench/ script's main: lacq's errors as one line and exit 1, Ctrl-C as exit 130."""
    import sys
    try:
        main()
    except LacqError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0
