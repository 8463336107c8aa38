"""The MILP's cost with head gates (pipeline.optimize.gate_cost), checked against its formula written out per
head and against brute force over every full-or-streaming split of a small model."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from pipeline.optimize.front import solve_front
from pipeline.optimize.gate_cost import planning_loss


def test_planning_loss_adds_the_gated_share_each_rule_drops():
    rng = np.random.default_rng(0)
    loss = rng.random((2, 4, 3, 2))  # (L, H query heads, R, T)
    density = rng.random((2, 4, 3, 2))
    gates = np.array([[0.2, 0.9], [1.0, 0.0]])  # (L, Hkv): query heads 0-1 read KV head 0, 2-3 KV head 1
    got = planning_loss(loss, density, gates, 0.5)
    for layer, head, rule, t in itertools.product(range(2), range(4), range(3), range(2)):
        expected = loss[layer, head, rule, t] + 0.5 * gates[layer, head // 2] * (1 - density[layer, head, rule, t])
        assert got[layer, head, rule, t] == pytest.approx(expected)
    assert planning_loss(loss, density, gates, 0.0) is loss
    assert planning_loss(loss, density, None, 1.0) is loss
    with pytest.raises(ValueError, match="do not fit"):
        planning_loss(loss, density, np.ones((2, 3)), 1.0)


def brute_force(cost: np.ndarray, density: np.ndarray, budget: float) -> tuple[int, ...]:
    """The cheapest choice of one rule per head whose mean density meets ``budget`` (one layer, one length)."""
    heads, rules = cost.shape
    best = min((c for c in itertools.product(range(rules), repeat=heads)
                if np.mean([density[h, r] for h, r in enumerate(c)]) <= budget + 1e-12),
               key=lambda c: sum(cost[h, r] for h, r in enumerate(c)))
    return best


@pytest.mark.parametrize("weight", [0.0, 0.05, 1.0])
def test_gated_heads_win_the_full_rule_as_the_weight_grows(weight):
    # rule 0 full (density 1), rule 1 streaming (density 0.1); room for two full heads of five
    influence = np.array([[0.30, 0.0], [0.25, 0.0], [0.20, 0.0], [0.02, 0.0], [0.01, 0.0]])  # streaming's loss
    loss = np.zeros((1, 5, 2, 1))
    loss[0, :, 1, 0] = influence[:, 0]
    density = np.zeros((1, 5, 2, 1))
    density[0, :, 0, 0], density[0, :, 1, 0] = 1.0, 0.1
    gates = np.array([[0.0, 0.1, 0.0, 1.0, 0.9]])
    budget = (2 * 1.0 + 3 * 0.1) / 5
    cost = planning_loss(loss, density, gates, weight)
    front = solve_front(cost, density, [budget], 2, points=1, gap_rel=0.0)
    choice = tuple(min(front, key=lambda c: c.objectives[0]).choice[0])
    assert choice == brute_force(cost[0, :, :, 0], density[0, :, :, 0], budget)
    full = {h for h, r in enumerate(choice) if r == 0}
    assert full == ({0, 1} if weight < 0.3 else {3, 4})
