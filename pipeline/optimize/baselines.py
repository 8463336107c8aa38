"""Baseline plans built from the same loss table and MILP as the front, so every method runs one runtime.

- **binary** (DuoAttention-style): each head is either *full* (span ``N``: the rule ``alpha=0, beta=1``) or
  *streaming* (the sink plus a fixed local window ``w``: the rule ``alpha=w, beta=0``), chosen by the same MILP as
  the front, restricted to those two rules, under the same KV budget (:func:`binary_plan_choice`, the optimize
  stage's ``binary_<budget>.json``). A streaming head's share of the cache shrinks as ``N`` grows, so one such
  plan that meets the budget at the shortest profile length keeps less than the budget at longer ones.
  Validation and evaluation therefore compare at equal density with :func:`binary_plan_at`: the same two rules,
  solved again for each length at the density of the plan it is compared with.
- **uniform** (StreamingLLM-style): one sink and one window for every head, sized to a KV density at one length;
  see :func:`uniform_window_plan`. The evaluation builds it at each length from the plan it is compared with.
"""

from __future__ import annotations

import copy

import numpy as np

from kernels.pattern import kv_density as kv_density_at
from kernels.pattern import span_at
from pipeline.optimize.front import PlanCandidate, solve_front
from pipeline.plan import Plan, plan_attention_density, plan_kv_density


def rule_index(alphas: np.ndarray, betas: np.ndarray, alpha: float, beta: float) -> int | None:
    """The index of rule ``(alpha, beta)`` in the table's rule list, or None."""
    hits = np.flatnonzero(np.isclose(alphas, alpha) & np.isclose(betas, beta))
    return int(hits[0]) if len(hits) else None


def streaming_window(alphas: np.ndarray, betas: np.ndarray, kv_density: np.ndarray, budget: np.ndarray,
                     window: int | None) -> int:
    """The streaming rule's window: ``window`` if given (it must be a rule of the table), else the widest
    ``beta = 0`` rule whose all-streaming KV density is at most half the budget at every length, so that the MILP
    can still make about half the heads full; where no window is that narrow (a short length at a small budget),
    the widest one that fits the budget at all.

    ``kv_density`` is the table's ``(L, H, R, T)`` densities; ``budget`` is ``(T,)``."""
    local = [int(r) for r in np.flatnonzero(np.isclose(betas, 0.0) & (alphas > 0))]
    if window is not None:
        index = rule_index(alphas, betas, window, 0.0)
        if index is None:
            raise ValueError(f"optimize.binary_window: {window} is not a rule of the grid (its beta=0 windows are "
                             f"{sorted(int(alphas[r]) for r in local)})")
        return int(window)
    all_streaming = {r: kv_density[:, :, r].mean((0, 1)) for r in local}  # (T,) each
    fitting = [r for r in local if np.all(all_streaming[r] <= budget / 2)] or \
        [r for r in local if np.all(all_streaming[r] <= budget)]
    if not fitting:
        raise ValueError(f"no streaming window of the grid fits the budget {budget.tolist()} even with every head "
                         f"streaming")
    return int(max(alphas[r] for r in fitting))


def binary_plan_choice(loss: np.ndarray, kv_density: np.ndarray, budget: np.ndarray, alphas: np.ndarray,
                       betas: np.ndarray, *, window: int | None, group_size: int, solver: str,
                       time_limit: float | None, gap_rel: float, lengths) -> tuple[PlanCandidate, np.ndarray, int]:
    """The binary plan at ``budget``: the MILP over {full, streaming} that loses least at the longest length.

    Returns the candidate (its ``choice`` indexes the two-rule table), the two rule indices ``(full, streaming)``
    of the full table, and the window."""
    full = rule_index(alphas, betas, 0.0, 1.0)
    if full is None:
        raise ValueError("the rule grid has no full-attention rule (alpha=0, beta=1) for the binary baseline")
    window = streaming_window(alphas, betas, kv_density, budget, window)
    rules = np.array([full, rule_index(alphas, betas, window, 0.0)])
    front = solve_front(loss[:, :, rules], kv_density[:, :, rules], budget.tolist(), 2, group_size=group_size,
                        solver=solver, points=len(budget), time_limit=time_limit, gap_rel=gap_rel, lengths=lengths)
    best = min(front, key=lambda c: (c.objectives[-1], c.objectives.sum()))
    return best, rules, window


def binary_plan_at(table: dict, template: Plan, length: int, kv_density: float, *, group_size: int, solver: str,
                   time_limit: float | None, gap_rel: float) -> Plan:
    """The binary plan for one ``length`` at KV density at most ``kv_density`` there: ``template``'s two rules (full,
    and its streaming window), one per head by the MILP, with the heads' losses from ``table`` (the loss table) at
    the longest profile length not above ``length`` (the shortest one below them all).

    Where even every head streaming keeps more than ``kv_density``, every head streams: the sparsest binary plan.
    """
    window = int(template.solver["streaming_window"])
    full, streaming = (rule_index(table["alphas"], table["betas"], a, b) for a, b in ((0.0, 1.0), (window, 0.0)))
    if full is None or streaming is None:
        raise ValueError(f"the loss table lacks the binary rules (0, 1) and ({window}, 0): re-run stage=optimize")
    rules = np.array([full, streaming])
    profiled = [int(n) for n in table["lengths"]]
    source = max([t for t, n in enumerate(profiled) if n <= length], default=0)
    loss = table["loss"][:, :, rules, source][..., None]  # (L, H, 2, 1)
    share = np.array([kv_density_at(length, span_at(a, b, length, template.min_span), template.sink)
                      for a, b in ((0.0, 1.0), (window, 0.0))])  # (2,) KV density of each rule
    density = np.broadcast_to(share[None, None, :, None], loss.shape)  # (L, H, 2, 1)
    choice = np.ones(loss.shape[:2], dtype=int)  # (L, H): 1 = streaming
    status = "all_streaming"
    if kv_density >= share[1]:
        front = solve_front(loss, density, [kv_density], 2, group_size=group_size, solver=solver, points=1,
                            time_limit=time_limit, gap_rel=gap_rel, lengths=[length])
        best = min(front, key=lambda c: c.objectives[-1])
        choice, status = best.choice, best.status
    plan = copy.deepcopy(template)
    plan.alphas = table["alphas"][rules[choice]].tolist()
    plan.betas = table["betas"][rules[choice]].tolist()
    plan.density_budget = {length: float(kv_density)}
    plan.solver = {**template.solver, "status": status, "solved_at": length,
                   "loss_from_length": profiled[source], "full_heads": int((choice == 0).sum())}
    plan.expected = {length: {"kv_density": plan_kv_density(plan, length),
                              "attention_density": plan_attention_density(plan, length), "influence_loss": None}}
    return plan


def uniform_window_plan(model, kv_density: float, length: int, *, sink: int, min_span: int, block_size: int,
                        granularity: str = "kv_head") -> Plan:
    """The uniform plan whose single window gives KV density ``kv_density`` at ``length``: every head keeps the
    sink plus its last ``round(kv_density * length) - sink`` tokens (at least ``min_span``), at every length."""
    window = max(min_span, round(kv_density * length) - sink)
    plan = Plan.uniform(model, 0.0, sink=sink, min_span=min_span, block_size=block_size, granularity=granularity,
                        lengths=[length])
    plan.alphas = [[float(window)] * len(row) for row in plan.alphas]
    plan.solver = {**plan.solver, "name": "uniform", "window": window}
    plan.expected = {length: {"kv_density": plan_kv_density(plan, length),
                              "attention_density": plan_attention_density(plan, length), "influence_loss": None}}
    return plan
