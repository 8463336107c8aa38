"""solve_front against independent oracles: brute force on tiny instances, scipy.optimize.milp on medium ones."""

from __future__ import annotations

import itertools
import os

import numpy as np
import pytest
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import lil_matrix

from pipeline.optimize.front import AUGMENT, solve_front
from pipeline.optimize.lagrange import LayerDual
from pipeline.optimize.milp import solve_milp


def instance(layers, heads, rules, lengths, seed):
    """Loss falling and density rising with a per-rule span, as in a real loss table."""
    rng = np.random.default_rng(seed)
    density = np.sort(rng.uniform(0.05, 1.0, (rules, lengths)), axis=0)  # (R, T)
    kv = np.broadcast_to(density, (layers, heads, rules, lengths)).copy()
    reach = rng.uniform(0.05, 0.8, (layers, heads, 1, lengths))
    loss = np.exp(-kv / reach) * rng.uniform(0.5, 2.0, (layers, heads, 1, 1))
    return loss, kv


def augmented_cost(loss, primary):
    """The documented objective: loss at ``primary`` plus AUGMENT x the others, each scaled by its range."""
    ranges = (loss.max(2) - loss.min(2)).sum((0, 1))
    weights = AUGMENT * ranges[primary] / ranges
    weights[primary] = 1.0
    return loss @ weights  # (L, H, R)


def brute_force_plans(loss, kv, budgets, max_rules, group_size=1, lower=None):
    """Every plan with at most ``max_rules`` rules per layer that meets the budgets: choices, objectives.

    A plan's KV density is what the cache allocates: the mean over (layer, KV head) of the largest density among
    the ``group_size`` heads sharing that KV head (:func:`grouped_density`)."""
    layers, heads, rules, _ = loss.shape
    li, hi = np.arange(layers)[:, None], np.arange(heads)[None, :]
    plans = []
    for flat in itertools.product(range(rules), repeat=layers * heads):
        choice = np.array(flat).reshape(layers, heads)
        if any(len(set(row)) > max_rules for row in choice):
            continue
        density = grouped_density(kv, choice, group_size)
        if np.all(density <= budgets + 1e-12) and (lower is None or np.all(density >= lower - 1e-12)):
            plans.append((choice, loss[li, hi, choice].sum((0, 1))))
    return plans


def grouped_density(kv, choice, group_size):
    """``(T,)``: for each length, the mean over layers and KV heads of the group's largest chosen density."""
    layers, heads, _, lengths = kv.shape
    return np.array([
        np.mean([max(kv[layer, h, choice[layer, h], t] for h in range(g * group_size, (g + 1) * group_size))
                 for layer in range(layers) for g in range(heads // group_size)])
        for t in range(lengths)
    ])


def assert_front_is_optimal(front, plans, loss, kv, budgets, max_rules, group_size=1):
    """Every point optimal for its own epsilon problem over ``plans`` (brute force) and dominated by none."""
    layers, heads = loss.shape[:2]
    li, hi = np.arange(layers)[:, None], np.arange(heads)[None, :]
    assert front
    for c in front:
        assert c.status == "optimal"
        np.testing.assert_allclose(c.objectives, loss[li, hi, c.choice].sum((0, 1)))
        np.testing.assert_allclose(c.densities, grouped_density(kv, c.choice, group_size))
        assert np.all(c.densities <= budgets + 1e-12)
        assert all(len(set(row)) <= max_rules for row in c.choice)
        for _, obj in plans:  # no feasible plan dominates a returned point
            assert not (np.all(obj <= c.objectives + 1e-12) and np.any(obj < c.objectives - 1e-9))
        cost = augmented_cost(loss, c.primary)
        eligible = [ch for ch, obj in plans
                    if all(e is None or obj[t] <= e + 1e-12 for t, e in enumerate(c.epsilon))]
        best = min(cost[li, hi, ch].sum() for ch in eligible)
        assert cost[li, hi, c.choice].sum() == pytest.approx(best, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize(("solver", "reduce", "max_rules", "seed"),
                         [("highs", True, 1, 0), ("highs", False, 2, 1), ("cbc", True, 2, 2), ("highs", True, 3, 3)])
def test_front_points_are_optimal_and_undominated_by_brute_force(solver, reduce, max_rules, seed):
    loss, kv = instance(2, 2, 3, 2, seed)
    budgets = np.quantile(kv.mean((0, 1)), 0.6, axis=0)
    front = solve_front(loss, kv, budgets, max_rules, solver=solver, points=8, reduce=reduce, gap_rel=0.0)
    plans = brute_force_plans(loss, kv, budgets, max_rules)
    assert_front_is_optimal(front, plans, loss, kv, budgets, max_rules)


@pytest.mark.parametrize(("solver", "reduce", "max_rules", "ratio", "seed"), [
    ("highs", True, 2, None, 10), ("highs", False, 3, None, 11), ("cbc", True, 1, None, 12),
    ("highs", True, 2, 0.97, 13), ("cbc", False, 2, 0.97, 14), ("highs", True, 3, 0.97, 15),
])
def test_grouped_budget_front_is_optimal_by_brute_force(solver, reduce, max_rules, ratio, seed):
    """Rules per query head, two query heads per KV head: the budget is on each KV head's largest density (what
    the cache allocates), so every point must be the brute-force optimum under that footprint."""
    loss, kv = instance(2, 4, 3, 2, seed)
    kv = kv * np.random.default_rng(seed).uniform(0.7, 1.0, (2, 4, 1, 1))  # heads differ in density too
    lowest = np.array([grouped_density(kv, np.full((2, 4), r), 2) for r in range(3)]).min(0)  # (T,)
    budgets = lowest + 0.45 * (kv.max(2).max((0, 1)) - lowest)
    lower = None if ratio is None else ratio * budgets
    front = solve_front(loss, kv, budgets, max_rules, group_size=2, solver=solver, points=8, reduce=reduce,
                        gap_rel=0.0, lower_bound_ratio=ratio)
    plans = brute_force_plans(loss, kv, budgets, max_rules, group_size=2, lower=lower)
    assert_front_is_optimal(front, plans, loss, kv, budgets, max_rules, group_size=2)
    if lower is not None:
        assert all(np.all(c.densities >= lower - 1e-12) for c in front)


def test_group_size_must_divide_the_heads():
    loss, kv = instance(1, 4, 2, 1, 0)
    with pytest.raises(ValueError, match="group_size 3"):
        solve_front(loss, kv, [0.9], group_size=3)


def test_solves_leak_no_file_descriptors():
    """Each solve makes a temporary log file; its descriptor must be closed, whichever solver runs."""
    loss, kv = instance(2, 2, 3, 1, 0)
    cost, rows, allowed = loss[..., 0], kv[None, ..., 0] / 4, np.ones(loss.shape[:3], dtype=bool)

    def solve_all():
        for solver in ("highs", "cbc"):
            assert solve_milp(cost, rows, np.array([0.6]), 2, allowed, solver=solver).choice is not None

    solve_all()  # the solvers' own one-time set-up
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(5):
        solve_all()
    assert len(os.listdir("/proc/self/fd")) <= before


def scipy_optimum(cost, loss, kv, budgets, eps, max_rules):
    """The same 0/1 model written independently for scipy.optimize.milp (x then y variables)."""
    layers, heads, rules, lengths = loss.shape
    nx, ny = layers * heads * rules, layers * rules
    xi = np.arange(nx).reshape(layers, heads, rules)
    yi = nx + np.arange(ny).reshape(layers, rules)
    rows, lo, up = [], [], []

    def add(coeffs: dict, low, high):
        rows.append(coeffs)
        lo.append(low)
        up.append(high)

    for l_, h in itertools.product(range(layers), range(heads)):
        add({int(xi[l_, h, r]): 1.0 for r in range(rules)}, 1, 1)
        for r in range(rules):
            add({int(xi[l_, h, r]): 1.0, int(yi[l_, r]): -1.0}, -np.inf, 0)
    for l_ in range(layers):
        add({int(yi[l_, r]): 1.0 for r in range(rules)}, -np.inf, max_rules)
    for t in range(lengths):
        add(dict(zip(xi.ravel().tolist(), (kv[..., t] / (layers * heads)).ravel(), strict=True)), -np.inf, budgets[t])
        if eps[t] is not None:
            add(dict(zip(xi.ravel().tolist(), loss[..., t].ravel(), strict=True)), -np.inf, eps[t])
    matrix = lil_matrix((len(rows), nx + ny))
    for i, coeffs in enumerate(rows):
        for j, v in coeffs.items():
            matrix[i, j] = v
    c = np.concatenate([cost.ravel(), np.zeros(ny)])
    res = milp(c, constraints=LinearConstraint(matrix.tocsr(), lo, up), integrality=np.ones(nx + ny),
               bounds=Bounds(0, 1), options={"mip_rel_gap": 1e-9})
    assert res.status == 0
    return res.fun


@pytest.mark.parametrize(("solver", "seed"), [("highs", 0), ("cbc", 1)])
def test_front_points_match_scipy_milp_on_medium_instances(solver, seed):
    loss, kv = instance(4, 4, 6, 3, seed)
    budgets = np.array([0.45, 0.5, 0.55])
    front = solve_front(loss, kv, budgets, 2, solver=solver, points=6, gap_rel=1e-9)
    li, hi = np.arange(4)[:, None], np.arange(4)[None, :]
    assert len(front) >= 2
    for c in front:
        cost = augmented_cost(loss, c.primary)
        want = scipy_optimum(cost, loss, kv, budgets, c.epsilon, 2)
        assert cost[li, hi, c.choice].sum() == pytest.approx(want, rel=1e-7)


@pytest.mark.parametrize(("solver", "seed"), [("highs", 2), ("cbc", 3)])
def test_front_points_are_within_their_proven_gap_of_scipy_milp(solver, seed):
    """At a loose gap every point must still be within ``gap_rel`` of the optimum, and its reported gap must
    bound its true distance from it."""
    loss, kv = instance(4, 4, 6, 3, seed)
    gap_rel = 1e-3
    front = solve_front(loss, kv, np.array([0.45, 0.5, 0.55]), 2, solver=solver, points=6, gap_rel=gap_rel)
    li, hi = np.arange(4)[:, None], np.arange(4)[None, :]
    assert front
    for c in front:
        cost = augmented_cost(loss, c.primary)
        got = cost[li, hi, c.choice].sum()
        want = scipy_optimum(cost, loss, kv, np.array([0.45, 0.5, 0.55]), c.epsilon, 2)
        assert c.status == "optimal" and c.gap is not None
        assert got <= want * (1 + gap_rel) + 1e-12
        assert (got - want) / got <= c.gap + 1e-9


def test_heuristic_candidates_are_the_cheapest_distinct_rule_pairs():
    """``allowed(keep=k)`` opens the rules of each layer's ``k`` cheapest unordered pairs, found by brute force."""
    loss, kv = instance(3, 4, 5, 2, 7)
    cost = augmented_cost(loss, 0)
    dual = LayerDual(cost, np.stack([kv[..., t] / 12 for t in range(2)]), np.array([0.5, 0.5]), 2)
    bound = dual.maximise()
    c = cost + np.einsum("k,klhr->lhr", bound.mu, dual.rows)  # (L, H, R) at the best multipliers
    for keep in (1, 2, 3):
        opened = dual.allowed(bound, np.inf, keep=keep)
        for layer in range(3):
            pair_cost = {pq: np.minimum(c[layer, :, pq[0]], c[layer, :, pq[1]]).sum()
                         for pq in itertools.combinations_with_replacement(range(5), 2)}
            kth = sorted(pair_cost.values())[keep - 1]
            tol = 1e-9 * (1 + abs(kth))
            cheaper = [pq for pq, v in pair_cost.items() if v < kth - tol]
            tied = [pq for pq, v in pair_cost.items() if abs(v - kth) <= tol]
            choices = {frozenset(itertools.chain(*cheaper, *extra))  # any way of breaking the ties
                       for extra in itertools.combinations(tied, keep - len(cheaper))}
            assert frozenset(np.flatnonzero(opened[layer].any(0)).tolist()) in choices


def test_lagrangian_bound_never_exceeds_the_optimum():
    loss, kv = instance(4, 4, 6, 2, 5)
    budgets = np.array([0.4, 0.5])
    cost = augmented_cost(loss, 1)
    rows = np.stack([kv[..., t] / 16 for t in range(2)])
    dual = LayerDual(cost, rows, budgets, 2).maximise()
    assert dual.value <= scipy_optimum(cost, loss, kv, budgets, [None, None], 2) + 1e-9


def test_infeasible_budget_names_the_length_and_smallest_density():
    loss, kv = instance(2, 2, 3, 2, 0)
    smallest = kv.min(2).mean((0, 1))
    with pytest.raises(ValueError, match=rf"length 2048 .* {smallest[1]:.4f}"):
        solve_front(loss, kv, [0.9, smallest[1] / 2], lengths=[1024, 2048])
