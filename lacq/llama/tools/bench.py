"""llama-bench: argv builder, runner and parser of its `-o json` output.

llama-bench has its own argument parser (not common's), so per-layer KV
policies reach it only through the patch's environment variables; -ctk/-ctv/-fa
set the defaults. It prints one JSON object per test: a prompt-processing test
has n_prompt > 0 and n_gen == 0, a generation test the reverse; n_depth is the
number of tokens already in the KV cache when the test starts.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from lacq.errors import ToolError
from lacq.llama.tools.base import LineHook, ToolRun, run_tool, thread_gpu_args


@dataclass(frozen=True)
class BenchRow:
    test: str  # "pp512", "tg128", "pp512+tg128"
    n_prompt: int
    n_gen: int
    n_depth: int
    avg_ts: float  # tokens/s
    stddev_ts: float
    samples_ts: tuple[float, ...]
    type_k: str
    type_v: str
    flash_attn: bool
    n_threads: int | None
    n_gpu_layers: int | None
    backends: str
    device: str  # gpu_info where there is one, else cpu_info
    model_type: str
    model_size: int
    build_commit: str


def _test_name(n_prompt: int, n_gen: int) -> str:
    if n_prompt and n_gen:
        return f"pp{n_prompt}+tg{n_gen}"
    return f"pp{n_prompt}" if n_prompt else f"tg{n_gen}"


def _json_lines(text: str) -> str:
    """The JSON array's lines without the stderr run_tool interleaved with them.

    llama-bench ends a test object with "  }" (no newline) and writes the "," before the
    next one, so its stderr (--progress, libllama's log) lands between the two, even on the
    line of the "}". Every line of the pretty-printed JSON starts with one of " []{},".
    """
    keep = []
    for line in text.splitlines():
        if line.startswith("  }") and line.rstrip() not in ("  }", "  },"):
            line = "  }," if line.startswith("  },") else "  }"  # stderr glued after the "}"
        if line[:1] in ("", " ", "[", "]", "{", "}", ","):
            keep.append(line)
    return "\n".join(keep)


def parse(text: str) -> tuple[BenchRow, ...]:
    """Parse llama-bench `-o json` stdout (a JSON array of test objects)."""
    # stderr is interleaved by run_tool: the array starts on a line of its own.
    m = re.search(r"^\[\s*$", text, re.M)
    start = m.start() if m else -1
    if start < 0:
        raise ToolError("llama-bench printed no JSON; was it run with -o json?")
    try:
        data, _ = json.JSONDecoder().raw_decode(_json_lines(text[start:]))
    except json.JSONDecodeError as exc:
        raise ToolError(f"llama-bench printed malformed JSON: {exc}") from None
    if not isinstance(data, list) or not data:
        raise ToolError("llama-bench ran no tests (empty JSON array)")
    rows = []
    for d in data:
        try:
            rows.append(BenchRow(
                test=_test_name(int(d["n_prompt"]), int(d["n_gen"])),
                n_prompt=int(d["n_prompt"]), n_gen=int(d["n_gen"]), n_depth=int(d.get("n_depth", 0)),
                avg_ts=float(d["avg_ts"]), stddev_ts=float(d["stddev_ts"]),
                samples_ts=tuple(float(x) for x in d.get("samples_ts", ())),
                type_k=str(d.get("type_k", "f16")), type_v=str(d.get("type_v", "f16")),
                flash_attn=bool(d.get("flash_attn", 0)),
                n_threads=d.get("n_threads"), n_gpu_layers=d.get("n_gpu_layers"),
                backends=str(d.get("backends", "")),
                device=str(d.get("gpu_info") or d.get("cpu_info") or "unknown"),
                model_type=str(d.get("model_type", "")), model_size=int(d.get("model_size", 0)),
                build_commit=str(d.get("build_commit", "")),
            ))
        except (KeyError, TypeError, ValueError) as exc:
            raise ToolError(f"llama-bench JSON test object lacks a field lacq needs: {exc}") from None
    return tuple(rows)


def argv(binary: Path, model: Path, *, pp: int = 512, tg: int = 128, depths: tuple[int, ...] = (0,),
         repetitions: int = 5, threads: int | None = None, ngl: int | None = None,
         kv_args: list[str] = ()) -> list[str]:
    # --progress: one stderr line as each test starts, which drives lacq's progress bar.
    args = [str(binary), "-m", str(model), "-p", str(pp), "-n", str(tg),
            "-d", ",".join(str(d) for d in depths), "-r", str(repetitions), "-o", "json", "--progress"]
    return args + thread_gpu_args(threads, ngl) + list(kv_args)


_PROGRESS = re.compile(r"^llama-bench: benchmark (\d+)/(\d+): starting")


def progress_of(line: str) -> tuple[int, int] | None:
    """(test number, tests) from a `--progress` line that starts a test, else None."""
    m = _PROGRESS.match(line)
    return (int(m.group(1)), int(m.group(2))) if m else None


def run(args: list[str], *, env: dict | None = None, log_path: Path | None = None,
        on_line: LineHook | None = None) -> tuple[ToolRun, tuple[BenchRow, ...]]:
    result = run_tool(args, env=env, log_path=log_path, on_line=on_line, what="llama-bench")
    return result, parse(result.output)
