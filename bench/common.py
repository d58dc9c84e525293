"""What the bench/ scripts share: the repository on sys.path and their common options."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def parser(doc: str | None, *, out: Path | None, fa: str | None = None, plot: bool = False) -> argparse.ArgumentParser:
    """--model, --backend, --source, --ngl, --threads and --out (plus --fa and --plot where asked)."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="GGUF (default: SmolLM2-135M-Instruct Q4_1 from PyPI)")
    ap.add_argument("--backend", default="cpu", help="which lacq build: cpu, cuda or metal")
    ap.add_argument("--source", default=None, help="llama.cpp source of that build (default: the pinned tree)")
    ap.add_argument("--ngl", type=int, default=None, help="layers on the GPU (-ngl)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path, default=out, help=f"markdown file the table is appended to ({out})")
    if fa is not None:
        ap.add_argument("--fa", default=fa, help="flash attention: on, off or auto")
    if plot:
        ap.add_argument("--plot", type=Path, default=None, help="also write a PNG")
    return ap
