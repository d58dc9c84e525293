"""llama.cpp's test-backend-ops: argv builder, runner and a pure parser of its per-case lines.

Each case line is `  OP(params): OK|FAIL|not supported [...]|skipping ...`. A case *ran* when it
printed OK or FAIL; "not supported" and "skipping" are skips and never count as passes. Cases
whose params name a turbo type are also counted on their own.

Two traps this module exists for: `-b NAME` that matches no device prints "Skipping" for every
device and still ends "backends passed" with nothing run (so `parse` says whether the named
backend was tested at all); and the pinned tree names the Metal device `MTL0`, not `Metal`.
Standard library only: `.ci/backend_ops_summary.py` loads this file on a runner without lacq's
dependencies.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

OPS = ("SET_ROWS", "GET_ROWS", "CPY", "FLASH_ATTN_EXT")
# The check programs a parity build makes: this tool and test-kv-bytes (tools/kv_bytes.py, patch 0011).
CHECK_TARGETS = ("test-backend-ops", "test-kv-bytes")
# The device name test-backend-ops prints (and `-b` takes) for each lacq backend.
DEVICE_NAMES = {"cpu": "CPU", "cuda": "CUDA0", "metal": "MTL0"}
COLUMNS = ("ran", "passed", "failed", "skipped")

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_BACKEND = re.compile(r"^Backend \d+/\d+: (?P<name>\S+)")
_DESCRIPTION = re.compile(r"^\s+Device description: (?P<text>.+)$")
_CASE = re.compile(r"^  (?P<op>[A-Z][A-Z0-9_]*)\((?P<params>.*)\): (?P<status>.*)$")


def classify(status: str) -> str | None:
    status = status.strip()
    if status.startswith(("not supported", "skipping")):
        return "skipped"
    if status.endswith("FAIL"):
        return "failed"
    if status.endswith("OK"):
        return "passed"
    return None  # a line this parser does not know


@dataclass(frozen=True)
class BackendOpsResult:
    backend: str  # the device name cases were counted for (CPU, CUDA0, MTL0)
    tested: bool  # False: the device was skipped or absent, and nothing ran on it
    description: str | None  # "NVIDIA H100 80GB HBM3", as the tool prints it
    per_op: dict = field(default_factory=dict)  # op -> {"ran": n, "passed": n, ..., "turbo ran": n, ...}
    unknown: tuple[str, ...] = ()  # case lines that could not be classified

    @property
    def failed(self) -> int:
        return sum(c.get("failed", 0) for c in self.per_op.values())


def count(text: str, backend: str) -> tuple[dict[str, Counter], bool, list[str], str | None]:
    """Per-op counters (keys `passed`, `turbo passed`, ...), whether `backend` was tested, the
    case lines that could not be classified, and the device's description."""
    per_op: dict[str, Counter] = {}
    current, tested, unknown, description = None, False, [], None
    lines = _ANSI.sub("", text).splitlines()
    for i, line in enumerate(lines):
        if m := _BACKEND.match(line):
            current = m["name"]
            following = lines[i + 1].strip() if i + 1 < len(lines) else ""
            tested = tested or (current == backend and not following.startswith("Skipping"))
            continue
        if current != backend:
            continue
        if (m := _DESCRIPTION.match(line)) and description is None:
            description = m["text"].strip()
            continue
        if not (m := _CASE.match(line)):
            continue
        kind = classify(m["status"])
        if kind is None:
            unknown.append(line.strip())
            continue
        counter = per_op.setdefault(m["op"], Counter())
        for prefix in ("", "turbo ") if "turbo" in m["params"] else ("",):
            counter[prefix + kind] += 1
            if kind != "skipped":
                counter[prefix + "ran"] += 1
    return per_op, tested, unknown, description


def parse(text: str, backend: str) -> BackendOpsResult:
    per_op, tested, unknown, description = count(text, backend)
    full = {op: {k: int(c.get(k, 0)) for k in (*COLUMNS, *(f"turbo {c}" for c in COLUMNS))}
            for op, c in sorted(per_op.items())}
    return BackendOpsResult(backend, tested, description, full, tuple(unknown))


def argv(tool: Path, device: str, op: str) -> list[str]:
    return [str(tool), "-b", device, "-o", op]


def run(tool: Path, device: str, op: str, log_path: Path) -> BackendOpsResult:
    """Run one op on one device. A failing case makes the tool exit non-zero: the counts are
    still returned (with `failed` > 0); a run that tested nothing raises."""
    from lacq.errors import ToolError
    from lacq.llama.tools.base import run_tool
    try:
        text = run_tool(argv(tool, device, op), log_path=log_path).output
    except ToolError:
        text = log_path.read_text(errors="replace") if log_path.exists() else ""
        result = parse(text, device)
        if not result.per_op:
            raise
        return result
    result = parse(text, device)
    if not result.tested:
        raise ToolError(f"test-backend-ops -b {device} tested nothing: no device named {device} in this build "
                        f"(full log: {log_path})", log_tail=text.strip()[-600:])
    return result
