"""The Pareto front of plans over profile lengths, by the epsilon-constraint method (as in the MoA paper).

Objective ``t`` is the summed influence loss at profile length ``t``; every plan must meet the KV density
budget at every length. The front is built in three steps:

1. Anchors: minimise each length's loss alone. Their payoff table gives each objective's ideal (its minimum)
   and nadir (its worst value over the anchors).
2. Sweep: for each length ``p`` in turn and levels ``k = 1..m``, minimise loss ``p`` with every other loss
   ``s`` bounded by ``ideal_s + k / (m + 1) * (nadir_s - ideal_s)``. Levels run from tight to loose, so the
   previous plan stays feasible and warm-starts the next solve.
3. Filter: drop duplicate and dominated plans.

Each solve minimises its objective plus ``1e-3`` of the other (range-normalised) objectives, so every point is
Pareto-optimal rather than only weakly so. Before the MILP, a Lagrangian bound (:mod:`pipeline.optimize.lagrange`)
drops rule subsets that cannot beat the best known plan, which keeps the MILP small without losing its optimum.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np

from pipeline.errors import UserError
from pipeline.optimize.lagrange import LayerDual
from pipeline.optimize.milp import SOLVERS, MilpResult, solve_milp

AUGMENT = 1e-3


@dataclass
class PlanCandidate:
    """One plan of the front: a rule per head and what it costs at each profile length."""

    choice: np.ndarray
    """``(L, H)`` index into the rule axis."""
    objectives: np.ndarray
    """``(T,)`` summed influence loss at each length."""
    densities: np.ndarray
    """``(T,)`` KV density (mean over heads) at each length."""
    status: str
    """``optimal`` or ``time_limit`` (best incumbent, flagged; see ``gap``)."""
    gap: float | None
    seconds: float
    solver: str
    primary: int
    """Index of the length whose loss was minimised."""
    epsilon: list[float | None] = field(default_factory=list)
    """Upper bound put on each length's loss (None: unconstrained)."""

    @property
    def flagged(self) -> bool:
        return self.status != "optimal"


def solve_front(loss: np.ndarray, kv_density: np.ndarray, budgets, max_rules_per_layer: int = 2, *,
                solver: str = "highs", points: int = 24, time_limit: float | None = None,
                lower_bound_ratio: float | None = None, gap_rel: float = 1e-4, reduce: bool = True,
                lengths=None) -> list[PlanCandidate]:
    """Pareto front of 0/1 plans. ``loss`` and ``kv_density`` are ``(L, H, R, T)``; ``budgets`` ``(T,)`` are KV
    density upper bounds (``lower_bound_ratio`` adds ``density >= ratio * budget``). ``points`` is the number of
    MILP solves aimed for (anchors included); ``time_limit`` and ``gap_rel`` apply to each solve; ``reduce``
    turns the Lagrangian reduction on; ``lengths`` only names the lengths in error messages.

    Raises :class:`UserError` when the budgets cannot be met. Returns the non-dominated plans, sorted by loss at
    the longest length.
    """
    if solver not in SOLVERS:
        raise UserError(f"optimize.solver: bad value {solver!r} (expected one of {', '.join(SOLVERS)})")
    loss = np.asarray(loss, dtype=np.float64)
    kv_density = np.asarray(kv_density, dtype=np.float64)
    layers, heads, rules, count = loss.shape
    budgets = np.broadcast_to(np.asarray(budgets, dtype=np.float64), (count,))
    names = list(lengths) if lengths is not None else list(range(count))
    rows, rhs = _budget_rows(kv_density, budgets, lower_bound_ratio, names, max_rules_per_layer)
    solve = _Solver(loss, kv_density, rows, rhs, max_rules_per_layer, solver, time_limit, gap_rel, reduce)

    anchors = [solve(p, [None] * count) for p in range(count)]
    if any(a is None for a in anchors):
        raise UserError(
            f"no plan meets the KV density budgets {dict(zip(names, budgets.tolist(), strict=True))} at all lengths "
            f"at once with at most {max_rules_per_layer} rules per layer: raise optimize.density_budget"
        )
    payoff = np.stack([a.objectives for a in anchors])  # (T anchors, T objectives)
    ideal, nadir = payoff.diagonal().copy(), payoff.max(0)
    found = list(anchors)
    levels = max(1, math.ceil((points - count) / count)) if count > 1 else 0
    for p in range(count):
        for k in range(1, levels + 1):
            eps = [None if s == p else float(ideal[s] + k / (levels + 1) * (nadir[s] - ideal[s])) for s in range(count)]
            candidate = solve(p, eps)
            if candidate is not None:
                found.append(candidate)
    front = pareto(found)
    for candidate in front:
        candidate.seconds = round(candidate.seconds, 4)
    return sorted(front, key=lambda c: tuple(c.objectives[::-1]))


def pareto(candidates: list[PlanCandidate], rtol: float = 1e-9) -> list[PlanCandidate]:
    """The candidates no other candidate dominates (<= everywhere, < somewhere), one per distinct plan."""
    unique: dict[bytes, PlanCandidate] = {}
    for c in candidates:
        unique.setdefault(c.choice.tobytes(), c)
    items = list(unique.values())
    keep = []
    for c in items:
        slack = rtol * (1 + np.abs(c.objectives))
        dominated = any(
            np.all(o.objectives <= c.objectives + slack) and np.any(o.objectives < c.objectives - slack)
            for o in items if o is not c
        )
        if not dominated:
            keep.append(c)
    return keep


def _budget_rows(kv_density, budgets, ratio, names, max_rules) -> tuple[np.ndarray, np.ndarray]:
    """Density rows ``mean_h kv <= budget`` (and ``>= ratio * budget``), after checking each can be met."""
    layers, heads = kv_density.shape[:2]
    lowest = kv_density.min(2).mean((0, 1))  # (T,): every head on its sparsest rule
    highest = kv_density.max(2).mean((0, 1))
    rows, rhs = [], []
    for t, (name, budget) in enumerate(zip(names, budgets, strict=True)):
        if budget < lowest[t] - 1e-12:
            raise UserError(
                f"optimize.density_budget: {budget:g} at length {name} is infeasible: the smallest KV density any "
                f"plan reaches there is {lowest[t]:.4f} (sink and min_span alone keep that much)"
            )
        rows.append(kv_density[..., t] / (layers * heads))
        rhs.append(budget)
        if ratio is not None:
            if ratio * budget > highest[t] + 1e-12:
                raise UserError(
                    f"optimize.lower_bound_ratio: {ratio:g} x {budget:g} at length {name} is above the largest "
                    f"KV density any plan reaches there ({highest[t]:.4f})"
                )
            rows.append(-kv_density[..., t] / (layers * heads))
            rhs.append(-ratio * budget)
    return np.stack(rows), np.array(rhs)


class _Solver:
    """Solves one epsilon-constraint problem; keeps every plan found to warm-start the next."""

    def __init__(self, loss, kv_density, rows, rhs, max_rules, solver, time_limit, gap_rel, reduce):
        self.loss, self.kv_density = loss, kv_density
        self.rows, self.rhs = rows, rhs
        self.max_rules, self.solver = max_rules, solver
        self.time_limit, self.gap_rel = time_limit, gap_rel
        self.reduce = reduce and LayerDual.applies(max_rules, loss.shape[2])
        ranges = (loss.max(2) - loss.min(2)).sum((0, 1))  # (T,) how far each objective can move
        self.scale = np.where(ranges > 0, ranges, 1.0)
        self.pool: list[np.ndarray] = []

    def __call__(self, primary: int, eps: list[float | None]) -> PlanCandidate | None:
        began = time.perf_counter()
        weights = AUGMENT * self.scale[primary] / self.scale
        weights[primary] = 1.0
        cost = np.einsum("lhrt,t->lhr", self.loss, weights)
        extra = [(self.loss[..., t], bound) for t, bound in enumerate(eps) if bound is not None]
        rows = np.concatenate([self.rows, np.stack([r for r, _ in extra])]) if extra else self.rows
        rhs = np.concatenate([self.rhs, [b for _, b in extra]]) if extra else self.rhs
        result = self._solve(cost, rows, rhs)
        if result.choice is None:
            return None
        self.pool.append(result.choice)
        return PlanCandidate(
            choice=result.choice, objectives=_per_head(self.loss, result.choice).sum((0, 1)),
            densities=_per_head(self.kv_density, result.choice).mean((0, 1)),
            status=result.status, gap=result.gap, seconds=time.perf_counter() - began, solver=self.solver,
            primary=primary, epsilon=list(eps),
        )

    def _solve(self, cost, rows, rhs) -> MilpResult:
        options = dict(solver=self.solver, time_limit=self.time_limit, gap_rel=self.gap_rel)
        everything = np.ones(cost.shape, dtype=bool)
        start, upper = self._incumbent(cost, rows, rhs)
        if not self.reduce:
            return solve_milp(cost, rows, rhs, self.max_rules, everything, start=start, **options)
        dual = LayerDual(cost, rows, rhs, self.max_rules)
        bound = dual.maximise(upper)
        if bound.infeasible:
            return MilpResult(None, "infeasible", None, None, 0.0)
        if upper is not None and upper - bound.value <= self.gap_rel * abs(upper):
            gap = (upper - bound.value) / max(abs(upper), 1e-12)
            return MilpResult(start, "optimal", upper, max(gap, 0.0), 0.0)  # the bound proves the incumbent
        # Primal heuristic: the MILP over the rules of each layer's three cheapest subsets at the best mu.
        candidates = dual.allowed(bound, np.inf, keep=3)
        heuristic = solve_milp(cost, rows, rhs, self.max_rules, candidates, **options)
        if heuristic.choice is not None and (upper is None or heuristic.objective < upper):
            start, upper = heuristic.choice, heuristic.objective
        if upper is None:
            return solve_milp(cost, rows, rhs, self.max_rules, everything, **options)
        allowed = dual.allowed(bound, upper)
        if heuristic.status == "optimal" and not (allowed & ~candidates).any():
            return heuristic  # the restricted problem already contained every plan that could be better
        return solve_milp(cost, rows, rhs, self.max_rules, allowed, start=start, **options)

    def _incumbent(self, cost, rows, rhs) -> tuple[np.ndarray | None, float | None]:
        """The cheapest earlier plan that meets these rows, as a warm start and upper bound."""
        best, value = None, None
        for choice in self.pool:
            if np.all(_row_totals(rows, choice) <= rhs + 1e-9 * (1 + np.abs(rhs))):
                v = float(_per_head(cost, choice).sum())
                if value is None or v < value:
                    best, value = choice, v
        return best, value


def _per_head(table: np.ndarray, choice: np.ndarray) -> np.ndarray:
    """Each head's entry under its chosen rule: ``(L, H, R, ...)`` -> ``(L, H, ...)``."""
    layers, heads = choice.shape
    return table[np.arange(layers)[:, None], np.arange(heads)[None, :], choice]


def _row_totals(rows: np.ndarray, choice: np.ndarray) -> np.ndarray:
    """Left-hand sides of ``rows`` ``(k, L, H, R)`` under ``choice``: ``(k,)``."""
    return _per_head(np.moveaxis(rows, 0, -1), choice).sum((0, 1))
