"""The budget optimizer: one candidate type per scanned unit, least predicted KLD within a size or bits budget.

A pure function of a scan artifact (`lacq.studies.artifact.Scan`) and a budget: weights scans take
it in bytes of the whole file (`scan.fixed_cost` included; `bpw_budget` converts tensor bits per
weight), KV scans in bits/value (`(Σ cost + fixed_cost) / scan.total_values`).

**Partition** (`partition_units`). Units of one kind that cover the scanned tensors once: tensor
units when the scan has them, else block or group units (both present: the one predicting the
lower KLD, said in `Solution.notes`); embedding and output units join every weights partition. KV
scans have one partition, their KV layers.

**Prediction.** Additive around either end of the scan (U = the uniform runs):

    from the lowest end:   kld_low  = U[lowest]  - Σ_u (U[lowest] - raise_u[t_u])   (floored at 0)
    from the highest end:  kld_high = U[highest] + Σ_u (lower_u[t_u] - U[highest])

Each is exact at its own end and for one changed unit. `additivity()` (`Solution.drift`) predicts
each measured uniform run from the units. The quoted `kld`: where each end under-predicts the
uniform run at the other end, the larger of the two; otherwise the ends weighted by the units each
choice moves from them (w_high = n_low / (n_low + n_high)). Negative gains and damages (noise)
count as zero (`Solution.clamped`). The ± sums the standard errors of the measurements used in
quadrature (loose: paired measurements share tokens).

**Search.** The multiple-choice knapsack (`knapsack.greedy`, and the exact `knapsack.dp` where it
fits) maximises a separable objective: the ends weighted 1 - f and f (f: where the budget lies
between all-lowest and all-highest), and each end alone. Each objective proposes a choice; the one
with the least quoted `kld` is returned, the other distinct proposals in `Solution.alternatives`
(`lacq optimize --verify` measures them all: studies/refine.py).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace

from lacq.errors import LacqError
from lacq.studies import knapsack
from lacq.studies.artifact import Kld, Scan, Unit

WEIGHT_PARTITIONS = ("tensor", "block", "group")  # finest first
# weights units outside the blocks (studies/scan.weight_units names them): part of every weights partition
WHOLE_KINDS = ("embedding", "output", "extra")
METHODS = ("auto", "greedy", "dp")


class OptimizeError(LacqError):
    """The optimizer cannot answer for this scan and budget."""


class EmptyScanError(OptimizeError):
    """The scan has no units, types or the measurements a prediction needs."""


class BudgetError(OptimizeError):
    """The budget lies outside what the candidate types can reach."""


class ScanMismatchError(OptimizeError):
    """The scan was made on another model."""


class TypeChoiceError(OptimizeError):
    """A requested type is not a scanned candidate."""


class PartitionError(OptimizeError):
    """The scan's units cannot be split into one non-overlapping partition."""


@dataclass(frozen=True)
class Prediction:
    kld: float  # the two ends combined by `quote` (the number to quote)
    kld_low: float | None  # additive from the all-lowest run
    kld_high: float | None  # additive from the all-highest run
    kld_error: float  # rough ± (see the module docstring)
    frac: float  # where the cost lies between all-lowest (0) and all-highest (1)


@dataclass(frozen=True)
class Judged:
    """A choice measured by `lacq optimize --verify` or `--refine` (studies/refine.py) on its assembled file."""

    kld: float
    kld_error: float
    chunks: int  # the chunks it was measured on (of the scan's context)
    kept: str  # which proposal it was, or "refined"


@dataclass(frozen=True)
class Solution:
    kind: str  # weights | kv
    cache: str | None  # kv: which cache the scan varied (v, k, both)
    partition: str  # tensor | block | group | kv_layer
    budget: float  # as asked: bytes (weights) or bits/value (kv)
    budget_cost: float  # the budget in the scan's cost unit
    cost: float  # total, fixed cost included
    size_mb: float | None  # weights: cost / 1e6
    bits_per_value: float | None  # kv: cost / total_values
    kld: float  # predicted (quoted) from the scan, on its `chunks`; kld_low/kld_high/kld_error likewise
    kld_low: float | None
    kld_high: float | None
    kld_error: float
    frac: float
    method: str  # greedy | dp: whose answer this is (curve: a smaller budget's answer, still the best)
    dp_exact: bool | None  # None: the DP did not run
    greedy_kld: float | None  # each solver's answer under the optimized objective
    dp_kld: float | None
    gap: float | None  # greedy_kld - dp_kld where both ran
    types: tuple[str, ...]  # the candidate types, cheapest first
    choice: dict[str, str]  # unit id -> chosen type, in scan order
    unit_costs: dict[str, float]
    held: tuple[str, ...] = ()  # units kept at the lowest candidate (exclude_units)
    clamped: tuple[tuple[str, str, str, float], ...] = ()  # (unit, type, gain|damage, raw value < 0)
    drift: dict[str, dict[str, float | None]] = field(default_factory=dict)  # additivity(): per uniform run
    notes: tuple[str, ...] = ()
    model_sha256: str | None = None
    # the other objectives' distinct proposals: (choice, quoted kld, which objective, solver), best quoted first;
    # `lacq optimize --verify` measures them beside the answer and keeps the best measured
    alternatives: tuple[tuple[dict[str, str], float, str, str], ...] = ()
    chunks: int = 0  # the scan's chunks: what the prediction rests on
    judged: Judged | None = None  # the choice as measured by --verify or --refine, where it was
    bpw: float | None = None  # weights: tensor bits per weight (llama.cpp's), where the scan records its terms

    @property
    def lowest(self) -> str:
        return self.types[0]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["clamped"] = [list(c) for c in self.clamped]
        d["predicted"] = {"kld": self.kld, "kld_low": self.kld_low, "kld_high": self.kld_high,
                          "kld_error": self.kld_error, "chunks": self.chunks}
        return d


# --- problem set-up -------------------------------------------------------------


@dataclass(frozen=True)
class _Problem:
    scan: Scan
    partition: str
    units: tuple[Unit, ...]
    types: tuple[str, ...]  # candidates, scan order
    held: frozenset[str]
    low: Kld | None  # uniform at the scan's lowest type, when raise data make the low end usable
    high: Kld | None  # uniform at the scan's highest type, when lower data make the high end usable
    end_costs: tuple[float, float]  # totals at all-lowest and all-highest of the scan
    quote: str = "units"  # larger | units: how the quoted kld combines the ends (the module docstring)

    def options(self, u: Unit) -> tuple[str, ...]:
        return (self.types[0],) if u.id in self.held else self.types

    def gain(self, u: Unit, t: str) -> float:
        return 0.0 if t == self.scan.lowest else self.low.kld - u.raise_[t].kld

    def damage(self, u: Unit, t: str) -> float:
        return 0.0 if t == self.scan.highest else u.lower[t].kld - self.high.kld

    def frac(self, cost: float) -> float:
        lo, hi = self.end_costs
        return 0.0 if hi <= lo else min(1.0, max(0.0, (cost - lo) / (hi - lo)))

    def weights(self, f: float) -> tuple[float, float]:
        """The weights of kld_low and kld_high in the search's objective."""
        if self.low is None:
            return 0.0, 1.0
        if self.high is None:
            return 1.0, 0.0
        return 1.0 - f, f

    def value(self, u: Unit, t: str, f: float) -> float:
        """The objective's gain of unit u at type t: clamped gains and damages weighted by f."""
        wl, wh = self.weights(f)
        v = 0.0
        if wl:
            v += wl * max(0.0, self.gain(u, t))
        if wh:
            v -= wh * max(0.0, self.damage(u, t))
        return v

    def constant(self, f: float) -> float:
        wl, wh = self.weights(f)
        return (wl * self.low.kld if wl else 0.0) + (wh * self.high.kld if wh else 0.0)

    def predict(self, choice: dict[str, str]) -> Prediction:
        cost = self.scan.fixed_cost + sum(u.cost[choice[u.id]] for u in self.units)
        f = self.frac(cost)
        low = high = None
        err_low = err_high = 0.0
        if self.low is not None:
            # floored at zero: summed gains can pass the whole KLD where units are far from additive
            low = max(0.0, self.low.kld - sum(max(0.0, self.gain(u, choice[u.id])) for u in self.units))
            err_low = math.sqrt(self.low.kld_error ** 2 + sum(
                u.raise_[t].kld_error ** 2 for u in self.units if (t := choice[u.id]) != self.scan.lowest))
        if self.high is not None:
            high = self.high.kld + sum(max(0.0, self.damage(u, choice[u.id])) for u in self.units)
            err_high = math.sqrt(self.high.kld_error ** 2 + sum(
                u.lower[t].kld_error ** 2 for u in self.units if (t := choice[u.id]) != self.scan.highest))
        if high is None:
            return Prediction(low, low, high, err_low, f)
        if low is None:
            return Prediction(high, low, high, err_high, f)
        if self.quote == "larger":
            return Prediction(low, low, high, err_low, f) if low >= high else Prediction(high, low, high, err_high, f)
        n_low = sum(1 for u in self.units if choice[u.id] != self.scan.lowest)
        n_high = sum(1 for u in self.units if choice[u.id] != self.scan.highest)
        wh = n_low / (n_low + n_high) if n_low + n_high else 0.0
        return Prediction((1 - wh) * low + wh * high, low, high, (1 - wh) * err_low + wh * err_high, f)

    def end_drift(self) -> tuple[float | None, float | None]:
        """kld_low's error at the all-highest run and kld_high's at the all-lowest (None where not measured)."""
        lo, hi = self.scan.lowest, self.scan.highest
        if self.low is None or self.high is None or not all(lo in u.cost and hi in u.cost for u in self.units):
            return None, None
        at_high = self.predict({u.id: hi for u in self.units}).kld_low - self.high.kld
        at_low = self.predict({u.id: lo for u in self.units}).kld_high - self.low.kld
        return at_high, at_low


def partition_units(scan: Scan) -> dict[str, tuple[Unit, ...]]:
    """Every usable non-overlapping partition of the scan's units, finest first; refuses when there is none."""
    if not scan.units:
        raise EmptyScanError("the scan has no units: nothing to optimize")
    if scan.kind == "kv":
        units = tuple(u for u in scan.units if u.kind == "kv_layer")
        if not units:
            raise PartitionError("the KV scan has no kv_layer units")
        return {"kv_layer": units}
    if scan.kind != "weights":
        raise OptimizeError(f"unknown scan kind {scan.kind!r}; expected weights or kv")
    covered = {t for u in scan.units for t in u.tensors}
    found, why = {}, []
    for name in WEIGHT_PARTITIONS:
        units = tuple(u for u in scan.units if u.kind == name)
        if not units:
            continue
        units = tuple(u for u in scan.units if u.kind == name or u.kind in WHOLE_KINDS)
        owner: dict[str, str] = {}
        clash = None
        for u in units:
            for t in u.tensors:
                if t in owner and clash is None:
                    clash = f"{name} partition: units {owner[t]} and {u.id} both hold {t}"
                owner[t] = u.id
        missing = covered - set(owner)
        if clash:
            why.append(clash)
        elif missing:
            why.append(f"{name} partition leaves {len(missing)} scanned tensor(s) out, e.g. {min(missing)}")
        else:
            found[name] = units
    if not found:
        kinds = sorted({u.kind for u in scan.units})
        detail = "; ".join(why) if why else f"unit kinds {', '.join(kinds)} hold no block, group or tensor units"
        raise PartitionError(f"no non-overlapping partition of the scan's units: {detail}")
    return found


def _problem(scan: Scan, partition: str, units: tuple[Unit, ...], types: Sequence[str] | None,
             exclude_units: Iterable[str]) -> _Problem:
    if not scan.types:
        raise EmptyScanError("the scan lists no candidate types")
    chosen = tuple(scan.types) if types is None else tuple(dict.fromkeys(t.strip().lower() for t in types))
    if not chosen:
        raise TypeChoiceError("no candidate types given")
    for t in chosen:
        if t not in scan.types:
            why = f" (the scan excluded it: {scan.excluded_types[t]})" if t in scan.excluded_types else ""
            raise TypeChoiceError(f"type {t} was not scanned{why}; scanned types: {', '.join(scan.types)}")
    chosen = tuple(t for t in scan.types if t in chosen)  # cheapest first, as the scan orders them
    missing_cost = [(u.id, t) for u in units for t in chosen if t not in u.cost]
    if missing_cost:
        uid, t = missing_cost[0]
        raise EmptyScanError(f"the scan has no cost for unit {uid} at {t} ({len(missing_cost)} unit/type pairs lack one)")

    def gaps(attr: str, end: str) -> list[str]:
        return [f"{u.id}@{t}" for u in units for t in chosen if t != end and t not in getattr(u, attr)]

    low_gaps = gaps("raise_", scan.lowest) + ([] if scan.lowest in scan.uniform else [f"uniform@{scan.lowest}"])
    high_gaps = gaps("lower", scan.highest) + ([] if scan.highest in scan.uniform else [f"uniform@{scan.highest}"])
    if low_gaps and high_gaps:
        raise EmptyScanError(f"the scan lacks measurements for types {', '.join(chosen)}: raise {', '.join(low_gaps[:3])}"
                             f"{' …' if len(low_gaps) > 3 else ''} and lower {', '.join(high_gaps[:3])}"
                             f"{' …' if len(high_gaps) > 3 else ''}")
    by_id = {u.id: u for u in scan.units}
    held = set()
    for uid in exclude_units:
        if uid not in by_id:
            raise OptimizeError(f"exclude_units: no unit {uid!r} in the scan; units look like {', '.join(list(by_id)[:4])}")
        tensors = set(by_id[uid].tensors)
        held.update(u.id for u in units if u.id == uid or (tensors and tensors & set(u.tensors)))
    ends = tuple(scan.fixed_cost + sum(u.cost.get(t, math.nan) for u in units) for t in (scan.lowest, scan.highest))
    if any(math.isnan(c) for c in ends):
        ends = (scan.fixed_cost + sum(u.cost[chosen[0]] for u in units),
                scan.fixed_cost + sum(u.cost[chosen[-1]] for u in units))
    p = _Problem(scan, partition, units, chosen, frozenset(held),
                 None if low_gaps else scan.uniform[scan.lowest],
                 None if high_gaps else scan.uniform[scan.highest], ends)
    at_high, at_low = p.end_drift()
    tol = 1e-12
    if at_high is not None and at_high <= tol and at_low <= tol:
        p = replace(p, quote="larger")
    return p


# --- budgets --------------------------------------------------------------------


def _to_cost(scan: Scan, budget: float) -> float:
    if scan.kind == "kv":
        if not scan.total_values > 0:
            raise EmptyScanError("the KV scan records no total_values: bits/value budgets cannot be priced")
        return budget * scan.total_values
    return float(budget)


def _from_cost(scan: Scan, cost: float) -> float:
    return cost / scan.total_values if scan.kind == "kv" else cost


def _bpw_terms(scan: Scan) -> tuple[float, float]:
    """(tensor elements, bytes of the file outside its tensors) of a weights scan."""
    if scan.kind != "weights":
        raise OptimizeError(f"bits per weight price weights scans; this is a {scan.kind} scan")
    n, overhead = scan.model.get("n_elements"), scan.model.get("overhead_bytes")
    if not n:
        raise EmptyScanError("the scan records no n_elements (the model's weight count), so a budget in bits per "
                             "weight cannot be priced; give the size in MB")
    if overhead is None:
        raise EmptyScanError("the scan records no overhead_bytes (its files' header and padding; scans of older lacq "
                             "versions lack it), so a budget in bits per weight cannot be priced; give the size in MB "
                             "or scan again")
    return float(n), float(overhead)


def bpw_budget(scan: Scan, bpw: float) -> float:
    """The whole-file bytes of a budget in tensor bits per weight, as llama.cpp and `lacq inspect` count them
    (Σ tensor bytes × 8 / Σ tensor elements)."""
    n, overhead = _bpw_terms(scan)
    return bpw * n / 8 + overhead


def bits_per_weight(scan: Scan, cost: float) -> float | None:
    """The tensor bits per weight of a whole-file cost (None where the scan cannot say)."""
    try:
        n, overhead = _bpw_terms(scan)
    except OptimizeError:
        return None
    return (cost - overhead) * 8 / n


def _show(scan: Scan, cost: float) -> str:
    """A cost in the user's units: bits/value for KV, MB and bytes (and bits per weight) for weights."""
    if scan.kind == "kv":
        return f"{_from_cost(scan, cost):.4f} bits/value"
    bpw = bits_per_weight(scan, cost)
    return f"{cost / 1e6:.3f} MB ({cost:.0f} bytes{'' if bpw is None else f', {bpw:.4f} bpw'})"


def _limits(p: _Problem) -> tuple[float, float]:
    lo = p.scan.fixed_cost + sum(min(u.cost[t] for t in p.options(u)) for u in p.units)
    hi = p.scan.fixed_cost + sum(max(u.cost[t] for t in p.options(u)) for u in p.units)
    return lo, hi


def budget_limits(scan: Scan, *, types: Sequence[str] | None = None, exclude_units: Iterable[str] = (),
                  partition: str | None = None) -> tuple[float, float]:
    """The smallest and largest budget `optimize` accepts, in its units (bytes, or bits/value for KV)."""
    found = partition_units(scan)
    name = partition or next(iter(found))
    lo, hi = _limits(_problem(scan, name, _pick_partition(found, name), types, exclude_units))
    return _from_cost(scan, lo), _from_cost(scan, hi)


def check_scan_matches(scan: Scan, model_sha256: str) -> None:
    """Refuse a scan made on another model than the one whose sha256 is given."""
    scanned = scan.model.get("sha256")
    if not scanned:
        raise ScanMismatchError("the scan records no model sha256, so it cannot be checked against this model")
    if scanned.lower() != model_sha256.lower():
        name = scan.model.get("path") or scan.model.get("architecture") or "another model"
        raise ScanMismatchError(f"the scan was made on {name} (sha256 {scanned[:12]}…), "
                                f"not on this model (sha256 {model_sha256[:12]}…)")


# --- solving --------------------------------------------------------------------


def _pick_partition(found: dict[str, tuple[Unit, ...]], name: str) -> tuple[Unit, ...]:
    if name not in found:
        raise PartitionError(f"partition {name!r} is not usable in this scan; usable: {', '.join(found)}")
    return found[name]


def _solve(p: _Problem, budget: float, method: str, max_cells: int,
           incumbents: Sequence[dict[str, str]] = ()) -> Solution:
    scan = p.scan
    cap = _to_cost(scan, budget)
    lo, hi = _limits(p)
    tol = 1e-9 * max(1.0, abs(hi))
    if cap < lo - tol or cap > hi + tol:
        side = "below the smallest" if cap < lo else "above the largest"
        raise BudgetError(f"budget {_show(scan, cap)} is {side} possible: {_show(scan, lo)} (every unit at its "
                          f"cheapest candidate) to {_show(scan, hi)} (every unit at its dearest) with types "
                          f"{', '.join(p.types)}")
    cap = min(max(cap, lo), hi)
    f = p.frac(cap)
    opts = [p.options(u) for u in p.units]
    room = cap - scan.fixed_cost

    def solve(w: float) -> tuple[knapsack.Items, list[knapsack.Pick], knapsack.Pick | None]:
        items = [[(u.cost[t], p.value(u, t, w)) for t in ts] for u, ts in zip(p.units, opts)]
        picks = []
        if method in ("auto", "greedy"):
            picks.append(knapsack.greedy(items, room))
        dp = knapsack.dp(items, room, max_cells) if method in ("auto", "dp") else None
        if method == "dp" and dp is None:
            raise OptimizeError(f"the problem is too large for the DP ({len(items)} units; max_cells {max_cells})")
        if dp is not None:
            picks.append(dp)
        return items, picks, dp

    items, picks, dp = solve(f)
    const = p.constant(f)
    greedy_kld = const - picks[0].value if method != "dp" else None
    dp_kld = const - dp.value if dp is not None else None
    # each end's own objective proposes a choice too: the quoted rule is not separable, so the search takes
    # whichever proposal it predicts lowest
    candidates = [(k, "") for k in picks]
    for w, end in ((0.0, "lowest"), (1.0, "highest")):
        if w != f and p.weights(w) != p.weights(f):
            candidates += [(k, f" from the {end} end's objective") for k in solve(w)[1]]
    for inc in incumbents:  # a cheaper budget's answer (curve): never let more budget predict worse
        idx = tuple(opts[i].index(inc[u.id]) if inc.get(u.id) in opts[i] else -1 for i, u in enumerate(p.units))
        if -1 not in idx and (c := knapsack.evaluate(items, idx))[0] <= room + tol:
            candidates.append((knapsack.Pick(idx, c[0], c[1], "curve"), ""))

    def quoted(k: knapsack.Pick) -> tuple[float, float, float]:
        pred = p.predict({u.id: opts[i][j] for i, (u, j) in enumerate(zip(p.units, k.choice))})
        return round(pred.kld, 12), -round(k.value, 12), k.cost

    ranked = sorted(candidates, key=lambda c: quoted(c[0]))
    best, source = ranked[0]
    choice = {u.id: opts[i][k] for i, (u, k) in enumerate(zip(p.units, best.choice))}
    alternatives, seen = [], {best.choice}
    for k, src in ranked[1:]:
        if k.choice not in seen:
            seen.add(k.choice)
            alt = {u.id: opts[i][j] for i, (u, j) in enumerate(zip(p.units, k.choice))}
            what = "a smaller budget's answer" if k.method == "curve" else \
                f"{src.strip().removeprefix('from the ') or 'the budget-weighted objective'} ({k.method})"
            alternatives.append((alt, quoted(k)[0], what, k.method))
    pred = p.predict(choice)
    cost = scan.fixed_cost + sum(u.cost[choice[u.id]] for u in p.units)
    clamped = []
    for u in p.units:
        for t in p.options(u):
            if p.low is not None and (g := p.gain(u, t)) < 0:
                clamped.append((u.id, t, "gain", g))
            if p.high is not None and (d := p.damage(u, t)) < 0:
                clamped.append((u.id, t, "damage", d))
    notes = [f"chosen{source}"] if source else []
    if p.low is None:
        notes.append("no complete raise data: predicted from the highest end only")
    if p.high is None:
        notes.append("no complete lower data: predicted from the lowest end only")
    if p.low is not None and p.high is not None:
        notes.append("quoted kld: the larger end (each end under-predicts the uniform run at the other)"
                     if p.quote == "larger" else
                     "quoted kld: the ends weighted by units moved from each (an end over-predicts the uniform run "
                     "at the other)")
    if scan.excluded_types:
        notes.append("types left out by the scan: " + "; ".join(f"{t} ({w})" for t, w in scan.excluded_types.items()))
    return Solution(
        kind=scan.kind, cache=scan.base.get("cache") if scan.kind == "kv" else None, partition=p.partition,
        budget=budget, budget_cost=_to_cost(scan, budget), cost=cost,
        size_mb=cost / 1e6 if scan.kind == "weights" else None,
        bits_per_value=cost / scan.total_values if scan.kind == "kv" else None,
        kld=pred.kld, kld_low=pred.kld_low, kld_high=pred.kld_high, kld_error=pred.kld_error, frac=pred.frac,
        method=best.method, dp_exact=dp.exact if dp is not None else None, greedy_kld=greedy_kld, dp_kld=dp_kld,
        gap=greedy_kld - dp_kld if greedy_kld is not None and dp_kld is not None else None,
        types=p.types, choice=choice, unit_costs={u.id: u.cost[choice[u.id]] for u in p.units},
        held=tuple(u.id for u in p.units if u.id in p.held), clamped=tuple(clamped), drift=_drift(p),
        notes=tuple(notes), model_sha256=scan.model.get("sha256"), alternatives=tuple(alternatives),
        chunks=scan.chunks, bpw=bits_per_weight(scan, cost) if scan.kind == "weights" else None)


def optimize(scan: Scan, budget: float, *, types: Sequence[str] | None = None, exclude_units: Iterable[str] = (),
             method: str = "auto", partition: str | None = None, max_cells: int = knapsack.MAX_CELLS,
             _incumbents: Sequence[dict[str, str]] = ()) -> Solution:
    """The least-KLD choice of one type per unit whose total cost fits `budget`.

    `budget`: bytes of the whole file for weights scans, bits/value for KV scans.
    `types`: a subset of the scanned types (default all). `exclude_units`: unit
    ids held at the lowest candidate type (an id of another partition holds every
    unit sharing a tensor with it). `method`: auto (greedy, and the exact DP
    where it fits, the better returned), greedy or dp. `partition`: force
    tensor, block or group (see the module docstring for the default).
    """
    if method not in METHODS:
        raise OptimizeError(f"unknown method {method!r}; use {', '.join(METHODS)}")
    found = partition_units(scan)
    if partition is not None:
        names = [partition]
        _pick_partition(found, partition)
    elif "tensor" in found or scan.kind == "kv" or len(found) == 1:
        names = [next(iter(found))]
    else:
        names = list(found)  # block and group: the one that predicts better here
    solved, errors = [], []
    for name in names:
        p = _problem(scan, name, found[name], types, exclude_units)
        try:
            solved.append(_solve(p, budget, method, max_cells, _incumbents))
        except BudgetError as e:
            errors.append(e)
    if not solved:
        raise errors[0]
    best = min(solved, key=lambda s: s.kld)
    if len(solved) > 1:
        others = ", ".join(f"{s.partition} {s.kld:.5f}" for s in solved if s is not best)
        note = f"partition {best.partition} chosen: predicted KLD {best.kld:.5f} against {others}"
        best = replace(best, notes=best.notes + (note,))
    return best


def curve(scan: Scan, budgets: Iterable[float], **kwargs) -> list[Solution]:
    """`optimize` at each budget (same keyword arguments), in the given order.

    Budgets are solved from the smallest up and each answer is offered to the
    next budget, so a larger budget never returns a choice its objective ranks
    below a smaller budget's (greedy alone can do that).
    """
    budgets = list(budgets)
    out: dict[int, Solution] = {}
    seen: list[dict[str, str]] = []
    for i in sorted(range(len(budgets)), key=lambda i: budgets[i]):
        s = optimize(scan, budgets[i], _incumbents=seen, **kwargs)
        seen.append(s.choice)
        out[i] = s
    return [out[i] for i in range(len(budgets))]


# --- additivity -----------------------------------------------------------------


def predict(scan: Scan, choice: dict[str, str], *, partition: str | None = None) -> Prediction:
    """The prediction for any assignment of types to the units of one partition (a hand recipe's, say)."""
    found = partition_units(scan)
    name = partition or next(iter(found))
    units = _pick_partition(found, name)
    if missing := [u.id for u in units if u.id not in choice]:
        raise OptimizeError(f"choice names no type for {len(missing)} unit(s) of the {name} partition, e.g. {missing[0]}")
    p = _problem(scan, name, units, sorted({choice[u.id] for u in units}), ())
    return p.predict({u.id: choice[u.id] for u in units})


def _drift(p: _Problem) -> dict[str, dict[str, float | None]]:
    """For each uniform run the scan measured: the measured KLD and each prediction's error against it."""
    out = {}
    for t, k in p.scan.uniform.items():
        ok_low = p.low is not None and (t == p.scan.lowest or all(t in u.raise_ for u in p.units))
        ok_high = p.high is not None and (t == p.scan.highest or all(t in u.lower for u in p.units))
        if not (ok_low or ok_high) or not all(t in u.cost for u in p.units):
            continue
        probe = _Problem(p.scan, p.partition, p.units, p.types, frozenset(),
                         p.low if ok_low else None, p.high if ok_high else None, p.end_costs, p.quote)
        pred = probe.predict({u.id: t for u in p.units})
        out[t] = {"measured": k.kld,
                  "low_error": None if pred.kld_low is None else pred.kld_low - k.kld,
                  "high_error": None if pred.kld_high is None else pred.kld_high - k.kld,
                  "error": pred.kld - k.kld}
    return out


def additivity(scan: Scan, *, partition: str | None = None) -> dict[str, dict[str, float | None]]:
    """How far the additive predictions drift: each uniform run predicted from the units, minus its measured KLD."""
    found = partition_units(scan)
    name = partition or next(iter(found))
    return _drift(_problem(scan, name, _pick_partition(found, name), None, ()))
