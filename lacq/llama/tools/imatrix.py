"""llama-imatrix: argv builder, runner and a pure parser of its log (chunks computed, tokens, PPL estimate)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from lacq.errors import ToolError
from lacq.llama.tools.base import FINAL_PPL, LineHook, ToolRun, error_lines, message_lines, run_tool, thread_gpu_args

# "compute_imatrix: computing over 4 chunks, n_ctx=512, batch_size=2048, n_seq=4"
_COMPUTING = re.compile(r"computing over (\d+) chunks, n_ctx=(\d+)")
# "compute_imatrix: you need at least 1024 tokens for a context of 512 tokens"
# "compute_imatrix: the data file you provided tokenizes to only 700 tokens"
_NEED = re.compile(r"you need at least (\d+) tokens for a context of (\d+) tokens")
_ONLY = re.compile(r"tokenizes to only (\d+) tokens")
_PASS = re.compile(r"([\d.]+) seconds per pass")


@dataclass(frozen=True)
class ImatrixLog:
    chunks: int | None  # chunks llama-imatrix computed over (fewer than asked when the text is short)
    n_ctx: int | None
    tokens_needed: int | None  # set when the text was too short for even two contexts
    tokens_found: int | None
    ppl: float | None  # its running PPL estimate over the chunks (a sanity check, not a measurement)
    ppl_error: float | None
    seconds_per_pass: float | None
    errors: tuple[str, ...]  # its error lines, without the log prefix


def parse(text: str) -> ImatrixLog:
    values: dict = {}
    errors = tuple(error_lines(text))
    for line in message_lines(text):
        if m := _COMPUTING.search(line):
            values["chunks"], values["n_ctx"] = int(m.group(1)), int(m.group(2))
        elif m := _NEED.search(line):
            values["tokens_needed"], values["n_ctx"] = int(m.group(1)), int(m.group(2))
        elif m := _ONLY.search(line):
            values["tokens_found"] = int(m.group(1))
        elif m := FINAL_PPL.search(line):
            values["ppl"], values["ppl_error"] = float(m.group(1)), float(m.group(2))
        elif m := _PASS.search(line):
            values["seconds_per_pass"] = float(m.group(1))
    return ImatrixLog(chunks=values.get("chunks"), n_ctx=values.get("n_ctx"),
                      tokens_needed=values.get("tokens_needed"), tokens_found=values.get("tokens_found"),
                      ppl=values.get("ppl"), ppl_error=values.get("ppl_error"),
                      seconds_per_pass=values.get("seconds_per_pass"), errors=errors)


def argv(binary: Path, model: Path, text: Path, output: Path, *, chunks: int, ctx: int = 512,
         threads: int | None = None, ngl: int | None = None) -> list[str]:
    # --output-format gguf: lacq writes to a temporary name first, and without it a name that does not end
    # in .gguf still gets GGUF but with a warning; the legacy .dat format is never wanted.
    return [str(binary), "-m", str(model), "-f", str(text), "-c", str(ctx), "--chunks", str(chunks),
            "-o", str(output), "--output-format", "gguf", "--no-log-timestamps",
            *thread_gpu_args(threads, ngl)]


def run(args: list[str], *, log_path: Path | None = None,
        on_line: LineHook | None = None) -> tuple[ToolRun, ImatrixLog]:
    try:
        result = run_tool(args, log_path=log_path, on_line=on_line, what="llama-imatrix")
    except ToolError as exc:
        found = parse(exc.log_tail)
        if found.tokens_needed is not None:
            raise ToolError(f"the text tokenizes to {found.tokens_found} tokens; llama-imatrix needs at least "
                            f"{found.tokens_needed} for a context of {found.n_ctx}") from None
        raise
    return result, parse(result.output)
