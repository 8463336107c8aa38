"""Lagrangian bound and exact reduction of the plan MILP (see :mod:`pipeline.optimize.milp` for the model).

Relaxing the budget rows ``A x <= b`` with multipliers ``mu >= 0`` splits the problem by layer:

    D(mu) = sum_l min_{S, |S| <= K} sum_h min_{r in S} (c + mu A)[l,h,r]  -  mu . b

Each layer subproblem is solved exactly by enumerating its rule subsets (K <= 2: all pairs; K >= R: every head
free), so ``max D`` is at least the LP bound of the MILP. Given an incumbent of value ``UB``, a subset ``S`` of
layer ``l`` can only be part of a better plan if ``D(mu) + cost_l(S) - min_S' cost_l(S') <= UB``; every other
subset is dropped, and the MILP keeps only rules of surviving subsets. The optimum is never cut off, whatever
``mu``: a better ``mu`` only drops more. ``D`` is maximised by a trust-region cutting-plane method (Kelley).

The rows may be a relaxation of the real constraints, as for a grouped KV budget (each KV head costing its
group's largest density, :mod:`pipeline.optimize.budget`): every plan meeting the real constraints meets the rows,
so ``D`` stays a lower bound, an infeasible relaxation means an infeasible problem, and a dropped subset cannot be
part of any better plan. Only the bound is weaker; nothing here needs turning off.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import linprog


@dataclass
class DualResult:
    value: float
    """Best lower bound ``D(mu)`` found."""
    mu: np.ndarray
    layer_costs: np.ndarray
    """Layer subproblem costs at ``mu``: ``(L, R, R)`` per rule pair, or ``(L, H, R)`` per head when uncapped."""
    infeasible: bool
    """True when the bound exceeds every plan's cost: no plan meets the rows."""


class LayerDual:
    """``D(mu)`` for one MILP; applies when ``max_rules <= 2`` or ``max_rules >= R`` (see :meth:`applies`)."""

    def __init__(self, cost: np.ndarray, rows: np.ndarray, rhs: np.ndarray, max_rules: int):
        self.cost, self.max_rules = cost, max_rules
        spread_cost = max(_spread(cost), 1e-12)
        spreads = np.array([_spread(row) for row in rows])
        self.active = spreads > 0  # rows that do not depend on the choice stay out of the relaxation
        scale = spread_cost / spreads[self.active]  # multipliers of order one
        self.rows = rows[self.active] * scale[:, None, None, None]
        self.rhs = rhs[self.active] * scale
        self.uncapped = max_rules >= cost.shape[-1]
        self.worst = float(cost.max(-1).sum())  # no plan costs more

    @staticmethod
    def applies(max_rules: int, rules: int) -> bool:
        return max_rules <= 2 or max_rules >= rules

    def evaluate(self, mu: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
        """``(D(mu), subgradient, layer costs)``."""
        c = self.cost + np.einsum("k,klhr->lhr", mu, self.rows)  # (L, H, R)
        layers, heads, rules = c.shape
        if self.uncapped:
            choice = c.argmin(-1)  # (L, H)
            value = float(c.min(-1).sum())
            costs = c
        else:
            costs = np.minimum(c[:, :, :, None], c[:, :, None, :]).sum(1)  # (L, R, R)
            if self.max_rules == 1:
                costs = np.where(np.eye(rules, dtype=bool), costs, np.inf)
            best = costs.reshape(layers, -1).argmin(-1)
            first, second = np.divmod(best, rules)  # (L,) each
            pick = c[np.arange(layers), :, first] <= c[np.arange(layers), :, second]  # (L, H)
            choice = np.where(pick, first[:, None], second[:, None])
            value = float(costs.reshape(layers, -1).min(-1).sum())
        taken = np.take_along_axis(self.rows, np.broadcast_to(choice[None, :, :, None], (len(self.rows), layers, heads, 1)),
                                   axis=-1)
        subgradient = taken.sum((1, 2, 3)) - self.rhs
        return value - float(mu @ self.rhs), subgradient, costs

    def maximise(self, upper_bound: float | None = None, gap_rel: float = 0.0, iterations: int = 60,
                 tol: float = 1e-7) -> DualResult:
        """Trust-region Kelley: cut model of ``D`` maximised within a box around the best point so far. Stops
        early once the bound is within ``gap_rel`` (relative) of ``upper_bound``."""
        dim = len(self.rhs)
        center = np.zeros(dim)
        value, grad, costs = self.evaluate(center)
        cuts = [(value, grad, center)]
        radius = 1.0
        for _ in range(iterations if dim else 0):
            if value > self.worst or (upper_bound is not None and upper_bound - value <= max(
                    tol * (1 + abs(upper_bound)), gap_rel * abs(upper_bound))):
                break
            lows = np.maximum(center - radius, 0.0)
            highs = center + radius
            a_ub = np.array([[1.0, *(-g)] for _, g, _ in cuts])
            b_ub = np.array([v - g @ m for v, g, m in cuts])
            lp = linprog(np.r_[-1.0, np.zeros(dim)], A_ub=a_ub, b_ub=b_ub,
                         bounds=[(None, None), *zip(lows, highs, strict=True)], method="highs")
            if lp.status != 0:
                break
            predicted = -lp.fun - value
            if predicted <= tol * (1 + abs(value)):
                break  # the model, an over-estimate of D, promises nothing near the best point: it is optimal
            trial = lp.x[1:]
            trial_value, trial_grad, trial_costs = self.evaluate(trial)
            cuts.append((trial_value, trial_grad, trial))
            if trial_value - value >= 0.1 * predicted:
                center, value, costs = trial, trial_value, trial_costs
                radius *= 2.0
            else:
                radius = max(radius * 0.5, 1e-9)
        return DualResult(value, center, costs, value > self.worst * (1 + 1e-9) + 1e-9)

    def allowed(self, dual: DualResult, upper_bound: float, keep: int | None = None) -> np.ndarray:
        """``(L, H, R)`` rules that can still appear in a plan better than ``upper_bound``.

        With ``keep`` set, instead the rules of each layer's ``keep`` cheapest subsets (a heuristic candidate set).
        """
        costs = dual.layer_costs
        layers, rules = costs.shape[0], costs.shape[-1]
        slack = upper_bound - dual.value + 1e-7 * (1 + abs(upper_bound))
        if self.uncapped:
            excess = costs - costs.min(-1, keepdims=True)  # (L, H, R)
            if keep is None:
                return excess <= slack
            order = np.argsort(excess, axis=-1)[..., :keep]
            mask = np.zeros(excess.shape, dtype=bool)
            np.put_along_axis(mask, order, True, axis=-1)
            return mask
        flat = costs.reshape(layers, -1)
        excess = flat - flat.min(-1, keepdims=True)  # (L, R*R)
        if keep is None:
            surviving = excess <= slack
        else:  # costs are symmetric in the pair: rank each unordered pair once
            once = np.where(np.triu(np.ones((rules, rules), dtype=bool)).ravel(), excess, np.inf)
            surviving = np.zeros_like(excess, dtype=bool)
            np.put_along_axis(surviving, np.argsort(once, axis=-1)[:, :keep], True, axis=-1)
        pairs = surviving.reshape(layers, rules, rules)
        open_rules = pairs.any(2) | pairs.any(1)  # (L, R)
        return np.broadcast_to(open_rules[:, None, :], self.cost.shape).copy()


def _spread(values: np.ndarray) -> float:
    """Sum over heads of the range over rules: how much a coefficient can move the objective."""
    return float((values.max(-1) - values.min(-1)).sum())
