"""The KV density budget of the plan MILP, on what the per-head cache allocates.

The cache gives every KV head the largest span among the query heads sharing it, so a plan's KV density at
length ``t`` is the *grouped footprint*

    F_t(x) = mean over (layer l, KV head g) of  max_{h in g} kv[l, h, r_h, t]

where ``r_h`` is head ``h``'s rule and ``kv`` the loss table's per-rule KV density. With one head per group (rules
per KV head, or an MHA model) the max is over one head and ``F_t`` is linear in the 0/1 choice: today's rows
``sum kv x / (L H) <= budget``. With larger groups (rules per query head on a GQA model) the MILP models the max
exactly with one continuous ``f[l, g, t]`` per (layer, KV head, length), bounded below by each member head's
density (:func:`pipeline.optimize.milp.solve_milp`).

The Lagrangian bound (:mod:`pipeline.optimize.lagrange`) needs linear rows. :meth:`KVBudget.relaxation` gives
rows that every plan meeting the budget also meets (a max is at least the mean, and at most the sum of its
members' excess over their smallest value plus the largest smallest value), so a bound and a reduction computed
from them stay valid for the grouped problem; they are only weaker.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class KVBudget:
    """``lower[t] <= F_t(x) <= upper[t]`` for every length ``t``; see the module docstring for ``F``."""

    density: np.ndarray
    """``(L, H, R, T)`` KV density of each head's rules; heads ``g * group_size .. (g + 1) * group_size - 1`` share
    KV head ``g``."""
    group_size: int
    """Heads per KV head: query heads per KV head at ``head`` granularity on a GQA model, else 1."""
    upper: np.ndarray
    """``(T,)``."""
    lower: np.ndarray | None = None
    """``(T,)``, or None for no lower bound."""

    def __post_init__(self):
        heads = self.density.shape[1]
        if self.group_size < 1 or heads % self.group_size:
            raise ValueError(f"group_size {self.group_size} does not divide the {heads} heads of the loss table")

    @property
    def grouped(self) -> bool:
        """Whether the footprint needs the MILP's group variables (more than one head per KV head)."""
        return self.group_size > 1

    def footprint(self, choice: np.ndarray) -> np.ndarray:
        """``(T,)`` KV density of the plan ``choice`` ``(L, H)``: ``F_t`` above."""
        layers, heads = choice.shape
        per_head = self.density[np.arange(layers)[:, None], np.arange(heads)[None, :], choice]  # (L, H, T)
        return group_max(per_head, self.group_size).mean((0, 1))

    def met_by(self, choice: np.ndarray, rtol: float = 1e-9) -> bool:
        """Whether ``choice`` keeps every length within its budget (to ``rtol``, as a solver would)."""
        f = self.footprint(choice)
        if np.any(f > self.upper + rtol * (1 + np.abs(self.upper))):
            return False
        return self.lower is None or bool(np.all(f >= self.lower - rtol * (1 + np.abs(self.lower))))

    def extremes(self) -> tuple[np.ndarray, np.ndarray]:
        """``(T,)`` each: the footprint with every head on its sparsest rule, and on its densest."""
        return (group_max(self.density.min(2), self.group_size).mean((0, 1)),
                group_max(self.density.max(2), self.group_size).mean((0, 1)))

    def linear_rows(self) -> tuple[np.ndarray, np.ndarray]:
        """The budget as rows ``(k, L, H, R)`` and right-hand sides ``(k,)`` of ``rows . x <= rhs``: exact at group
        size 1 (the MILP then needs no group variables), none at larger sizes (the MILP models the groups)."""
        if self.grouped:
            return self._empty()
        return self._mean_rows()

    def relaxation(self) -> tuple[np.ndarray, np.ndarray]:
        """Linear rows ``(k, L, H, R)`` and ``(k,)`` that every plan meeting the budget meets: the budget itself at
        group size 1. Larger groups: the mean over a group's heads is at most their max (upper rows); their max is
        at most ``sum_h (v_h - m_h) + max_h m_h`` with ``m_h`` a head's smallest density (lower rows)."""
        if not self.grouped:
            return self._mean_rows()
        layers, heads, _, lengths = self.density.shape
        kv_heads = heads // self.group_size
        rows, rhs = [], []
        for t in range(lengths):
            rows.append(self.density[..., t] / (layers * heads))
            rhs.append(self.upper[t])
        if self.lower is not None:
            smallest = self.density.min(2)  # (L, H, T)
            slack = (group_max(smallest, self.group_size).sum((0, 1))
                     - smallest.sum((0, 1))) / (layers * kv_heads)  # (T,)
            for t in range(lengths):
                rows.append(-self.density[..., t] / (layers * kv_heads))
                rhs.append(-self.lower[t] + slack[t])
        return np.stack(rows), np.array(rhs)

    def _mean_rows(self) -> tuple[np.ndarray, np.ndarray]:
        """``mean_h kv <= upper`` (and ``-mean_h kv <= -lower``) per length."""
        layers, heads, _, lengths = self.density.shape
        rows = [self.density[..., t] / (layers * heads) for t in range(lengths)]
        rhs = list(self.upper)
        if self.lower is not None:
            rows += [-self.density[..., t] / (layers * heads) for t in range(lengths)]
            rhs += list(-self.lower)
        return np.stack(rows), np.array(rhs, dtype=np.float64)

    def _empty(self) -> tuple[np.ndarray, np.ndarray]:
        return np.zeros((0, *self.density.shape[:3])), np.zeros(0)


def group_max(per_head: np.ndarray, group_size: int) -> np.ndarray:
    """``(L, H, ...)`` -> ``(L, H / group_size, ...)``: the largest value among each KV head's query heads."""
    layers, heads = per_head.shape[:2]
    return per_head.reshape(layers, heads // group_size, group_size, *per_head.shape[2:]).max(2)
