"""Multiple-choice knapsack: one option per item, total cost within a budget, most value; greedy and exact DP.

Both solvers take the same `items`: for each item a list of `(cost, value)`
options, and return one option index per item. Costs are non-negative floats
(bytes, bits × values); values are what the caller maximises (predicted KLD
gains). Neither knows what an item is.

`greedy` walks each item's upper convex hull of (cost, value) and takes the
upgrades in order of value per unit of cost while they fit, then fills what is
left with the single change that gains most. It is optimal when the last
upgrade fits exactly and close otherwise; it costs O(options · log options).

`dp` is exact over discretised costs. Cost increments above each item's
cheapest option are divided by a step: when every increment is (close to) an
integer and `items × (slack / gcd + 1)` cells fit in `max_cells`, the step is
their gcd and the answer is the true optimum (`exact=True`). Otherwise the slack
is cut into `max_cells / items` bins and increments are rounded *up*, so the
answer still fits the real budget and is optimal for the rounded costs, but the
true optimum may be missed by what rounding takes (`exact=False`); a fill pass
then spends what rounding left over.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

Items = list[list[tuple[float, float]]]

MAX_CELLS = 5_000_000
MIN_BINS = 64  # below this a rounded DP says little; it is skipped
_EPS = 1e-9


@dataclass(frozen=True)
class Pick:
    choice: tuple[int, ...]  # option index per item
    cost: float
    value: float
    method: str  # greedy | dp
    exact: bool = True  # dp: whether the discretisation lost nothing
    step: float = 0.0  # dp: cost per bin


def evaluate(items: Items, choice: tuple[int, ...] | list[int]) -> tuple[float, float]:
    return (sum(items[i][k][0] for i, k in enumerate(choice)), sum(items[i][k][1] for i, k in enumerate(choice)))


def cheapest(items: Items) -> list[int]:
    """Each item's cheapest option; among equally cheap ones the most valuable."""
    return [min(range(len(opts)), key=lambda k: (opts[k][0], -opts[k][1])) for opts in items]


def _fits(cost: float, capacity: float) -> bool:
    return cost <= capacity + _EPS * max(1.0, abs(capacity))


def _hull(opts: list[tuple[float, float]]) -> list[int]:
    """Indices on the upper-left convex hull of (cost, value), cheapest first, values strictly rising."""
    order = sorted(range(len(opts)), key=lambda k: (opts[k][0], -opts[k][1]))
    frontier: list[int] = []
    for k in order:  # drop dominated options: not cheaper and not better
        if not frontier or opts[k][1] > opts[frontier[-1]][1]:
            if frontier and opts[k][0] == opts[frontier[-1]][0]:
                continue
            frontier.append(k)
    hull: list[int] = []
    for k in frontier:
        while len(hull) >= 2:
            (c1, v1), (c2, v2), (c3, v3) = opts[hull[-2]], opts[hull[-1]], opts[k]
            # hull[-1] lies on or below the segment hull[-2] -> k: not an efficient step
            if (v2 - v1) * (c3 - c1) <= (v3 - v1) * (c2 - c1):
                hull.pop()
            else:
                break
        hull.append(k)
    return hull


def greedy(items: Items, capacity: float) -> Pick:
    """Convex-hull upgrades by value per cost, then a fill pass; `capacity` bounds the total cost."""
    choice = cheapest(items)
    spent = sum(items[i][k][0] for i, k in enumerate(choice))
    if not _fits(spent, capacity):
        raise ValueError(f"the cheapest options cost {spent}, above the capacity {capacity}")
    steps = []  # (ratio, -gain, item, position on the item's hull)
    hulls = [_hull(opts) for opts in items]
    for i, hull in enumerate(hulls):
        for pos in range(1, len(hull)):
            (c0, v0), (c1, v1) = items[i][hull[pos - 1]], items[i][hull[pos]]
            steps.append(((v1 - v0) / (c1 - c0), -(v1 - v0), i, pos))
    steps.sort(key=lambda s: (-s[0], s[1], s[2], s[3]))
    position = [0] * len(items)
    blocked = [False] * len(items)
    for _, _, i, pos in steps:
        if blocked[i] or position[i] != pos - 1:
            continue
        extra = items[i][hulls[i][pos]][0] - items[i][hulls[i][pos - 1]][0]
        if _fits(spent + extra, capacity):
            position[i], choice[i] = pos, hulls[i][pos]
            spent += extra
        else:
            blocked[i] = True  # its later hull steps build on this one
    _fill(items, choice, capacity)
    cost, value = evaluate(items, choice)
    return Pick(tuple(choice), cost, value, "greedy")


def _fill(items: Items, choice: list[int], capacity: float) -> None:
    """Repeat the single change of one item that gains most and still fits, until none does."""
    spent = sum(items[i][k][0] for i, k in enumerate(choice))
    while True:
        best = None
        for i, opts in enumerate(items):
            c0, v0 = opts[choice[i]]
            for k, (c, v) in enumerate(opts):
                better = v > v0 + _EPS * max(1.0, abs(v0)) and (best is None or v - v0 > best[0])
                if better and _fits(spent - c0 + c, capacity):
                    best = (v - v0, i, k)
        if best is None:
            return
        _, i, k = best
        spent += items[i][k][0] - items[i][choice[i]][0]
        choice[i] = k


def dp_plan(items: Items, capacity: float, max_cells: int = MAX_CELLS) -> tuple[float, list[list[int]], int, bool] | None:
    """(step, integer cost increments per option, bins, exact) for `dp`, or None when too coarse to help."""
    base = cheapest(items)
    floor_cost = sum(items[i][k][0] for i, k in enumerate(base))
    slack = max(0.0, capacity - floor_cost)
    deltas = [[max(0.0, c - opts[base[i]][0]) for c, _ in opts] for i, opts in enumerate(items)]
    n = max(1, len(items))
    flat = [d for ds in deltas for d in ds if d > 0]
    if not flat or slack <= _EPS * max(1.0, capacity):
        return (1.0, [[0 if d == 0 else 1 << 62 for d in ds] for ds in deltas], 0, True)
    if all(abs(d - round(d)) < 1e-6 for d in flat):
        g = 0
        for d in flat:
            g = math.gcd(g, round(d))
        bins = math.floor(slack / g + 1e-9)
        if n * (bins + 1) <= max_cells:
            return (float(g), [[round(d) // g for d in ds] for ds in deltas], bins, True)
    bins = max_cells // n - 1
    if bins < MIN_BINS:
        return None
    step = slack / bins
    return (step, [[math.ceil(d / step - 1e-9) for d in ds] for ds in deltas], bins, False)


def dp(items: Items, capacity: float, max_cells: int = MAX_CELLS) -> Pick | None:
    """The most valuable choice within `capacity` over discretised costs (see the module docstring)."""
    plan = dp_plan(items, capacity, max_cells)
    if plan is None:
        return None
    step, weights, bins, exact = plan
    best = np.zeros(bins + 1)  # best value of the items so far within each number of bins ("at most")
    picks = np.zeros((len(items), bins + 1), dtype=np.int16)
    for i, opts in enumerate(items):
        new = np.full(bins + 1, -np.inf)
        arg = np.zeros(bins + 1, dtype=np.int16)
        # cheapest options first, so ties keep the cheaper option
        for k in sorted(range(len(opts)), key=lambda k: (weights[i][k], opts[k][0])):
            w = weights[i][k]
            if w > bins:
                continue
            cand = best[: bins + 1 - w] + opts[k][1]
            better = cand > new[w:]
            new[w:][better] = cand[better]
            arg[w:][better] = k
        best, picks[i] = new, arg
    choice = [0] * len(items)
    b = bins
    for i in range(len(items) - 1, -1, -1):
        k = int(picks[i][b])
        choice[i] = k
        b -= weights[i][k]
    if not exact:  # rounding up left some of the real budget unspent
        _fill(items, choice, capacity)
    cost, value = evaluate(items, choice)
    return Pick(tuple(choice), cost, value, "dp", exact=exact, step=step)
