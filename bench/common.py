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


def kv_from_label(text: str, fa: str = "auto", boundary_type: str = "q8_0"):
    """'K/V' or 'K/V+bN' (V of the first and last N KV layers at boundary_type, by ordinal) -> (label, KvConfig)."""
    from lacq.errors import LacqError
    from lacq.plan.kv.flags import kv_from_flags
    kv, _, pol = text.strip().partition("+")
    k, _, v = kv.partition("/")
    if pol and not (pol.startswith("b") and pol[1:].isdigit()):
        raise LacqError(f"bad configuration {text!r}; expected K/V or K/V+bN, e.g. q8_0/q4_0+b2")
    return text.strip(), kv_from_flags(k, v or k, fa, int(pol[1:]) if pol else None, boundary_type)


def results_header(title: str, build, argv: list[str]) -> list[str]:
    """Markdown lines heading a bench table: title, exact command, time, host, build."""
    import datetime
    import platform
    import shlex
    return [f"### {title}", "", f"`{' '.join(shlex.quote(a) for a in argv)}`", "",
            f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, host {platform.node()}, "
            f"build {build.key} ({build.backend}; {', '.join(build.patches) or 'no patches'})", ""]


def emit_table(lines: list[str], out: Path | None) -> None:
    """Print a bench table and append it to `out` (bench/results/...), where given."""
    text = "\n".join(lines) + "\n"
    print(text)
    if out is None:
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "a") as f:
        f.write(text + "\n")


def run_script(main) -> int:
    """Run a bench/ script's main: lacq's errors as one line and exit 1, Ctrl-C as exit 130."""
    from lacq.errors import LacqError
    try:
        main()
    except LacqError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0
