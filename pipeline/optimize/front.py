"""The Pareto front of plans over profile lengths, by the epsilon-constraint method (as in the MoA paper).

Objective ``t`` is the summed influence loss at profile length ``t``; every plan must meet the KV density
budget at every length, on the density the per-head cache allocates (:mod:`pipeline.optimize.budget`: with rules
per query head on a GQA model, each KV head costs its group's largest density). The front is built in three
steps:

1. Anchors: minimise each length's loss alone. Their payoff table gives each objective's ideal (its minimum)
   and nadir (its worst value over the anchors).
2. Sweep: for each length ``p``, minimise loss ``p`` with every other loss ``s`` bounded by
   ``ideal_s + f * (nadir_s - ideal_s)`` at levels ``f`` in (0, 1) (``f = 1`` gives anchor ``p`` back). About
   half of the solves go to even levels ``k / (m + 1)``; each of the others bisects the widest interval between
   neighbouring levels of any sweep whose plans differ (one may be infeasible), so solves go where the front
   still changes rather than to levels that only repeat a plan. Every plan found so far that meets a
   solve's bounds warm-starts it.
3. Filter: drop duplicate and dominated plans.

Each solve minimises its objective plus ``1e-3`` of the other (range-normalised) objectives, so every point is
Pareto-optimal rather than only weakly so. A solve stops as soon as a plan is proven within ``gap_rel`` of the
optimum, trying in turn:

a. the cheapest plan found so far that meets the solve's bounds (the incumbent);
b. the Lagrangian bound of :mod:`pipeline.optimize.lagrange`, which also proves infeasible bounds;
c. a primal heuristic: the MILP restricted to each layer's ``HEURISTIC_PAIRS`` cheapest rule pairs at the
   bound's multipliers (it usually lands within 1e-3 of the bound);
d. the MILP over every rule the bound cannot exclude given the incumbent, warm-started with it; the bound
   drops rule pairs that cannot beat the incumbent, which keeps it small without losing its optimum.

Every plan carries its proven gap, ``(objective - lower bound) / objective`` with the larger of the Lagrangian
and the solver's bound.

Grouped budgets (``group_size > 1``). The Lagrangian of b. and d. relaxes linear rows, and the grouped footprint is
not linear, so it is computed on :meth:`KVBudget.relaxation`'s rows instead: rows every plan meeting the grouped
budget meets. Every argument above still holds for them (the bound is a lower bound of a relaxation, hence of this
problem; a rule pair it excludes cannot be in any better plan of the relaxation, hence of this problem; an
infeasible relaxation means an infeasible problem); the bound is only weaker, so b. and d. prove and prune less and
the MILPs of c. and d. (which model the footprint exactly) do more of the work. Incumbents are checked against the
exact footprint, never the relaxation. Why ``gap_rel`` defaults to 1e-3: on the Llama-3-8B-shaped instance of
``scripts/bench_solver.py`` the bound sits 3e-4 to 1e-3 below the optimum, so 1e-4 means branching at every
point (the whole front took about 200 s there, with one point still open after 120 s), while at 1e-3 nearly
every point closes with the heuristic's plan at the root.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field

import numpy as np

from pipeline.optimize.budget import KVBudget
from pipeline.optimize.lagrange import LayerDual
from pipeline.optimize.milp import SOLVERS, MilpResult, relative_gap, solve_milp

AUGMENT = 1e-3
HEURISTIC_PAIRS = 2
"""Rule pairs per layer, cheapest at the best multipliers, that the primal-heuristic MILP may use."""


@dataclass
class PlanCandidate:
    """One plan of the front: a rule per head and what it costs at each profile length."""

    choice: np.ndarray
    """``(L, H)`` index into the rule axis."""
    objectives: np.ndarray
    """``(T,)`` summed influence loss at each length."""
    densities: np.ndarray
    """``(T,)`` KV density at each length, what the cache allocates: mean over layers and KV heads of the group's
    largest density (:meth:`KVBudget.footprint`)."""
    status: str
    """``optimal`` (proven within ``gap_rel``) or ``time_limit`` (best incumbent, flagged; see ``gap``)."""
    gap: float | None
    """Proven relative gap to the optimum of this solve (None: no bound known, only without ``reduce``)."""
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
                group_size: int = 1, solver: str = "highs", points: int = 24, time_limit: float | None = None,
                lower_bound_ratio: float | None = None, gap_rel: float = 1e-3, reduce: bool = True,
                lengths=None) -> list[PlanCandidate]:
    """Pareto front of 0/1 plans. ``loss`` and ``kv_density`` are ``(L, H, R, T)``; ``budgets`` ``(T,)`` are KV
    density upper bounds (``lower_bound_ratio`` adds ``density >= ratio * budget``). ``group_size`` is the number
    of the table's heads that share one KV head (query heads per KV head when ``H`` counts query heads of a GQA
    model; 1 when ``H`` counts KV heads): the budget is on what the cache allocates, each KV head's largest
    density. ``points`` is the number of MILP solves aimed for (anchors included); ``time_limit`` (seconds, all
    steps of one solve together) and ``gap_rel`` (relative, proven) apply to each solve; ``reduce`` turns the
    Lagrangian reduction on; ``lengths`` only names the lengths in error messages.

    Raises ``ValueError`` when the budgets cannot be met. Returns the non-dominated plans, sorted by loss at the
    longest length.
    """
    if solver not in SOLVERS:
        raise ValueError(f"optimize.solver: bad value {solver!r} (expected one of {', '.join(SOLVERS)})")
    loss = np.asarray(loss, dtype=np.float64)
    kv_density = np.asarray(kv_density, dtype=np.float64)
    layers, heads, rules, count = loss.shape
    budgets = np.broadcast_to(np.asarray(budgets, dtype=np.float64), (count,))
    names = list(lengths) if lengths is not None else list(range(count))
    lower = None if lower_bound_ratio is None else lower_bound_ratio * budgets
    budget = KVBudget(kv_density, int(group_size), budgets, lower)
    _check_budget(budget, lower_bound_ratio, names)
    solve = _Solver(loss, budget, max_rules_per_layer, solver, time_limit, gap_rel, reduce)

    anchors = [solve(p, [None] * count) for p in range(count)]
    if any(a is None for a in anchors):
        raise ValueError(
            f"no plan meets the KV density budgets {dict(zip(names, budgets.tolist(), strict=True))} at all lengths "
            f"at once with at most {max_rules_per_layer} rules per layer: raise optimize.density_budget"
        )
    payoff = np.stack([a.objectives for a in anchors])  # (T anchors, T objectives)
    ideal, nadir = payoff.diagonal().copy(), payoff.max(0)
    found = list(anchors)
    sweeps = max(points - count, 0) if count > 1 else 0  # solves left for the sweeps
    solved = [{0.0: None, 1.0: anchors[p]} for p in range(count)]  # per primary: level -> plan (None: none)

    def at(p: int, level: float) -> None:
        eps = [None if s == p else float(ideal[s] + level * (nadir[s] - ideal[s])) for s in range(count)]
        solved[p][level] = solve(p, eps)
        if solved[p][level] is not None:
            found.append(solved[p][level])

    uniform = sweeps // (2 * count)  # levels per length spaced evenly first; bisection places the rest
    for p in range(count):
        for k in range(1, uniform + 1):
            at(p, k / (uniform + 1))
    for _ in range(sweeps - uniform * count):
        widest = max(((b - a, p, a, b) for p in range(count) for a, b in itertools.pairwise(sorted(solved[p]))
                      if _differ(solved[p][a], solved[p][b])), default=None)
        if widest is None:
            break  # every sweep is resolved: neighbouring levels give the same plan
        _, p, a, b = widest
        at(p, (a + b) / 2)
    front = pareto(found)
    for candidate in front:
        candidate.seconds = round(candidate.seconds, 4)
    return sorted(front, key=lambda c: tuple(c.objectives[::-1]))


def _differ(a: PlanCandidate | None, b: PlanCandidate | None) -> bool:
    """Whether two levels of a sweep gave different outcomes, so a level between them may give a new plan."""
    if a is None or b is None:
        return (a is None) != (b is None)
    return not np.array_equal(a.choice, b.choice)


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


def _check_budget(budget: KVBudget, ratio, names) -> None:
    """Raise ``ValueError`` naming the first length whose budget no plan can meet."""
    lowest, highest = budget.extremes()  # (T,) each: every head on its sparsest / densest rule
    for t, (name, upper) in enumerate(zip(names, budget.upper, strict=True)):
        if upper < lowest[t] - 1e-12:
            raise ValueError(
                f"optimize.density_budget: {upper:g} at length {name} is infeasible: the smallest KV density any "
                f"plan reaches there is {lowest[t]:.4f} (sink and min_span alone keep that much)"
            )
        if ratio is not None and ratio * upper > highest[t] + 1e-12:
            raise ValueError(
                f"optimize.lower_bound_ratio: {ratio:g} x {upper:g} at length {name} is above the largest "
                f"KV density any plan reaches there ({highest[t]:.4f})"
            )


class _Solver:
    """Solves one epsilon-constraint problem; keeps every plan found to warm-start the next.

    ``rows``/``rhs`` are the budget's exact linear rows for the MILP (none when grouped: the MILP then models the
    footprint); ``dual_rows``/``dual_rhs`` its relaxation for the Lagrangian (the same rows when not grouped).
    """

    def __init__(self, loss, budget: KVBudget, max_rules, solver, time_limit, gap_rel, reduce):
        self.loss, self.budget = loss, budget
        self.rows, self.rhs = budget.linear_rows()
        self.dual_rows, self.dual_rhs = budget.relaxation()
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
        eps_rows = np.stack([r for r, _ in extra]) if extra else np.zeros((0, *cost.shape))  # (k, L, H, R)
        eps_rhs = np.array([b for _, b in extra], dtype=np.float64)
        result = self._solve(cost, eps_rows, eps_rhs)
        if result.choice is None:
            return None
        self.pool.append(result.choice)
        return PlanCandidate(
            choice=result.choice, objectives=_per_head(self.loss, result.choice).sum((0, 1)),
            densities=self.budget.footprint(result.choice),
            status=result.status, gap=result.gap, seconds=time.perf_counter() - began, solver=self.solver,
            primary=primary, epsilon=list(eps),
        )

    def _solve(self, cost, eps_rows, eps_rhs) -> MilpResult:
        """Earlier plans as incumbent, the Lagrangian bound, a restricted MILP as primal heuristic, then the MILP
        over the rules the bound cannot exclude; stops as soon as the bound proves the incumbent within
        ``gap_rel``. ``time_limit`` covers all of it. ``eps_rows`` ``(k, L, H, R)`` bound the other objectives."""
        deadline = None if self.time_limit is None else time.perf_counter() + self.time_limit
        rows, rhs = np.concatenate([self.rows, eps_rows]), np.concatenate([self.rhs, eps_rhs])  # the MILP's rows
        start, upper = self._incumbent(cost, eps_rows, eps_rhs)
        if not self.reduce:
            return self._milp(cost, rows, rhs, np.ones(cost.shape, dtype=bool), start, deadline)
        # The bound and reduction use the budget's relaxation (exact unless grouped; see the module docstring).
        dual = LayerDual(cost, np.concatenate([self.dual_rows, eps_rows]), np.concatenate([self.dual_rhs, eps_rhs]),
                         self.max_rules)
        bound = dual.maximise(upper, self.gap_rel)
        if bound.infeasible:
            return MilpResult(None, "infeasible", None, None, 0.0)
        if self._proven(upper, bound.value):
            return _incumbent_result(start, upper, bound.value, "optimal")
        candidates = dual.allowed(bound, np.inf, keep=HEURISTIC_PAIRS)
        heuristic = self._milp(cost, rows, rhs, candidates, start, deadline)
        if heuristic.choice is not None and (upper is None or heuristic.objective < upper):
            start, upper = heuristic.choice, heuristic.objective
        if self._proven(upper, bound.value):
            return _incumbent_result(start, upper, bound.value, "optimal")
        allowed = dual.allowed(bound, np.inf if upper is None else upper)
        if heuristic.status == "optimal" and not (allowed & ~candidates).any():
            # every plan better than the incumbent lies in the restricted problem, whose optimum this is
            return _incumbent_result(start, upper, _best_bound(bound.value, heuristic.bound), "optimal")
        if deadline is not None and time.perf_counter() >= deadline:
            return _incumbent_result(start, upper, bound.value, "time_limit")
        final = self._milp(cost, rows, rhs, allowed, start, deadline)
        if final.choice is None or (upper is not None and final.objective > upper):
            return _incumbent_result(start, upper, bound.value, "time_limit")
        return _incumbent_result(final.choice, final.objective, _best_bound(bound.value, final.bound),
                                 final.status)

    def _milp(self, cost, rows, rhs, allowed, start, deadline) -> MilpResult:
        left = None if deadline is None else max(deadline - time.perf_counter(), 1.0)
        return solve_milp(cost, rows, rhs, self.max_rules, allowed, solver=self.solver, time_limit=left,
                          gap_rel=self.gap_rel, start=start, grouped=self.budget if self.budget.grouped else None)

    def _proven(self, upper: float | None, bound: float) -> bool:
        return upper is not None and upper - bound <= self.gap_rel * abs(upper)

    def _incumbent(self, cost, eps_rows, eps_rhs) -> tuple[np.ndarray | None, float | None]:
        """The cheapest earlier plan that meets the budget (its exact footprint) and these epsilon rows, as a warm
        start and upper bound."""
        best, value = None, None
        for choice in self.pool:
            if self.budget.met_by(choice) and np.all(
                    _row_totals(eps_rows, choice) <= eps_rhs + 1e-9 * (1 + np.abs(eps_rhs))):
                v = float(_per_head(cost, choice).sum())
                if value is None or v < value:
                    best, value = choice, v
        return best, value


def _best_bound(lagrangian: float, solver: float | None) -> float:
    return lagrangian if solver is None else max(lagrangian, solver)


def _incumbent_result(choice, objective, bound, status) -> MilpResult:
    """A plan with its proven gap; no plan (``choice`` None) means the solvers found none in time."""
    if choice is None:
        return MilpResult(None, "no_solution", None, None, 0.0)
    return MilpResult(choice, status, objective, relative_gap(objective, bound), 0.0, bound)


def _per_head(table: np.ndarray, choice: np.ndarray) -> np.ndarray:
    """Each head's entry under its chosen rule: ``(L, H, R, ...)`` -> ``(L, H, ...)``."""
    layers, heads = choice.shape
    return table[np.arange(layers)[:, None], np.arange(heads)[None, :], choice]


def _row_totals(rows: np.ndarray, choice: np.ndarray) -> np.ndarray:
    """Left-hand sides of ``rows`` ``(k, L, H, R)`` under ``choice``: ``(k,)``."""
    return _per_head(np.moveaxis(rows, 0, -1), choice).sum((0, 1))
