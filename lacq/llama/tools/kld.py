"""llama-perplexity in KL-divergence mode: argv builders, logits-file header, parser.

Two runs: `--kl-divergence-base FILE` on the base model saves its log-probs
(and prints the base's perplexity, parsed by tools.perplexity), then
`--kl-divergence` on each configuration compares against that file. The
second run takes tokens, context and chunk count from the file.

llama-perplexity reports a bad logits file on an `E kl_divergence:` line and
still exits 0 (inconsistent vocabulary, wrong magic, short file), so the parser
treats any such line as a failure.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

from lacq.errors import ToolError
from lacq.llama.tools.base import LineHook, ToolRun, message_lines, run_tool, strip_prefix, thread_gpu_args

MAGIC = b"_logits_"
# "_logits_", n_ctx (u32), n_vocab (i32), n_chunk (i32); then n_chunk*n_ctx int32 tokens,
# then per chunk (n_ctx - 1 - n_ctx/2) rows of nv uint16 (tools/perplexity/perplexity.cpp).
_HEADER = struct.Struct("<8sIii")

_KLD_ERROR = re.compile(r"^E (kl_divergence|perplexity): (.*)$")
_VALUE = r"(-?[\d.]+|-?nan|-?inf)"
_PM = _VALUE + r"\s*±\s*" + _VALUE
# "Mean PPL(Q)                   :  32.506039 ±   8.379839" and the other statistics lines
_STATS = {
    "ppl_q": re.compile(r"^Mean PPL\(Q\)\s*:\s*" + _PM),
    "ppl_base": re.compile(r"^Mean PPL\(base\)\s*:\s*" + _PM),
    "ln_ppl_ratio": re.compile(r"^Mean ln\(PPL\(Q\)/PPL\(base\)\)\s*:\s*" + _PM),
    "ppl_ratio": re.compile(r"^Mean PPL\(Q\)/PPL\(base\)\s*:\s*" + _PM),
    "ppl_diff": re.compile(r"^Mean PPL\(Q\)-PPL\(base\)\s*:\s*" + _PM),
    "kld_mean": re.compile(r"^Mean\s+KLD:\s*" + _PM),
    "dp_mean": re.compile(r"^Mean\s+Δp:\s*" + _PM + r"\s*%"),
    "dp_rms": re.compile(r"^RMS Δp\s*:\s*" + _PM + r"\s*%"),
    "same_top_p": re.compile(r"^Same top p:\s*" + _PM + r"\s*%"),
}
_COR = re.compile(r"^Cor\(ln\(PPL\(Q\)\), ln\(PPL\(base\)\)\):\s*" + _VALUE + "%")
# "Maximum KLD:   0.281443", "99.9%   KLD: ...", " 5.0%   Δp: -3.988%", "Median  KLD: ..."
_QUANTILE = re.compile(r"^\s*(Maximum|Minimum|Median|[\d.]+%)\s+(KLD|Δp):\s*" + _VALUE + r"%?\s*$")
_CHUNK_ROW = re.compile(r"^\s*(\d+)\s+" + _PM + r"\s+" + _PM + r"\s+" + _PM + r"\s+" + _PM + r"\s*%\s+" + _PM + r"\s*%")
_COMPUTING = re.compile(r"kl_divergence: computing over (\d+) chunks, n_ctx=(\d+)")


def _f(s: str) -> float:
    return float(s.replace("-nan", "nan"))


def _quantile_key(name: str) -> str:
    """'99.9%' -> 'p99.9', 'Maximum' -> 'max', 'Median' -> 'p50'."""
    return {"Maximum": "max", "Minimum": "min", "Median": "p50"}.get(name) or "p" + name.rstrip("%").rstrip("0").rstrip(".")


@dataclass(frozen=True)
class KldChunk:
    chunk: int
    ppl: float
    ln_ppl_ratio: float
    kld: float
    dp_rms_pct: float
    same_top_p_pct: float


@dataclass(frozen=True)
class KldResult:
    kld_mean: float
    kld_mean_error: float
    kld_quantiles: dict[str, float]  # max, p99.9, p99, p95, p90, p50, p10, p5, p1, p0.1, min
    dp_mean_pct: float
    dp_mean_error_pct: float
    dp_quantiles_pct: dict[str, float]  # max, p99.9 ... p0.1, min (percent)
    dp_rms_pct: float
    dp_rms_error_pct: float
    same_top_p_pct: float
    same_top_p_error_pct: float
    ppl_q: float
    ppl_q_error: float
    ppl_base: float
    ppl_base_error: float
    ppl_ratio: float
    ppl_ratio_error: float
    ln_ppl_ratio: float
    ln_ppl_ratio_error: float
    ppl_diff: float
    ppl_diff_error: float
    ln_ppl_correlation_pct: float | None
    n_chunks: int | None = None
    n_ctx: int | None = None
    chunks: tuple[KldChunk, ...] = field(default=())


def errors(text: str) -> list[str]:
    """The `E kl_divergence:` / `E perplexity:` lines, without the log prefix."""
    out = []
    for line in text.splitlines():
        if m := _KLD_ERROR.match(line):
            out.append(f"{m.group(1)}: {m.group(2)}")
    return out


def parse(text: str) -> KldResult:
    """Parse a `--kl-divergence` run. Any error line, or missing statistics, raises ToolError."""
    errs = errors(text)
    if errs:
        raise ToolError("llama-perplexity could not compare against the base logits:\n" + "\n".join(errs[-4:]))
    stats: dict[str, tuple[float, float]] = {}
    kq: dict[str, float] = {}
    dq: dict[str, float] = {}
    chunks: list[KldChunk] = []
    cor = None
    n_chunks = n_ctx = None
    for line in message_lines(text):
        line = line.rstrip()
        for key, rx in _STATS.items():
            if m := rx.match(line):
                stats[key] = (_f(m.group(1)), _f(m.group(2)))
                break
        else:
            if m := _QUANTILE.match(line):
                (kq if m.group(2) == "KLD" else dq)[_quantile_key(m.group(1))] = _f(m.group(3))
            elif m := _COR.match(line):
                cor = _f(m.group(1))
            elif m := _CHUNK_ROW.match(line):
                g = [_f(x) for x in m.groups()[1:]]
                chunks.append(KldChunk(int(m.group(1)), g[0], g[2], g[4], g[6], g[8]))
            elif m := _COMPUTING.search(line):
                n_chunks, n_ctx = int(m.group(1)), int(m.group(2))
    missing = [k for k in _STATS if k not in stats]
    if missing:
        raise ToolError(f"llama-perplexity --kl-divergence printed no {', '.join(missing)} statistics; "
                        "is this the pinned llama.cpp?")
    return KldResult(
        kld_mean=stats["kld_mean"][0], kld_mean_error=stats["kld_mean"][1], kld_quantiles=kq,
        dp_mean_pct=stats["dp_mean"][0], dp_mean_error_pct=stats["dp_mean"][1], dp_quantiles_pct=dq,
        dp_rms_pct=stats["dp_rms"][0], dp_rms_error_pct=stats["dp_rms"][1],
        same_top_p_pct=stats["same_top_p"][0], same_top_p_error_pct=stats["same_top_p"][1],
        ppl_q=stats["ppl_q"][0], ppl_q_error=stats["ppl_q"][1],
        ppl_base=stats["ppl_base"][0], ppl_base_error=stats["ppl_base"][1],
        ppl_ratio=stats["ppl_ratio"][0], ppl_ratio_error=stats["ppl_ratio"][1],
        ln_ppl_ratio=stats["ln_ppl_ratio"][0], ln_ppl_ratio_error=stats["ln_ppl_ratio"][1],
        ppl_diff=stats["ppl_diff"][0], ppl_diff_error=stats["ppl_diff"][1],
        ln_ppl_correlation_pct=cor, n_chunks=n_chunks, n_ctx=n_ctx, chunks=tuple(chunks),
    )


# ---------------------------------------------------------------- logits file
@dataclass(frozen=True)
class LogitsHeader:
    n_ctx: int
    n_vocab: int
    n_chunk: int

    @property
    def expected_bytes(self) -> int:
        return logits_file_bytes(self.n_ctx, self.n_vocab, self.n_chunk)


def logits_file_bytes(n_ctx: int, n_vocab: int, n_chunk: int) -> int:
    """Exact size of a --kl-divergence-base file (mirrors perplexity.cpp's writer)."""
    nv = 2 * ((n_vocab + 1) // 2) + 4
    scored = n_ctx - 1 - n_ctx // 2
    return _HEADER.size + n_chunk * n_ctx * 4 + n_chunk * scored * nv * 2


def parse_logits_header(data: bytes) -> LogitsHeader:
    if len(data) < _HEADER.size or data[:8] != MAGIC:
        raise ValueError("not a llama-perplexity logits file (no _logits_ header)")
    _, n_ctx, n_vocab, n_chunk = _HEADER.unpack_from(data)
    if n_ctx <= 0 or n_vocab <= 0 or n_chunk <= 0:
        raise ValueError(f"corrupt logits header (n_ctx={n_ctx}, n_vocab={n_vocab}, n_chunk={n_chunk})")
    return LogitsHeader(n_ctx, n_vocab, n_chunk)


def read_logits_header(path: Path) -> LogitsHeader:
    with open(path, "rb") as f:
        return parse_logits_header(f.read(_HEADER.size))


# ---------------------------------------------------------------- argv / run
def base_argv(binary: Path, base_model: Path, corpus: Path, logits_out: Path, *, ctx: int, chunks: int | None,
              threads: int | None = None, ngl: int | None = None) -> list[str]:
    args = [str(binary), "-m", str(base_model), "-f", str(corpus), "-c", str(ctx),
            "-lv", "4", "--no-log-timestamps", "--kl-divergence-base", str(logits_out)]
    if chunks:
        args += ["--chunks", str(chunks)]
    return args + thread_gpu_args(threads, ngl)


def argv(binary: Path, model: Path, logits: Path, *, ctx: int, threads: int | None = None,
         ngl: int | None = None, kv_args: list[str] = ()) -> list[str]:
    # -c must be at least the file's n_ctx (llama-perplexity only warns otherwise).
    args = [str(binary), "-m", str(model), "-c", str(ctx), "-lv", "4", "--no-log-timestamps",
            "--kl-divergence-base", str(logits), "--kl-divergence"]
    return args + thread_gpu_args(threads, ngl) + list(kv_args)


def run(args: list[str], *, env: dict | None = None, log_path: Path | None = None,
        on_line: LineHook | None = None) -> tuple[ToolRun, KldResult]:
    result = run_tool(args, env=env, log_path=log_path, on_line=on_line, what="llama-perplexity --kl-divergence")
    return result, parse(result.output)


def check_base_run(text: str) -> None:
    """A base run that logged an error (e.g. cannot open the logits file) still exits 0."""
    errs = [strip_prefix(l) for l in text.splitlines() if l.startswith("E ")]
    if errs:
        raise ToolError("llama-perplexity could not save the base logits:\n" + "\n".join(errs[-4:]))
