"""test-kv-bytes (patch 0011): do a backend's KV-type writes equal the reference quantizer's bytes?

Its lines are `DEVICE TYPE OP SRC: N blocks, M differ OK|FAIL` or `DEVICE TYPE OP SRC: not supported`,
then one verdict line; it exits 1 when any block differs.
"""

from __future__ import annotations

import re
from pathlib import Path

TARGET = "test-kv-bytes"
_LINE = re.compile(r"^(?P<device>\S+) (?P<type>\S+) (?P<op>[A-Z_]+) (?P<src>\S+): "
                   r"(?:(?P<blocks>\d+) blocks, (?P<differ>\d+) differ (?:OK|FAIL)|(?P<unsupported>not supported))$")


def parse(text: str) -> list[dict]:
    """One row per line: device, type, op, src, and blocks/differ (None when not supported)."""
    rows = []
    for line in text.splitlines():
        if m := _LINE.match(line.strip()):
            rows.append({"device": m["device"], "type": m["type"], "op": m["op"], "src": m["src"],
                         "blocks": None if m["unsupported"] else int(m["blocks"]),
                         "differ": None if m["unsupported"] else int(m["differ"])})
    return rows


def summary(rows: list[dict]) -> dict:
    ran = [r for r in rows if r["blocks"] is not None]
    return {"cases": len(ran), "unsupported": len(rows) - len(ran), "blocks": sum(r["blocks"] for r in ran),
            "differ": sum(r["differ"] for r in ran),
            "types": sorted({r["type"] for r in ran}), "differing": [r for r in ran if r["differ"]]}


def run(tool: Path, device: str, log_path: Path) -> dict:
    """Run on one device; the summary with its rows. A run that compared nothing raises."""
    from lacq.errors import ToolError
    from lacq.llama.tools.base import run_tool
    try:
        text = run_tool([str(tool), "-b", device], log_path=log_path).output
    except ToolError:  # exit 1: some block differs, and the rows say which; exit 2: no such device
        text = log_path.read_text(errors="replace") if log_path.exists() else ""
    rows = parse(text)
    if not any(r["blocks"] is not None for r in rows):
        raise ToolError(f"{TARGET} -b {device} compared nothing (full log: {log_path})", log_tail=text.strip()[-600:])
    return {**summary(rows), "rows": rows}
