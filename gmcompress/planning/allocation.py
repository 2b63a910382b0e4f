"""The multiple-choice knapsack behind budgets: one option per layer, least total cost under a capacity.

Layer ``l`` has options ``j`` with a cost ``c[l][j]`` (what is minimised: an error, or parameters) and a
weight ``w[l][j]`` (what the budget caps: parameters, seconds, or a squared error). :func:`allocate` picks
one option per layer minimising ``sum_l c[l][j_l]`` subject to ``sum_l w[l][j_l] <= capacity``.

* **Exact**: dynamic programming over the Pareto frontier of partial sums (layers added one at a time;
  a partial choice is kept only if no other has both less weight and less cost, and only while its
  weight leaves room for the lightest options of the layers still to come). Exact whenever the
  frontier stays under ``max_frontier`` points, which covers tens of layers with tens of options.
* **Lagrangian** (larger problems): for a multiplier ``lam`` each layer independently takes
  ``argmin c + lam w``; ``lam`` is bisected to the smallest value whose choice fits, then spare capacity
  is spent greedily on the swaps with the best cost decrease per unit of weight. The dual bound
  ``max_lam sum_l min_j (c + lam w) - lam capacity`` is a lower bound on the optimum, so
  ``cost - bound`` is a stated optimality gap.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["Allocation", "Infeasible", "allocate", "lightest"]


class Infeasible(ValueError):
    """No choice fits the capacity; ``lightest`` is the least total weight any choice has."""

    def __init__(self, message: str, lightest: float) -> None:
        super().__init__(message)
        self.lightest = lightest


@dataclass(frozen=True)
class Allocation:
    """The chosen option index per layer, its total cost and weight, and a lower bound on the optimal cost."""

    choice: tuple[int, ...]
    cost: float
    weight: float
    bound: float  # equals ``cost`` when ``exact``
    exact: bool

    @property
    def gap(self) -> float:
        """``cost - bound``: how far above the optimum this choice can be (0 when exact)."""
        return max(self.cost - self.bound, 0.0)


def lightest(weights: Sequence[Sequence[float]]) -> float:
    return sum(min(w) for w in weights)


def allocate(
    costs: Sequence[Sequence[float]],
    weights: Sequence[Sequence[float]],
    capacity: float,
    max_frontier: int = 50_000,
) -> Allocation:
    """Least-cost choice of one option per layer with total weight at most ``capacity`` (see the module doc)."""
    _check(costs, weights)
    if lightest(weights) > capacity * (1 + 1e-12):
        raise Infeasible(f"the lightest choice weighs {lightest(weights):g} > capacity {capacity:g}", lightest(weights))
    exact = _pareto(costs, weights, capacity, max_frontier)
    if exact is not None:
        return exact
    return _lagrangian(costs, weights, capacity)


def _check(costs: Sequence[Sequence[float]], weights: Sequence[Sequence[float]]) -> None:
    if len(costs) != len(weights) or any(len(c) != len(w) or not c for c, w in zip(costs, weights)):
        raise ValueError("costs and weights need the same shape, with at least one option per layer")
    if any(not math.isfinite(v) for row in (*costs, *weights) for v in row):
        raise ValueError("costs and weights must be finite")


def _pareto(
    costs: Sequence[Sequence[float]], weights: Sequence[Sequence[float]], capacity: float, max_frontier: int
) -> Allocation | None:
    """Exact DP over Pareto-optimal partial sums; None when the frontier outgrows ``max_frontier``."""
    rest = [0.0] * (len(weights) + 1)  # lightest weight of the layers after l
    for i in range(len(weights) - 1, -1, -1):
        rest[i] = rest[i + 1] + min(weights[i])
    frontier: list[tuple[float, float, tuple[int, ...]]] = [(0.0, 0.0, ())]
    slack = capacity * 1e-12
    for i, (cl, wl) in enumerate(zip(costs, weights)):
        room = capacity - rest[i + 1] + slack
        if len(frontier) * len(cl) > 4 * max_frontier:
            return None
        grown = [(w + wj, c + cj, ch + (j,)) for w, c, ch in frontier for j, (cj, wj) in enumerate(zip(cl, wl))]
        grown = [t for t in grown if t[0] <= room]
        if len(grown) > max_frontier:
            return None
        grown.sort(key=lambda t: (t[0], t[1]))
        frontier = []
        for t in grown:
            if not frontier or t[1] < frontier[-1][1]:
                frontier.append(t)
    w, c, choice = min(frontier, key=lambda t: (t[1], t[0]))
    return Allocation(choice, c, w, c, True)


def _pick(costs: Sequence[Sequence[float]], weights: Sequence[Sequence[float]], lam: float) -> list[int]:
    return [min(range(len(c)), key=lambda j: (c[j] + lam * w[j], w[j])) for c, w in zip(costs, weights)]


def _total(values: Sequence[Sequence[float]], choice: Sequence[int]) -> float:
    return sum(v[j] for v, j in zip(values, choice))


def _dual(costs: Sequence[Sequence[float]], weights: Sequence[Sequence[float]], capacity: float, lam: float) -> float:
    return sum(min(c[j] + lam * w[j] for j in range(len(c))) for c, w in zip(costs, weights)) - lam * capacity


def _lagrangian(costs: Sequence[Sequence[float]], weights: Sequence[Sequence[float]], capacity: float) -> Allocation:
    """Bisection on the multiplier, then greedy use of the spare capacity (see the module doc)."""
    if _total(weights, _pick(costs, weights, 0.0)) <= capacity:
        choice = _pick(costs, weights, 0.0)
        c = _total(costs, choice)
        return Allocation(tuple(choice), c, _total(weights, choice), c, True)  # unconstrained optimum fits
    lo, hi = 0.0, 1.0
    while _total(weights, _pick(costs, weights, hi)) > capacity:
        hi *= 2.0
        if hi > 1e300:
            raise Infeasible("no multiplier makes the choice fit", lightest(weights))
    best_dual = max(_dual(costs, weights, capacity, lo), _dual(costs, weights, capacity, hi))
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        best_dual = max(best_dual, _dual(costs, weights, capacity, mid))
        if _total(weights, _pick(costs, weights, mid)) <= capacity:
            hi = mid
        else:
            lo = mid
    choice = _improve(costs, weights, capacity, _pick(costs, weights, hi))
    c = _total(costs, choice)
    return Allocation(tuple(choice), c, _total(weights, choice), min(best_dual, c), False)


def _improve(
    costs: Sequence[Sequence[float]], weights: Sequence[Sequence[float]], capacity: float, choice: list[int]
) -> list[int]:
    """Greedy: while some single swap lowers the cost and fits, take the one with the best gain per weight."""
    choice = list(choice)
    while True:
        spare = capacity - _total(weights, choice)
        best, best_rate = None, 0.0
        for i, (c, w) in enumerate(zip(costs, weights)):
            for j in range(len(c)):
                gain, extra = c[choice[i]] - c[j], w[j] - w[choice[i]]
                if gain > 0 and extra <= spare:
                    rate = math.inf if extra <= 0 else gain / extra
                    if rate > best_rate:
                        best, best_rate = (i, j), rate
        if best is None:
            return choice
        choice[best[0]] = best[1]
