#!/usr/bin/env python3
"""Count llama.cpp test-backend-ops cases per op for a CI job summary.

    backend_ops_summary.py --backend MTL0 LOG [LOG ...] >> "$GITHUB_STEP_SUMMARY"

Each case line is `  OP(params): OK|FAIL|not supported [...]|skipping ...`. A case *ran* when
it printed OK or FAIL; "not supported" and "skipping" lines are skips and never count as passes.
Cases whose params name a turbo type are also counted on their own.

Exits 1 when a case failed, or when the named backend was never tested: test-backend-ops prints
"Skipping" for every device that `-b` does not name and still reports all backends passed, so
a wrong backend name would otherwise look green with nothing run. Standard library only, so the
macOS job runs it without installing anything; the counter itself is lacq/llama/tools/backend_ops.py.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from collections import Counter
from pathlib import Path

# The counting lives in lacq (lacq/llama/tools/backend_ops.py, standard library only; `lacq parity`
# uses it too). Load that file by path so this script needs no installed lacq.
_spec = importlib.util.spec_from_file_location(
    "lacq_backend_ops", Path(__file__).resolve().parent.parent / "lacq" / "llama" / "tools" / "backend_ops.py")
_ops = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = _ops  # its dataclasses look their module up there
_spec.loader.exec_module(_ops)
COLUMNS = _ops.COLUMNS
classify = _ops.classify


def count(text: str, backend: str) -> tuple[dict[str, Counter], bool, list[str]]:
    """Per-op counters (keys `passed`, `turbo passed`, ...), whether `backend` was tested,
    and the case lines that could not be classified."""
    per_op, tested, unknown, _ = _ops.count(text, backend)
    return per_op, tested, unknown


def markdown(per_op: dict[str, Counter], backend: str) -> str:
    head = ["op", *COLUMNS, *(f"turbo {c}" for c in COLUMNS)]
    rows = [f"### test-backend-ops on {backend}", "",
            "| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for op in sorted(per_op):
        c = per_op[op]
        rows.append(f"| {op} | " + " | ".join(str(c[k]) for k in head[1:]) + " |")
    rows += ["", "A skipped case (\"not supported\" on this device) is not a pass."]
    return "\n".join(rows) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backend", required=True, help="device name as test-backend-ops prints it (MTL0, CUDA0)")
    ap.add_argument("logs", nargs="+", type=Path)
    args = ap.parse_args(argv)
    per_op: dict[str, Counter] = {}
    tested, unknown = False, []
    for log in args.logs:
        ops, log_tested, log_unknown = count(log.read_text(errors="replace"), args.backend)
        for op, c in ops.items():
            per_op.setdefault(op, Counter()).update(c)
        tested = tested or log_tested
        unknown += log_unknown
    sys.stdout.write(markdown(per_op, args.backend))
    problems = []
    if not tested:
        problems.append(f"backend {args.backend} was never tested (wrong -b name, or no such device)")
    failed = sum(c["failed"] for c in per_op.values())
    if failed:
        problems.append(f"{failed} case(s) failed")
    for line in unknown:
        problems.append(f"unrecognised case line: {line}")
    for op, c in sorted(per_op.items()):
        if tested and c["ran"] == 0:
            print(f"::warning::{op}: no case ran on {args.backend} ({c['skipped']} skipped)", file=sys.stderr)
    for problem in problems:
        print(f"::error::{problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
