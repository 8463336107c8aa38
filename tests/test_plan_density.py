"""A plan's KV density is what the per-head cache allocates, at both granularities on a GQA model; the MILP's
front reports and budgets that same quantity."""

import numpy as np
import pytest
import torch
from conftest import make_tiny_model

from kernels.pattern import kv_density, spans_at
from pipeline import sparse_runtime
from pipeline.optimize.front import solve_front
from pipeline.plan import Plan, plan_kv_density

LAYERS, HEADS, KV_HEADS, HEAD_DIM = 2, 4, 2, 16


def heterogeneous_plan(model, granularity: str) -> Plan:
    """Every head of the plan on its own rule, so the query heads of one KV head differ in span."""
    plan = Plan.uniform(model, 0.0, sink=4, min_span=2, granularity=granularity)
    heads = plan.num_plan_heads
    plan.alphas = [[3.0 + 11 * h + 7 * layer for h in range(heads)] for layer in range(LAYERS)]
    plan.betas = [[0.05 * ((3 * h + layer) % 4) for h in range(heads)] for layer in range(LAYERS)]
    return plan


@pytest.mark.parametrize("granularity", ["kv_head", "head"])
def test_plan_kv_density_is_what_the_cache_allocates(granularity, monkeypatch):
    """Generate through the runtime's own per-head cache and compare its allocated bytes with the plan's density
    times a dense cache's bytes."""
    model = make_tiny_model("llama", layers=LAYERS, heads=HEADS, kv_heads=KV_HEADS, head_dim=HEAD_DIM)
    model.generation_config.eos_token_id = None
    plan = sparse_runtime.apply_plan(model, heterogeneous_plan(model, granularity))
    built, make_cache = [], sparse_runtime.make_cache

    def recording_make_cache(*args, **kwargs):  # the runtime's own cache, kept for inspection
        built.append(make_cache(*args, **kwargs))
        return built[-1]

    monkeypatch.setattr(sparse_runtime, "make_cache", recording_make_cache)
    batch, prompt, new = 2, 40, 24
    ids = torch.randint(0, 128, (batch, prompt), generator=torch.Generator().manual_seed(0))
    sparse_runtime.generate(model, ids, new, do_sample=False)
    (cache,) = built
    total = prompt + new
    dense = LAYERS * batch * KV_HEADS * total * HEAD_DIM * 2 * 4  # layers, batch, KV heads, tokens, dim, K and V, fp32
    density = plan_kv_density(plan, total)
    assert density < 1
    assert cache.nbytes_allocated == pytest.approx(density * dense, rel=1e-12)


def test_front_densities_are_the_plans_kv_density():
    """A loss table's per-rule KV densities, solved per query head with two query heads per KV head: every front
    plan's reported density is the density of the plan it becomes, which is what its cache allocates."""
    sink, min_span, lengths = 4, 2, [64, 128]
    alphas, betas = np.array([2.0, 10.0, 30.0, 8.0]), np.array([0.0, 0.05, 0.1, 0.4])
    kv = np.array([[kv_density(n, int(spans_at(a, b, n, min_span)), sink) for n in lengths]
                   for a, b in zip(alphas, betas, strict=True)])  # (R, T)
    table = np.broadcast_to(kv, (LAYERS, HEADS, *kv.shape)).copy()  # (L, H, R, T)
    loss = np.exp(-table * np.random.default_rng(0).uniform(1, 8, (LAYERS, HEADS, 1, 1)))
    front = solve_front(loss, table, [0.5, 0.4], 2, group_size=HEADS // KV_HEADS, points=6, gap_rel=0.0)
    model = make_tiny_model("llama", layers=LAYERS, heads=HEADS, kv_heads=KV_HEADS, head_dim=HEAD_DIM)
    assert front
    for candidate in front:
        plan = Plan.uniform(model, 0.0, sink=sink, min_span=min_span, granularity="head")
        plan.alphas, plan.betas = alphas[candidate.choice].tolist(), betas[candidate.choice].tolist()
        for t, n in enumerate(lengths):
            assert candidate.densities[t] == pytest.approx(plan_kv_density(plan, n), rel=1e-12)
            assert candidate.densities[t] <= [0.5, 0.4][t] + 1e-12
