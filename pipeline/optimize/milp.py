"""One 0/1 MILP solve in PuLP: one rule per head, linear budget rows, at most ``K`` distinct rules per layer.

    min  sum c[l,h,r] x[l,h,r]
    s.t. sum_r x[l,h,r] = 1                    every head takes exactly one rule
         sum A[k,l,h,r] x[l,h,r] <= b[k]       density budgets, epsilon bounds on other objectives
         x[l,h,r] <= y[l,r]                    rule r is open in layer l (disaggregated: the tight linking)
         sum_r y[l,r] <= K                     at most K distinct rules per layer

With a grouped KV budget (rules per query head on a GQA model, see :mod:`pipeline.optimize.budget`), the budget
is not a linear row in ``x``; it gets one continuous footprint variable per (layer l, KV head g, length t):

         f[l,g,t] >= sum_r kv[l,h,r,t] x[l,h,r]       for every query head h of KV head g
         mean_{l,g} f[l,g,t] <= upper[t]

and, with a lower bound ``mean_{l,g} f[l,g,t] >= lower[t]`` too, binaries ``z[l,h,t]`` (exactly one per group
and length is 1) pick the head that ``f`` may not exceed, ``f[l,g,t] <= sum_r kv[l,h,r,t] x[l,h,r] + M (1 -
z[l,h,t])`` with ``M`` the group's density range, so ``f`` is exactly the group's max.

Only the ``allowed`` (l, h, r) get a variable (see :mod:`pipeline.optimize.lagrange` for how the set is
reduced without losing the optimum); a layer with at most ``K`` allowed rules needs no ``y`` at all.
HiGHS runs through ``pulp.HiGHS``, CBC through ``pulp.PULP_CBC_CMD``; both take a warm start (``x`` and
``y`` set from a feasible plan) and report their lower bound (CBC only when it stops early), from which the
result's gap is computed.

Formulations measured on the bench instance (32 x 32 heads, 48 rules, 4 lengths), at gap 1e-4 on three
epsilon points: this one (3.7 s, 7.9 s, 0.031% left at 60 s), a per-layer column per surviving rule pair with
``x[l,h,r] <= sum of the pairs holding r`` (3.8 s, 6.9 s, 0.014% left), and that with the links summed over
heads (9.7 s, 10.2 s, 0.040% left). HiGHS's root LP bound on this model matched the Lagrangian bound in the
runs looked at, so the column model gains little and is not used.
"""

from __future__ import annotations

import os
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pulp

from pipeline.optimize.budget import KVBudget

SOLVERS = ("highs", "cbc")


@dataclass
class MilpResult:
    choice: np.ndarray | None
    """``(L, H)`` rule index per head, or None when no feasible plan was found."""
    status: str
    """``optimal``, ``time_limit`` (an incumbent, not proven optimal), ``infeasible`` or ``no_solution``."""
    objective: float | None
    gap: float | None
    """Proven relative gap ``(objective - bound) / |objective|`` of the returned plan (None: no bound known)."""
    seconds: float
    bound: float | None = None
    """Lower bound on the optimum that the solver proved."""


class _WarmHiGHS(pulp.HiGHS):
    """``pulp.HiGHS`` that hands the variables' initial values to HiGHS as a start solution."""

    def __init__(self, start: bool, **kwargs):
        super().__init__(**kwargs)
        self.start = start

    def callSolver(self, lp):
        if self.start:
            import highspy

            solution = highspy.HighsSolution()
            solution.col_value = [var.varValue or 0.0 for var in lp.variables()]
            solution.value_valid = True
            lp.solverModel.setSolution(solution)
        super().callSolver(lp)


def solve_milp(cost: np.ndarray, rows: np.ndarray, rhs: np.ndarray, max_rules: int, allowed: np.ndarray, *,
               grouped: KVBudget | None = None, solver: str = "highs", time_limit: float | None = None,
               gap_rel: float = 1e-4, start: np.ndarray | None = None) -> MilpResult:
    """Solve the MILP above. ``cost`` ``(L, H, R)``, ``rows`` ``(k, L, H, R)``, ``rhs`` ``(k,)``, ``allowed``
    ``(L, H, R)`` bool; ``grouped`` is a KV budget modelled with footprint variables (its rows are not in
    ``rows``); ``start`` is an optional feasible ``(L, H)`` choice used as the incumbent to beat."""
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r} (expected one of {', '.join(SOLVERS)})")
    layers, heads, _ = cost.shape
    began = time.perf_counter()
    prob = pulp.LpProblem("moa_plan", pulp.LpMinimize)
    index = [tuple(i) for i in np.argwhere(allowed)]
    x = {i: prob.add_variable(f"x_{i[0]}_{i[1]}_{i[2]}", cat=pulp.LpBinary) for i in index}
    per_head: dict[tuple[int, int], list] = {}
    for (layer, head, _), var in x.items():
        per_head.setdefault((layer, head), []).append(var)
    for (layer, head), head_vars in per_head.items():
        prob += pulp.LpAffineExpression([(v, 1) for v in head_vars]) == 1, f"one_{layer}_{head}"
    y = {}
    for layer in range(layers):
        open_rules = np.flatnonzero(allowed[layer].any(0))
        if len(open_rules) <= max_rules:
            continue
        y.update({(layer, r): prob.add_variable(f"y_{layer}_{r}", cat=pulp.LpBinary) for r in open_rules})
        prob += pulp.LpAffineExpression([(y[layer, r], 1) for r in open_rules]) <= max_rules, f"cap_{layer}"
        for h, r in np.argwhere(allowed[layer]):
            prob += pulp.LpAffineExpression([(x[layer, h, r], 1), (y[layer, r], -1)]) <= 0, f"link_{layer}_{h}_{r}"
    for k, (row, bound) in enumerate(zip(rows, rhs, strict=True)):
        prob += pulp.LpAffineExpression([(x[i], float(row[i])) for i in index]) <= float(bound), f"row_{k}"
    prob.setObjective(pulp.LpAffineExpression([(x[i], float(cost[i])) for i in index]))
    if start is not None and not allowed[np.arange(layers)[:, None], np.arange(heads)[None, :], start].all():
        start = None  # the start uses a rule this model has no variable for
    footprint = _add_footprint(prob, x, grouped) if grouped is not None else {}
    if start is not None:
        for (layer, head, rule), var in x.items():
            var.setInitialValue(1.0 if start[layer, head] == rule else 0.0)
        for (layer, rule), var in y.items():
            var.setInitialValue(1.0 if (start[layer] == rule).any() else 0.0)
        if grouped is not None:
            _start_footprint(footprint, grouped, start)

    fd, name = tempfile.mkstemp(prefix="cbc_", suffix=".log")
    os.close(fd)  # CBC writes the log by name; an open descriptor would leak one per solve
    log = Path(name)
    try:
        if solver == "highs":
            backend = _WarmHiGHS(start is not None, msg=False, timeLimit=time_limit, gapRel=gap_rel, threads=None)
        else:
            backend = pulp.PULP_CBC_CMD(msg=False, timeLimit=time_limit, gapRel=gap_rel,
                                        warmStart=start is not None, logPath=str(log))
        prob.solve(backend)
        bound = _highs_bound(prob) if solver == "highs" else _cbc_bound(log)
    finally:
        log.unlink(missing_ok=True)
    seconds = time.perf_counter() - began
    if prob.status == pulp.LpStatusInfeasible:
        return MilpResult(None, "infeasible", None, None, seconds)
    if prob.sol_status not in (pulp.LpSolutionOptimal, pulp.LpSolutionIntegerFeasible):
        return MilpResult(None, "no_solution", None, None, seconds)
    choice = np.zeros((layers, heads), dtype=np.int64)
    for (layer, head, rule), var in x.items():
        if (var.varValue or 0.0) > 0.5:
            choice[layer, head] = rule
    optimal = prob.sol_status == pulp.LpSolutionOptimal
    objective = float(cost[np.arange(layers)[:, None], np.arange(heads)[None, :], choice].sum())
    if bound is None and optimal:  # CBC states no bound when it proves optimality; its stopping rule gives one
        bound = objective - gap_rel * abs(objective)
    return MilpResult(choice, "optimal" if optimal else "time_limit", objective, relative_gap(objective, bound),
                      seconds, bound)


def _add_footprint(prob, x: dict, budget: KVBudget) -> dict:
    """Add the footprint variables and budget rows of the module docstring; returns ``{"f": ..., "z": ...}``."""
    density = budget.density  # (L, H, R, T)
    layers, heads, _, lengths = density.shape
    size = budget.group_size
    kv_heads = heads // size
    terms: dict[tuple[int, int], list] = {}  # (layer, head) -> [(rule, var)]
    for (layer, head, rule), var in x.items():
        terms.setdefault((layer, head), []).append((rule, var))
    f, z = {}, {}
    for layer, g, t in np.ndindex(layers, kv_heads, lengths):
        members = range(g * size, (g + 1) * size)
        block = density[layer, g * size:(g + 1) * size, :, t]  # (G, R)
        low, high = float(block.min()), float(block.max())
        var = f[layer, g, t] = prob.add_variable(f"f_{layer}_{g}_{t}", lowBound=low, upBound=high)
        for h in members:
            usage = [(v, float(density[layer, h, r, t])) for r, v in terms.get((layer, h), [])]
            prob += pulp.LpAffineExpression([(var, 1.0)] + [(v, -c) for v, c in usage]) >= 0, f"fp_{layer}_{h}_{t}"
            if budget.lower is not None:  # f may not exceed the head z picks: f is the group's max, not above it
                pick = z[layer, h, t] = prob.add_variable(f"z_{layer}_{h}_{t}", cat=pulp.LpBinary)
                big = high - low
                prob += pulp.LpAffineExpression([(var, 1.0), (pick, big)] + [(v, -c) for v, c in usage]) <= big, \
                    f"fz_{layer}_{h}_{t}"
        if budget.lower is not None:
            prob += pulp.LpAffineExpression([(z[layer, h, t], 1.0) for h in members]) == 1, f"zone_{layer}_{g}_{t}"
    scale = 1.0 / (layers * kv_heads)
    for t in range(lengths):
        mean = pulp.LpAffineExpression([(f[layer, g, t], scale) for layer in range(layers) for g in range(kv_heads)])
        prob += mean <= float(budget.upper[t]), f"kv_{t}"
        if budget.lower is not None:
            prob += mean >= float(budget.lower[t]), f"kv_low_{t}"
    return {"f": f, "z": z}


def _start_footprint(footprint: dict, budget: KVBudget, start: np.ndarray) -> None:
    """Initial values of the footprint variables for the plan ``start``: each group's max and the head holding it."""
    layers, heads = start.shape
    size = budget.group_size
    per_head = budget.density[np.arange(layers)[:, None], np.arange(heads)[None, :], start]  # (L, H, T)
    grouped = per_head.reshape(layers, heads // size, size, -1)  # (L, Hkv, G, T)
    for (layer, g, t), var in footprint["f"].items():
        var.setInitialValue(float(grouped[layer, g, :, t].max()))
    for (layer, h, t), var in footprint["z"].items():
        var.setInitialValue(1.0 if h % size == int(grouped[layer, h // size, :, t].argmax()) else 0.0)


def relative_gap(objective: float, bound: float | None) -> float | None:
    """``(objective - bound) / |objective|``, floored at 0; None without a bound."""
    if bound is None or not np.isfinite(bound):
        return None
    return max(objective - bound, 0.0) / max(abs(objective), 1e-12)


def _highs_bound(prob) -> float | None:
    return float(prob.solverModel.getInfo().mip_dual_bound)


def _cbc_bound(log: Path) -> float | None:
    """CBC's final summary prints ``Lower bound: <value>`` (its ``Gap:`` line has only two decimals)."""
    match = re.search(r"^Lower bound:\s+(\S+)", log.read_text() if log.exists() else "", re.MULTILINE)
    return float(match.group(1)) if match else None
