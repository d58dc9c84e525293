#!/usr/bin/env python3
"""Issue 20's evidence table: llama.cpp's mixes, with and without an importance matrix, against lacq's optimized
recipes at the same sizes, judged on text neither the scan nor the imatrix saw.

    python bench/evidence.py [--model clean-base|smollm2] [--mixes Q3_K_M,Q4_K_S,Q4_K_M,Q5_K_M,Q6_K]
                             [--types q3_k,q4_k,q5_k,q6_k,q8_0] [--unit tensor] [--scan-chunks 4]
                             [--judge-chunks 20] [--budgets 10] [--threads N] [--note TEXT] [--out FILE]

Every step is a `lacq` command (listed in the output), in a work directory under lacq's home named by the
base's hash, with its own results database (so a rerun resumes the scan and reuses quantized files):

1. `lacq imatrix BASE --strict`: the importance matrix of the calibration part (docs/text-splits.md);
2. each mix quantized without and with it (`lacq quantize`), its KLD against the base on the judge part
   (`lacq kld --split judge`, --judge-chunks x 512);
3. `lacq scan weights BASE --base BASE --imatrix IMX` on the scan part (--unit, --types, --scan-chunks);
4. `lacq optimize weights SCAN --size-mb S --verify --imatrix IMX --strict` at each mix's size (the imatrix
   file's bytes) and at --budgets sizes evenly spaced from the smallest mix to the largest.

Prints (1) mix vs optimized at each mix's size: mean KLD ±, 99.9% KLD, same-top-p ±, PPL, MB, and how far
below the imatrix mix the optimized recipe is in mean and 99.9% KLD; (2) predicted (the scan's) vs judged KLD
over the budgets, with Spearman's rho. Writes the markdown to --out (replaced, not appended).

`--model clean-base` (default) is the never-quantized base (docs/clean-base.md; its training card is quoted);
`--model smollm2` is SmolLM2-135M's F16 base dequantized from Q4_1, which the k-quants can re-create: its
table shows that artifact, not the method.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from common import RESULTS, ROOT, results_header

from lacq import paths
from lacq.errors import LacqError
from lacq.llama.build import BuildSpec, require_build
from lacq.results.store import Result, open_store
from lacq.results.tables import spearman, tail_columns

MIXES = "Q3_K_M,Q4_K_S,Q4_K_M,Q5_K_M,Q6_K"
TYPES = "q3_k,q4_k,q5_k,q6_k,q8_0"


class Runner:
    """Runs `lacq` commands in the work directory's results database, keeping each command and its seconds."""

    def __init__(self, db: Path, log: Path, threads: int, extra: list[str]):
        self.env = {**os.environ, "LACQ_DB": str(db)}
        self.db, self.log, self.threads, self.extra = db, log, threads, extra
        self.commands: list[tuple[str, float]] = []

    def __call__(self, *args, threads: bool = True) -> str:
        argv = [*map(str, args), *self.extra, *(["-t", str(self.threads)] if threads else [])]
        t0 = time.monotonic()
        out = subprocess.run([sys.executable, "-m", "lacq", *argv], cwd=ROOT, env=self.env, capture_output=True,
                             text=True, check=False)
        seconds = time.monotonic() - t0
        with open(self.log, "a") as f:
            f.write(f"$ lacq {shlex.join(argv)}\n{out.stdout}{out.stderr}\n")
        if out.returncode:
            last = (out.stderr.strip().splitlines() or ["no message"])[-1]
            raise LacqError(f"lacq {shlex.join(argv)} failed: {last} (its output: {self.log})")
        self.commands.append(("lacq " + shlex.join(argv), seconds))
        print(f"{seconds:6.1f} s  lacq {shlex.join(argv)}", file=sys.stderr, flush=True)
        return out.stdout + out.stderr

    def last_kld(self) -> Result:
        return open_store(self.db).results(kind="kld")[-1]


def row(r: Result, what: str) -> dict:
    m = r.metrics
    return {"what": what, "mb": r.model_bytes / 1e6, "kld": m["kld_mean"], "kld_error": m["kld_mean_error"],
            **tail_columns(m), "ppl": m["ppl_q"], "ppl_error": m.get("ppl_q_error"),
            "predicted": m.get("predicted"), "imatrix": r.imatrix_sha256}


def base_model(spec: str, build, store) -> tuple[Path, str]:
    """The F16 base and how the output names it."""
    from lacq.model.resolve import resolve_model
    src = resolve_model(spec)
    if spec == "smollm2":
        from lacq.quantize import convert_ftype
        base = convert_ftype(build, store, src, paths.sub("models") / f"{src.stem}.f16.gguf", force=False)
        return base, (f"SmolLM2-135M-Instruct's F16 base **dequantized from Q4_1** (`{base.name}`): the k-quants "
                      "can re-create its grid, so this table shows that artifact, not evidence")
    card = src.with_suffix("").with_suffix(".json") if spec == "clean-base" else None
    what = f"`{spec}` (`{src.name}`)"
    if card and card.exists():
        t = json.loads(card.read_text())["training"]
        last = t["log"][-1]
        what += (f", trained on {t.get('gpu') or t['device']}: {t['steps']} steps, {last['tokens']:,} tokens, "
                 f"held-out loss {last['val']:.2f} (its card, {card.name})")
    return src, what


def fmt_row(r: dict, ref: dict | None) -> str:
    def below(key):
        if ref is None or not ref.get(key) or r.get(key) is None:
            return ""
        return f"{100 * (1 - r[key] / ref[key]):+.1f}%"
    top = "" if r.get("same_top_p_pct") is None else f"{r['same_top_p_pct']:.2f} ± {r['same_top_p_error_pct']:.2f}"
    p999 = "" if r.get("kld_p999") is None else f"{r['kld_p999']:.5f}"
    ppl = f"{r['ppl']:.2f}" + ("" if r.get("ppl_error") is None else f" ± {r['ppl_error']:.2f}")
    return (f"| {r['what']} | {r['mb']:.3f} | {r['kld']:.6f} ± {r['kld_error']:.6f} | {p999} | {top} | {ppl} | "
            f"{below('kld')} | {below('kld_p999')} |")


def main() -> None:
    import argparse
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="clean-base", choices=("clean-base", "smollm2"))
    ap.add_argument("--mixes", default=MIXES, help="llama.cpp mixes, smallest to largest")
    ap.add_argument("--types", default=TYPES, help="the scan's candidate types")
    ap.add_argument("--unit", default="tensor", help="the scan's units (lacq scan weights --unit); group: about a "
                    "seventh of the scan's runs, less room for the optimizer")
    ap.add_argument("--scan-chunks", type=int, default=4)
    ap.add_argument("--judge-chunks", type=int, default=20)
    ap.add_argument("--calibration-chunks", type=int, default=100)
    ap.add_argument("--budgets", type=int, default=10, help="sizes evenly spaced from the smallest mix to the largest")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--backend", default="cpu")
    ap.add_argument("--source", default=None)
    ap.add_argument("--note", default="", help="a line under the title (e.g. what the model is not)")
    ap.add_argument("--out", type=Path, default=None, help="markdown result file (default: bench/results/"
                    "evidence_MODEL.md)")
    args = ap.parse_args()
    t_start = time.monotonic()
    out_md = args.out or RESULTS / f"evidence_{args.model.replace('-', '_')}.md"
    build = require_build(BuildSpec(backend=args.backend), args.source)
    store = open_store()
    base, described = base_model(args.model, build, store)
    work = paths.sub("bench-evidence") / f"{base.stem}.{store.sha256(base)[:12]}"
    work.mkdir(parents=True, exist_ok=True)
    extra = ["--backend", args.backend, *(["--source", args.source] if args.source else [])]
    lacq = Runner(work / "evidence.sqlite", work / "lacq.log", args.threads, extra)
    stages: dict[str, float] = {}

    def stage(name: str, t0: float) -> None:
        stages[name] = time.monotonic() - t0

    t0 = time.monotonic()
    imx = work / "calibration.imatrix.gguf"
    said = lacq("imatrix", base, "--strict", "--chunks", args.calibration_chunks, "-o", imx)
    stage("imatrix (cached: made by an earlier run)" if "up to date" in said else "imatrix", t0)

    t0 = time.monotonic()
    judge = ["--split", "judge", "--chunks", args.judge_chunks, "-c", 512]
    mixes: dict[str, dict[str, dict]] = {}
    for mix in args.mixes.split(","):
        recipe = work / f"{mix}.toml"
        recipe.write_text(f'name = "{mix}"\ndescription = "stock llama-quantize {mix}"\nbase = "{mix.lower()}"\n')
        for tag, with_imx in (("", []), ("+imatrix", ["--imatrix", imx])):
            q = work / f"{base.stem}.{mix}{tag.replace('+', '.')}.gguf"
            # --force: a rerun's file may be refused as "not made from this plan" once the scan has filed a
            # candidate of the same plan (Q6_K) elsewhere; quantizing again is a second
            lacq("quantize", base, "--recipe", recipe, "-o", q, *with_imx, "--force", threads=False)
            lacq("kld", q, "--base", base, *judge, "--label", mix + tag, "--study", "evidence")
            mixes.setdefault(mix, {})[tag or "plain"] = row(lacq.last_kld(), mix + tag)
    stage("mixes (quantize and judge)", t0)

    t0 = time.monotonic()
    scan = work / f"scan.{args.unit.replace(',', '+')}.{args.types.replace(',', '+')}.c{args.scan_chunks}.json"
    lacq("scan", "weights", base, "--base", base, "--types", args.types, "--unit", args.unit, "--imatrix", imx,
         "--chunks", args.scan_chunks, "-c", 512, "-o", scan, "--format", "json")
    stage("scan", t0)

    def optimized(size_mb: float, name: str) -> dict:
        lacq("optimize", "weights", scan, "--size-mb", f"{size_mb:.4f}", "--verify", "--imatrix", imx, "--strict",
             "--judge-chunks", args.judge_chunks, "--name", name, "-o", work / f"{name}.toml", "--force")
        return row(lacq.last_kld(), name)

    t0 = time.monotonic()
    at_mix = {mix: optimized(int(m["+imatrix"]["mb"] * 1e4) / 1e4, f"opt_at_{mix}") for mix, m in mixes.items()}
    stage("optimize at the mixes' sizes", t0)
    t0 = time.monotonic()
    sizes = [m["+imatrix"]["mb"] for m in mixes.values()]
    lo, hi = min(sizes), max(sizes)
    n = args.budgets
    budgets = [lo + (hi - lo) * i / (n - 1) for i in range(n)] if n > 1 else [lo]
    swept = [optimized(int(b * 1e4) / 1e4, f"opt_{i}") for i, b in enumerate(budgets)]
    stage(f"optimize at {n} budgets", t0)
    total = time.monotonic() - t_start

    lines = results_header(f"Evidence table (issue 20): {args.model}, {args.backend}, judged on {args.judge_chunks}"
                           f"×512 tokens of the judge part", build, ["python", *sys.argv])
    lines += ([f"**{args.note}**", ""] if args.note else []) + [
        f"Base: {described}.", "",
        f"Importance matrix: `lacq imatrix`, {args.calibration_chunks}×512 tokens of the calibration part. Scan: "
        f"`lacq scan weights`, units {args.unit}, candidates {args.types}, with that imatrix, {args.scan_chunks}×512 "
        f"tokens of the scan part. Every file below is judged with `lacq kld` (mixes) or `lacq optimize --verify` "
        f"(optimized) against the base on {args.judge_chunks}×512 tokens of the judge part; the parts share no line "
        f"(docs/text-splits.md). Threads {args.threads}; wall time {total / 60:.1f} min ("
        + ", ".join(f"{k} {v:.0f} s" for k, v in stages.items()) + ").", "",
        "## Mixes vs optimized at each mix's size", "",
        "Below = how far under the same mix made with the same imatrix (positive: the optimized recipe is better).",
        "", "| file | MB | mean KLD ± | 99.9% KLD | same top p % | PPL | mean KLD below mix+imatrix | 99.9% below |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for mix, m in mixes.items():
        lines += [fmt_row(m["plain"], m["+imatrix"]), fmt_row(m["+imatrix"], None),
                  fmt_row({**at_mix[mix], "what": f"**optimized @ {mix}** (+imatrix)"}, m["+imatrix"])]
    wins = [mix for mix in mixes if at_mix[mix]["kld"] < mixes[mix]["+imatrix"]["kld"]]
    lines += ["", f"The optimized recipe is below the imatrix mix in mean KLD at {len(wins)} of {len(mixes)} sizes"
              + (f" ({', '.join(wins)})" if wins else "") + ".", ""]
    lines += ["## Predicted vs judged KLD", "",
              (f"{n} budgets evenly spaced from {lo:.3f} to {hi:.3f} MB. Predicted: the optimizer's prediction from "
               f"the scan ({args.scan_chunks}×512 tokens of the scan part); judged: the written recipe's file, "
               f"{args.judge_chunks}×512 tokens of the judge part."), "",
              "| budget MB | file MB | predicted KLD (low..high) | judged KLD ± | 99.9% KLD | PPL |",
              "| --- | --- | --- | --- | --- | --- |"]
    for b, r in zip(budgets, swept):
        p = r["predicted"] or {}
        rng = f" ({p['kld_low']:.6f}..{p['kld_high']:.6f})" if p.get("kld_low") is not None else ""
        pred = f"{p['kld']:.6f}{rng}" if p.get("kld") is not None else ""
        lines.append(f"| {b:.3f} | {r['mb']:.3f} | {pred} | {r['kld']:.6f} ± {r['kld_error']:.6f} | "
                     f"{r['kld_p999'] or 0:.5f} | {r['ppl']:.2f} |")
    if all((r["predicted"] or {}).get("kld") is not None for r in swept) and n > 2:
        rho = spearman([r["predicted"]["kld"] for r in swept], [r["kld"] for r in swept])
        lines += ["", f"Spearman's rho, predicted vs judged mean KLD over the {n} budgets: **{rho:.3f}**."]
    lines += ["", "<details><summary>The lacq commands, in order, with their seconds</summary>", "", "```"]
    lines += [f"{s:7.1f} s  {c}".replace(str(work), "$WORK") for c, s in lacq.commands]
    lines += ["```", "", f"`$WORK` = `{work}`.", "</details>", ""]
    text = "\n".join(lines) + "\n"
    print(text)
    out_md.parent.mkdir(parents=True, exist_ok=True)
    out_md.write_text(text)


if __name__ == "__main__":
    from common import run_script
    sys.exit(run_script(main))
