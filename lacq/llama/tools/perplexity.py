"""llama-perplexity: argv builder, runner and parser."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from lacq.errors import ToolError
from lacq.llama.tools.base import FINAL_PPL, LineHook, ToolRun, error_lines, message_lines, run_tool, thread_gpu_args

_CHUNK = re.compile(r"\[(\d+)\]([\d.]+|nan|inf|-nan),")
_KV_BUF = re.compile(r"llama_kv_cache:\s+(\S+) KV buffer size =\s+([\d.]+) MiB")
_KV_SIZE = re.compile(r"llama_kv_cache: size =\s+([\d.]+) MiB \(\s*(\d+) cells,\s+(\d+) layers.*K \((\S+)\):\s+([\d.]+) MiB, V \((\S+)\):\s+([\d.]+) MiB")
_FA = re.compile(r"llama_context: flash_attn\s+=\s+(\S+)")
_PASS = re.compile(r"perplexity: ([\d.]+) seconds per pass")
_TOTAL = re.compile(r"llama_perf_context_print:\s+total time =\s+([\d.]+) ms / +(\d+) tokens")
_NCTX = re.compile(r"calculating perplexity over (\d+) chunks, n_ctx=(\d+), batch_size=(\d+), n_seq=(\d+)")
# Written by lacq's per-layer KV patch (patches/, "per-layer K/V types").
_KV_LAYER = re.compile(r"llama_kv_types: layer blk=(\d+) ord=(\d+) k=(\S+) v=(\S+)")
_KV_SUMMARY = re.compile(r"llama_kv_types: summary n_kv=(\d+) k_bits_per_value=([\d.]+) v_bits_per_value=([\d.]+)"
                         r" k_bytes=(\d+) v_bytes=(\d+)")


@dataclass(frozen=True)
class KvLayer:
    block: int
    ordinal: int
    k_type: str
    v_type: str


@dataclass(frozen=True)
class PerplexityResult:
    ppl: float
    ppl_error: float
    chunks: tuple[float, ...]
    n_ctx: int | None = None
    n_chunks: int | None = None
    flash_attn: str | None = None
    kv_buffer_mib: float | None = None
    k_type: str | None = None
    v_type: str | None = None
    k_mib: float | None = None
    v_mib: float | None = None
    kv_layers: tuple[KvLayer, ...] = ()
    k_bits_per_value: float | None = None
    v_bits_per_value: float | None = None
    seconds_per_pass: float | None = None
    total_ms: float | None = None


def _float(s: str) -> float:
    return float("nan") if s in ("nan", "-nan") else float(s)


def parse(text: str) -> PerplexityResult:
    final, chunks, values = None, [], {}
    layers: list[KvLayer] = []
    for line in message_lines(text):
        if m := FINAL_PPL.search(line):
            final = (_float(m.group(1)), _float(m.group(2)))
        elif line.startswith("[") and _CHUNK.match(line):
            chunks.extend(_float(v) for _, v in _CHUNK.findall(line))
        elif m := _KV_LAYER.search(line):
            layers.append(KvLayer(int(m.group(1)), int(m.group(2)), m.group(3), m.group(4)))
        elif m := _KV_SUMMARY.search(line):
            values["k_bpv"], values["v_bpv"] = float(m.group(2)), float(m.group(3))
        elif m := _KV_SIZE.search(line):
            # iSWA models print one size line per cache: add them up.
            for key, typ, mib in (("k", m.group(4), m.group(5)), ("v", m.group(6), m.group(7))):
                seen = values.get(f"{key}_type")
                values[f"{key}_type"] = typ if seen in (None, typ) else "mixed"
                values[f"{key}_mib"] = values.get(f"{key}_mib", 0.0) + float(mib)
        elif m := _KV_BUF.search(line):
            values["kv_mib"] = values.get("kv_mib", 0.0) + float(m.group(2))
        elif m := _FA.search(line):
            values["fa"] = m.group(1)
        elif m := _PASS.search(line):
            values["pass"] = float(m.group(1))
        elif m := _TOTAL.search(line):
            values["total"] = float(m.group(1))
        elif m := _NCTX.search(line):
            values["n_chunks"], values["n_ctx"] = int(m.group(1)), int(m.group(2))
    if final is None:
        errors = error_lines(text)
        why = "\n".join(errors[-4:]) or "(it printed no error; too few tokens for one chunk?)"
        raise ToolError(f"llama-perplexity finished without a final estimate:\n{why}")
    return PerplexityResult(
        ppl=final[0], ppl_error=final[1], chunks=tuple(chunks),
        n_ctx=values.get("n_ctx"), n_chunks=values.get("n_chunks"), flash_attn=values.get("fa"),
        kv_buffer_mib=values.get("kv_mib"), k_type=values.get("k_type"), v_type=values.get("v_type"),
        k_mib=values.get("k_mib"), v_mib=values.get("v_mib"), kv_layers=tuple(layers),
        k_bits_per_value=values.get("k_bpv"), v_bits_per_value=values.get("v_bpv"),
        seconds_per_pass=values.get("pass"), total_ms=values.get("total"),
    )


def argv(binary: Path, model: Path, corpus: Path, *, ctx: int = 512, chunks: int | None = None,
         threads: int | None = None, ngl: int | None = None, kv_args: list[str] = ()) -> list[str]:
    args = [str(binary), "-m", str(model), "-f", str(corpus), "-c", str(ctx),
            # -lv 4 makes libllama's INFO lines (KV cache sizes, per-layer types) visible.
            "-lv", "4", "--no-log-timestamps"]
    if chunks:
        args += ["--chunks", str(chunks)]
    return args + thread_gpu_args(threads, ngl) + list(kv_args)


def run(args: list[str], *, env: dict | None = None, log_path: Path | None = None,
        on_line: LineHook | None = None) -> tuple[ToolRun, PerplexityResult]:
    result = run_tool(args, env=env, log_path=log_path, on_line=on_line, what="llama-perplexity")
    return result, parse(result.output)
