#!/usr/bin/env python3
"""Perplexity of KV-cache configurations on one model: the KV studies' table.

    python bench/kv_table.py --preset boundary [--backend cpu] [--chunks 40] [--ctx 512]
    python bench/kv_table.py --configs "q8_0/f16,q8_0/q4_0,q8_0/q4_0+b2" ...

A configuration is K/V, optionally +bN (V of the first and last N KV layers at
--boundary-type, by KV-layer ordinal). Prints a markdown table (PPL, Δ% vs the
first row, K and V bits/value, the fraction of the low→high gap a boundary
policy recovers) and appends it, with the exact command, to --out.
"""

from __future__ import annotations

import sys

import pandas as pd
from common import emit_table, kv_from_label, parser, results_header, run_script

from lacq import paths
from lacq.llama.build import BuildSpec, build
from lacq.measure.ppl import measure_ppl
from lacq.model.info import inspect_model
from lacq.model.resolve import resolve_model
from lacq.quantize import convert_ftype
from lacq.results.render import markdown_lines
from lacq.results.store import open_store

COLUMNS = {"configuration": "K/V", "ppl": "PPL", "ppl_error": "±", "ppl_delta_pct": "Δ% vs first row",
           "k_bpv": "K bits/value", "v_bpv": "V bits/value", "gap": "gap recovered", "seconds": "seconds"}
PRESETS = {
    "boundary": "q8_0/f16,q8_0/q8_0,q8_0/q5_0,q8_0/q4_0,q8_0/q4_0+b2,q8_0/q4_0+b4,"
                "q8_0/q2_0,q8_0/q2_0+b2,q8_0/q2_0+b4",
    "boundary-gpu": "q8_0/f16,q8_0/q8_0,q8_0/q5_0,q8_0/q4_0,q8_0/q4_0+b2,q8_0/q4_0+b4",
}


def gap_note(label: str, ppl: dict[str, float]) -> str:
    """Fraction of the low-type→boundary-type gap a +bN row recovers."""
    if "+b" not in label:
        return ""
    kv = label.split("+")[0]
    k, low = kv.split("/")
    high = f"{k}/q8_0"
    if kv not in ppl or high not in ppl:
        return ""
    if ppl[kv] <= ppl[high]:
        return f"n/a: {low} is not worse than q8_0 here"
    return f"{(ppl[kv] - ppl[label]) / (ppl[kv] - ppl[high]) * 100:.0f}% of {low}→q8_0 gap"


def main() -> None:
    ap = parser(__doc__, out=None, fa="on")
    ap.add_argument("--preset", choices=sorted(PRESETS))
    ap.add_argument("--configs")
    ap.add_argument("--as-is", action="store_true",
                    help="measure --model as it is; by default it is dequantized to an exact F16 base first")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=40)
    ap.add_argument("--boundary-type", default="q8_0")
    args = ap.parse_args()
    configs = args.configs or PRESETS.get(args.preset or "boundary")

    b = build(BuildSpec(backend=args.backend), args.source)
    store = open_store()
    model = resolve_model(args.model)
    if not args.as_is:  # the weight-exact F16 base of the quantized file
        model = convert_ftype(b, store, model, paths.sub("models") / f"{model.stem}.f16.gguf", force=True)
    info = inspect_model(model)
    rows, ppl = [], {}
    study = f"bench-kv:{args.backend}:{b.key}:c{args.ctx}:n{args.chunks}"
    for text in configs.split(","):
        label, kv = kv_from_label(text, args.fa, args.boundary_type)
        out = measure_ppl(b, store, model, info, kv, paths.default_corpus(), ctx=args.ctx, chunks=args.chunks,
                          threads=args.threads, ngl=args.ngl, label=label, study=study)
        ppl[label] = out.result.ppl
        rows.append({"configuration": label, "ppl": out.result.ppl, "ppl_error": out.result.ppl_error,
                     "k_bpv": out.k_bits_per_value, "v_bpv": out.v_bits_per_value, "seconds": out.seconds})
        print(f"{label}: PPL {out.result.ppl:.4f} ({out.seconds:.0f} s)", file=sys.stderr, flush=True)
    df = pd.DataFrame(rows)
    df["ppl_delta_pct"] = (df.ppl / df.ppl.iloc[0] - 1) * 100
    df["gap"] = [gap_note(label, ppl) for label in df.configuration]
    lines = results_header(f"{model.name}, {args.backend}, {args.chunks} chunks of {args.ctx}, flash attention "
                           f"{args.fa}", b, ["python", *sys.argv])
    lines += markdown_lines(df, COLUMNS)
    emit_table(lines, args.out)

if __name__ == "__main__":
    sys.exit(run_script(main))
