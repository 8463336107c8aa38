"""The binary baseline re-solved at one length: full or streaming per head, at most a KV density there, least loss.

Oracle: brute force over every full/streaming assignment of a small model's heads."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from pipeline.optimize.baselines import binary_plan_at
from pipeline.plan import Plan, plan_kv_density

SINK, MIN_SPAN, WINDOW = 4, 4, 12
ALPHAS = np.array([0.0, WINDOW, 24.0, 0.0])  # full, the streaming window, a wider window, an elastic rule
BETAS = np.array([1.0, 0.0, 0.0, 0.5])
LENGTHS = [64, 256]


def _table(rng: np.random.Generator, layers: int, heads: int) -> dict:
    loss = rng.random((layers, heads, len(ALPHAS), len(LENGTHS)))
    loss[:, :, 0] = 0.0  # full attention loses nothing
    return {"loss": loss, "alphas": ALPHAS, "betas": BETAS, "lengths": np.array(LENGTHS)}


def _template(layers: int, heads: int) -> Plan:
    return Plan(granularity="kv_head", sink=SINK, min_span=MIN_SPAN, block_size=4,
                alphas=[[WINDOW] * heads for _ in range(layers)], betas=[[0.0] * heads for _ in range(layers)],
                model={"num_layers": layers, "num_heads": heads, "num_kv_heads": heads}, profile_lengths=LENGTHS,
                solver={"name": "binary", "streaming_window": WINDOW})


def _brute_force(loss: np.ndarray, length: int, budget: float) -> float:
    """Least total loss of any full/streaming split whose mean KV density at ``length`` is within ``budget``."""
    share = [1.0, min(SINK + WINDOW, length) / length]
    best = np.inf
    for split in itertools.product((0, 1), repeat=loss.size // 2):
        choice = np.array(split).reshape(loss.shape[:2])
        if np.mean(np.choose(choice, share)) <= budget + 1e-12:
            best = min(best, float(np.take_along_axis(loss, choice[..., None], 2).sum()))
    return best


@pytest.mark.parametrize("length, source", [(64, 0), (128, 0), (256, 1), (1024, 1), (48, 0)])
@pytest.mark.parametrize("seed", range(4))
def test_binary_plan_at_a_length_is_the_least_loss_split_within_the_density(length, source, seed):
    rng = np.random.default_rng(seed)
    layers, heads = 2, 4
    table = _table(rng, layers, heads)
    budget = float(rng.uniform(0.35, 0.75))  # above every head streaming (1/3 at 48 tokens)
    plan = binary_plan_at(table, _template(layers, heads), length, budget, group_size=1, solver="highs",
                          time_limit=None, gap_rel=0.0)
    rules = {(0.0, 1.0): 0, (float(WINDOW), 0.0): 1}
    choice = np.array([[rules[(a, b)] for a, b in zip(ra, rb, strict=True)]
                       for ra, rb in zip(plan.alphas, plan.betas, strict=True)])  # only the two binary rules
    loss = table["loss"][:, :, [0, 1], source]  # the losses of the profile length at or below `length`
    assert plan_kv_density(plan, length) <= budget + 1e-9
    assert float(np.take_along_axis(loss, choice[..., None], 2).sum()) == pytest.approx(
        _brute_force(loss, length, budget), abs=1e-9)
    assert plan.solver["full_heads"] == int((choice == 0).sum())
    assert plan.solver["loss_from_length"] == LENGTHS[source]


def test_binary_plan_streams_every_head_when_even_that_exceeds_the_density():
    table = _table(np.random.default_rng(0), 2, 4)
    plan = binary_plan_at(table, _template(2, 4), 64, 0.1, group_size=1, solver="highs", time_limit=None,
                          gap_rel=0.0)
    assert {a for row in plan.alphas for a in row} == {float(WINDOW)} and plan.solver["full_heads"] == 0
    assert plan_kv_density(plan, 64) == pytest.approx((SINK + WINDOW) / 64)
