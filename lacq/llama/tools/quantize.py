"""llama-quantize: argv builder, runner and parser of its per-tensor report."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from lacq.errors import ToolError
from lacq.llama.tools.base import LineHook, ToolRun, message_lines, run_tool

# --dry-run: "[  6/ 272] blk.0.attn_q.weight - [ 576, 576, 1, 1], type = f16, size = 0.63 MiB -> 0.34 MiB (q8_0)"
# real run:  "[  6/ 272] blk.0.attn_q.weight - [ 576, 576, 1, 1], type = f16, converting to q8_0 .. size = 0.63 MiB -> 0.34 MiB"
# untouched: "[  1/ 272] output_norm.weight - [ 576, 1, 1, 1], type = f32, size = 0.002 MiB"
_TENSOR = re.compile(
    r"^\[\s*(\d+)/\s*(\d+)\]\s+(\S+)\s+-\s+\[([^\]]*)\],\s+type\s+=\s+(\S+),\s+"
    r"(?:converting to (\S+) \.\. )?"
    r"size\s+=\s+([\d.]+)\s+MiB(?:\s+->\s+([\d.]+)\s+MiB(?:\s+\((\S+)\))?)?"
)
_SIZE = re.compile(r"(model|quant) size\s+=\s+([\d.]+) MiB \(([\d.]+) BPW\)")
_FALLBACK = re.compile(r"WARNING: (\d+) of (\d+) tensor\(s\) required fallback")
_FALLBACK_TENSOR = re.compile(r"warning: (\S+)\s+- ncols.*falling back to\s+(\S+)")
# --dry-run without --imatrix of a plan with types that need one
_NEEDS_IMATRIX = "actually completing this quantization will require an imatrix"


@dataclass(frozen=True)
class QuantizedTensor:
    name: str
    shape: tuple[int, ...]
    source_type: str
    final_type: str  # source type when llama-quantize left it alone
    mib: float


@dataclass(frozen=True)
class QuantizeReport:
    tensors: tuple[QuantizedTensor, ...]
    model_mib: float | None
    quant_mib: float | None
    quant_bpw: float | None
    fallbacks: dict[str, str]
    needs_imatrix: bool = False  # a --dry-run said the real run would need an importance matrix

    def types(self) -> dict[str, str]:
        return {t.name: t.final_type for t in self.tensors}


def parse(text: str) -> QuantizeReport:
    tensors, sizes, fallbacks = [], {}, {}
    needs_imatrix = _NEEDS_IMATRIX in text
    for line in message_lines(text):
        if m := _TENSOR.match(line):
            shape = tuple(int(x) for x in m.group(4).split(",") if x.strip())
            src = m.group(5).lower()
            final = (m.group(6) or m.group(9) or m.group(5)).lower()
            mib = float(m.group(8) or m.group(7))
            tensors.append(QuantizedTensor(m.group(3), shape, src, final, mib))
        elif m := _SIZE.search(line):
            sizes[m.group(1)] = (float(m.group(2)), float(m.group(3)))
        elif m := _FALLBACK_TENSOR.search(line):
            fallbacks[m.group(1)] = m.group(2).lower()
    if not tensors:
        raise ToolError("llama-quantize printed no per-tensor report; is this the pinned llama.cpp?")
    return QuantizeReport(
        tensors=tuple(tensors),
        model_mib=sizes.get("model", (None, None))[0],
        quant_mib=sizes.get("quant", (None, None))[0],
        quant_bpw=sizes.get("quant", (None, None))[1],
        fallbacks=fallbacks,
        needs_imatrix=needs_imatrix,
    )


def argv(binary: Path, model: Path, output: Path | None, ftype: str, *, tensor_type_file: Path | None = None,
         imatrix: Path | None = None, dry_run: bool = False, allow_requantize: bool = False,
         threads: int | None = None) -> list[str]:
    args = [str(binary)]
    if allow_requantize:
        args.append("--allow-requantize")
    if imatrix:
        args += ["--imatrix", str(imatrix)]
    if tensor_type_file:
        args += ["--tensor-type-file", str(tensor_type_file)]
    if dry_run:
        args.append("--dry-run")
    args.append(str(model))
    if output is not None and not dry_run:
        args.append(str(output))
    args.append(ftype)
    if threads:
        args.append(str(threads))
    return args


def run(args: list[str], *, log_path: Path | None = None, on_line: LineHook | None = None) -> tuple[ToolRun, QuantizeReport]:
    result = run_tool(args, log_path=log_path, on_line=on_line, what="llama-quantize")
    return result, parse(result.output)
