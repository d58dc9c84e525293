"""What the optimizer hands out: a weight recipe, a plain --tensor-type-file, a KV policy, Pareto points and their plot.

Every writer takes a `Solution` and the `Scan` it came from and returns text;
the caller writes it (`write_outputs`: atomically, all or none). Recipes and policies parse with lacq's own
loaders (`parse_recipe`, `load_kv_policy`), which the tests check.
"""

from __future__ import annotations

import json
import re
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from lacq.errors import OutputExistsError
from lacq.fsutil import atomic_output, write_text_atomic
from lacq.model.info import FLOAT_TYPES, ModelInfo
from lacq.plan.llama_quant import BASE_FTYPES, FTYPE_DEFAULT_TYPE
from lacq.plan.recipe import parse_recipe, resolve_recipe
from lacq.studies.artifact import Scan, Unit
from lacq.studies.optimize import OptimizeError, Solution

_TENSOR = re.compile(r"^(?:blk\.(\d+)\.)?(.+?)(?:\.(?:weight|bias|scale))?$")
_REGEX_SPECIAL = set(r"\.^$|?*+()[]{}")


def check_outputs(paths: Iterable[Path], *, force: bool = False) -> None:
    """Refuse outputs in the way (existing files without `force`, one path named twice), before any is written."""
    seen: set[Path] = set()
    for path in paths:
        if path.resolve() in seen:
            raise OutputExistsError(f"{path} is named for two outputs; give each its own path")
        seen.add(path.resolve())
        if path.exists() and not force:
            raise OutputExistsError(f"{path} exists; pass --force to overwrite it")


def write_outputs(files: dict[Path, str], *, force: bool = False) -> None:
    """Write each file atomically, after checking them all (`check_outputs`): a refusal writes nothing, never a
    recipe without its tensor-type file."""
    check_outputs(files, force=force)
    for path, text in files.items():
        write_text_atomic(path, text)


def _q(text: str) -> str:
    return json.dumps(text)  # a TOML basic string: JSON's escapes are TOML's


def _units(solution: Solution, scan: Scan, kind: str) -> list[Unit]:
    if solution.kind != kind or scan.kind != kind:
        raise OptimizeError(f"a {kind} writer needs a {kind} solution and scan (got {solution.kind} and {scan.kind})")
    by_id = {u.id: u for u in scan.units}
    if missing := [uid for uid in solution.choice if uid not in by_id]:
        raise OptimizeError(f"the solution names unit {missing[0]}, which this scan does not hold: another scan's solution?")
    return [by_id[uid] for uid in solution.choice]


def _span(blocks: Iterable[int]) -> str:
    """Sorted block indices as a layer list: 0,3,5-7."""
    out, run = [], []
    for b in sorted(blocks):
        if run and b == run[-1] + 1:
            run.append(b)
            continue
        if run:
            out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
        run = [b]
    if run:
        out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
    return ",".join(out)


def _rules(assign: dict[str, str], order: tuple[str, ...]) -> list[tuple[str | None, str, str]]:
    """(layers, tensors, type) rules giving each tensor its type.

    Tensors of one type are grouped by group name, and groups with the same
    block set share a rule, so a partition writes few rules; rules never overlap.
    """
    by_type: dict[str, dict[str, set[int | None]]] = {}
    for name, t in assign.items():
        m = _TENSOR.match(name)
        by_type.setdefault(t, {}).setdefault(m.group(2), set()).add(int(m.group(1)) if m.group(1) else None)
    rules = []
    for t in sorted(by_type, key=lambda t: (order.index(t) if t in order else len(order), t)):
        shared: dict[frozenset[int], list[str]] = {}
        for group, blocks in sorted(by_type[t].items()):
            if None in blocks:
                rules.append((None, group, t))
            if blocks - {None}:
                shared.setdefault(frozenset(blocks - {None}), []).append(group)
        for blocks, groups in sorted(shared.items(), key=lambda kv: (min(kv[0]), kv[1])):
            rules.append((_span(blocks), ",".join(groups), t))
    return rules


def _base_type(solution: Solution) -> str:
    """The recipe's base: the lowest candidate when llama-quantize takes it as a quantized ftype, else the
    most chosen type that it takes."""
    ok = [t for t in solution.types if t in BASE_FTYPES and FTYPE_DEFAULT_TYPE[BASE_FTYPES[t]] not in FLOAT_TYPES]
    if not ok:
        raise OptimizeError(f"none of the types {', '.join(solution.types)} is a quantized llama-quantize base type "
                            f"({', '.join(t for t in BASE_FTYPES if t not in FLOAT_TYPES)})")
    if solution.lowest in ok:
        return solution.lowest
    counts = {t: sum(1 for c in solution.choice.values() if c == t) for t in ok}
    return max(ok, key=lambda t: (counts[t], -solution.types.index(t)))


def _summary(solution: Solution, scan: Scan) -> list[str]:
    where = (f"{solution.bits_per_value:.4f} bits/value" if solution.kind == "kv" else f"{solution.size_mb:.3f} MB"
             + ("" if solution.bpw is None else f" ({solution.bpw:.4f} bpw)"))
    ends = ", ".join(f"{n} {v:.5f}" for n, v in (("from the lowest end", solution.kld_low),
                                                   ("from the highest end", solution.kld_high)) if v is not None)
    sha = (scan.model.get("sha256") or "")[:12]
    first = (f"# written by lacq's optimizer from a {scan.kind} scan of {scan.model.get('path', '?')} ({sha}),"
             f" {solution.partition} partition, {solution.method}")
    budget = f"{solution.budget / 1e6:.3f} MB" if solution.kind == "weights" else f"{solution.budget:g} bits/value"
    second = (f"# budget {budget}; {where}; predicted mean KLD {solution.kld:.5f} ± {solution.kld_error:.5f} "
              f"from the scan's {solution.chunks}×{scan.ctx} tokens")
    lines = [first, second + (f" ({ends})" if ends else "")]
    if (j := solution.judged) is not None:
        lines.append(f"# judged: measured mean KLD {j.kld:.5f} ± {j.kld_error:.5f} on {j.chunks}×{scan.ctx} tokens "
                     f"(kept: {j.kept})")
    return lines


def _expected(units: list[Unit], solution: Solution) -> dict[str, tuple[str, str]]:
    """tensor -> (chosen type, the type llama.cpp writes for it per the scan)."""
    out = {}
    for u in units:
        t = solution.choice[u.id]
        for name in u.tensors:
            out[name] = (t, u.replaced.get(t, t))
    return out


def _render_recipe(solution: Solution, scan: Scan, name: str, description: str, base: str,
                   rules: list[tuple[str | None, str, str]]) -> str:
    lines = _summary(solution, scan) + [
        f"name = {_q(name)}", f"description = {_q(description)}", 'base = "{base}"', "", "[params]",
        f"base = {_q(base)}"]
    for layers, tensors, t in rules:
        lines += ["", "[[rules]]"] + ([f"layers = {_q(layers)}"] if layers is not None else []) + [
            f"tensors = {_q(tensors)}", f"type = {_q(t)}"]
    return "\n".join(lines) + "\n"


def weights_recipe_toml(solution: Solution, scan: Scan, name: str, *, description: str | None = None,
                        model: ModelInfo | None = None) -> str:
    """A lacq weight recipe: `base` = the lowest candidate, one rule per (type, block set), the base type's
    units included.

    Every scanned tensor is named, so llama-quantize's own mix for the base ftype
    (tied embeddings to q6_K, the K-quant and IQ4_NL ftypes' attn_v/ffn_down bumps)
    touches none of them: pinning only the tensors that mix would bump shifts its
    ffn_down/attn_v counters onto the next unpinned ones. With `model`, the recipe
    is resolved against it and checked to give every scanned tensor its chosen
    type (or the replacement the scan records): anything else raises.
    """
    units = _units(solution, scan, "weights")
    base = _base_type(solution)
    assign = {t: solution.choice[u.id] for u in units for t in u.tensors}
    if upper := [t for t in assign if t != t.lower()]:
        raise OptimizeError(f"tensor {upper[0]} has upper-case letters: llama-quantize lowercases patterns, no rule names it")
    description = description or (f"Optimized for {solution.size_mb:.3f} MB: predicted mean KLD {solution.kld:.5f}"
                                  f" ± {solution.kld_error:.5f} ({solution.partition} units, {solution.method}).")
    text = _render_recipe(solution, scan, name, description, base, _rules(assign, solution.types))
    if model is None:
        return text
    expected = _expected(units, solution)
    types = resolve_recipe(parse_recipe(tomllib.loads(text), name), model).tensor_types
    if absent := [t for t in expected if t not in types]:
        raise OptimizeError(f"the model has no tensor {absent[0]} ({len(absent)} scanned tensors absent): another model?")
    if wrong := [(t, c, types[t]) for t, (c, w) in expected.items() if types[t] not in (c, w)]:
        t, c, got = wrong[0]
        raise OptimizeError(f"the recipe would give {t} type {got}, not the chosen {c} ({len(wrong)} tensors differ): "
                            "llama.cpp replaces it and the scan does not record that")
    return text


@dataclass(frozen=True)
class TensorTypeFile:
    text: str  # --tensor-type-file lines: one anchored pattern per scanned tensor
    ftype: str  # llama-quantize's positional type argument, e.g. Q4_0
    base: str  # the base type's lacq name, e.g. q4_0


def tensor_type_file(solution: Solution, scan: Scan) -> TensorTypeFile:
    """`--tensor-type-file` lines for stock llama-quantize (the format takes no comments), and the ftype.

    Every scanned tensor gets its line, base-type ones included, so the ftype's
    own mix cannot move them: `llama-quantize --tensor-type-file F in.gguf out.gguf FTYPE`
    writes the chosen types without lacq.
    """
    units = _units(solution, scan, "weights")
    base = _base_type(solution)
    assign = {t: solution.choice[u.id] for u in units for t in u.tensors}
    if upper := [t for t in assign if t != t.lower()]:
        raise OptimizeError(f"tensor {upper[0]} has upper-case letters: llama-quantize lowercases patterns")

    def order(name: str) -> tuple[int, str]:
        m = _TENSOR.match(name)
        return (int(m.group(1)) if m.group(1) else -1, name)

    escape = lambda name: "".join("\\" + c if c in _REGEX_SPECIAL else c for c in name)
    text = "".join(f"^{escape(t)}$={assign[t]}\n" for t in sorted(assign, key=order))
    return TensorTypeFile(text, BASE_FTYPES[base], base)


def _ordinal(u: Unit) -> int:
    if u.ordinal is not None:
        return u.ordinal
    m = re.fullmatch(r"kv\.(\d+)", u.id)
    if not m:
        raise OptimizeError(f"KV unit {u.id} has no ordinal")
    return int(m.group(1))


def kv_policy_toml(solution: Solution, scan: Scan, name: str, *, description: str | None = None) -> str:
    """A lacq KV policy: every KV layer of the scanned cache(s) at the lowest type, then runs of the others.

    Which cache: `scan.base["cache"]` ("v", "k" or "both"). The pin of every layer
    (`0..-1`) first makes the policy mean the solution whatever --ctk/--ctv say;
    the other cache's type during the scan (`scan.base["other"]`, as `lacq scan kv`
    writes it; `scan.base["k"]` / `["v"]` where a scan names it so) becomes the
    policy's default for it, so that the policy runs as the scan measured.
    """
    units = _units(solution, scan, "kv")
    cache = scan.base.get("cache")
    if cache not in ("v", "k", "both"):
        raise OptimizeError(f"the scan does not say which cache it varied (base['cache'] is {cache!r}; expected v, k or both)")
    low = solution.lowest
    types = {_ordinal(u): solution.choice[u.id] for u in units}
    runs: list[tuple[int, int, str]] = []
    for o in sorted(types):
        if types[o] == low:
            continue
        if runs and runs[-1][1] == o - 1 and runs[-1][2] == types[o]:
            runs[-1] = (runs[-1][0], o, types[o])
        else:
            runs.append((o, o, types[o]))
    roles = {"v": ("v",), "k": ("k",), "both": ("k", "v")}[cache]
    description = description or (f"Optimized for {solution.bits_per_value:.4f} bits/value: predicted mean KLD "
                                  f"{solution.kld:.5f} ± {solution.kld_error:.5f}.")
    lines = _summary(solution, scan) + [f"name = {_q(name)}", f"description = {_q(description)}"]
    for role in ("k", "v"):
        default = low if role in roles else (scan.base.get(role) or scan.base.get("other"))
        if default:
            lines.append(f"{role} = {_q(default)}")
    for role in roles:
        lines += ["", f"[[{role}_layers]]", 'layers = "0..-1"', f"type = {_q(low)}"]
        for a, b, t in runs:
            lines += ["", f"[[{role}_layers]]", f"layers = {_q(str(a) if a == b else f'{a}..{b}')}", f"type = {_q(t)}"]
    return "\n".join(lines) + "\n"


# --- Pareto ---------------------------------------------------------------------


@dataclass(frozen=True)
class ParetoPoint:
    label: str
    x: float  # size in MB (weights) or bits/value (KV)
    kld: float
    kld_error: float = 0.0
    series: str = "optimized (predicted)"  # e.g. "hand recipes", "llama.cpp mixes", "optimized (measured)"
    predicted: bool = False
    on_front: bool = False  # no other point of its kind (predicted or measured) is both smaller and better


def pareto_points(solutions: Iterable[Solution] = (), measured: Iterable[ParetoPoint | tuple] = (), *,
                  series: str = "optimized (predicted)") -> list[ParetoPoint]:
    """Points for a size/quality plot: each solution's prediction, then measured points
    (`ParetoPoint`s or `(label, x, kld, kld_error, series)` tuples); `on_front` is marked
    among predicted and among measured points separately (a prediction never dominates a measurement)."""
    pts = []
    for s in solutions:
        x = s.size_mb if s.kind == "weights" else s.bits_per_value
        label = f"{x:.1f} MB" if s.kind == "weights" else f"{x:.2f} b/v"
        pts.append(ParetoPoint(label, x, s.kld, s.kld_error, series, predicted=True))
    for m in measured:
        pts.append(m if isinstance(m, ParetoPoint) else ParetoPoint(m[0], float(m[1]), float(m[2]), float(m[3]), m[4]))

    def dominated(p: ParetoPoint) -> bool:
        return any(q is not p and q.predicted == p.predicted and q.x <= p.x and q.kld <= p.kld
                   and (q.x < p.x or q.kld < p.kld) for q in pts)

    return [ParetoPoint(p.label, p.x, p.kld, p.kld_error, p.series, p.predicted, not dominated(p)) for p in pts]


def plot_pareto(points: Iterable[ParetoPoint], out_png: Path, *, title: str | None = None,
                xlabel: str = "size (MB)") -> Path:
    """Size (or bits/value) against mean KLD on a log axis, one series per kind of point, every point labelled."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    points = list(points)
    if not points:
        raise OptimizeError("no points to plot")
    floor = min((p.kld for p in points if p.kld > 0), default=1e-6) / 2
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for name in dict.fromkeys(p.series for p in points):
        pts = sorted((p for p in points if p.series == name), key=lambda p: p.x)
        ys = [max(p.kld, floor) for p in pts]
        # a series made with an importance matrix ("llama.cpp mix + imatrix") in hollow markers, beside its plain one
        ax.errorbar([p.x for p in pts], ys, yerr=[p.kld_error for p in pts], capsize=2, label=name,
                    marker="o" if not pts[0].predicted else "s", linestyle="-" if pts[0].predicted else "none",
                    **({"markerfacecolor": "none"} if "imatrix" in name else {}))
        for p, y in zip(pts, ys):
            ax.annotate(p.label + (" *" if p.on_front else ""), (p.x, y), fontsize=6, xytext=(3, 3),
                        textcoords="offset points")
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("mean KLD (log)")
    ax.set_title(title or "size against KLD (* on the Pareto front of its kind)", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(True, which="both", alpha=0.3)
    out_png = Path(out_png)
    with atomic_output(out_png) as part:
        fig.savefig(part, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    return out_png
