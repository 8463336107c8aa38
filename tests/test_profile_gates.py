"""Distillation-trained head gates (pipeline.profile.gates), against independent references: the dense model at
gate 1, the sparse runtime under a streaming plan at gate 0, finite differences for the gates' gradient, and the
plan densities of :mod:`pipeline.plan` for the full-or-streaming split."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_tiny_model

from pipeline.plan import Plan, plan_kv_density
from pipeline.profile.gates import gate_plan, gated, last_hidden, streaming_mask, train_gates
from pipeline.sparse_runtime import plan_applied

SINK, WINDOW, N = 4, 8, 40


def streaming_plan(model) -> Plan:
    plan = Plan.uniform(model, 0.0, sink=SINK, min_span=2)
    plan.alphas = [[float(WINDOW)] * len(row) for row in plan.alphas]
    return plan


def gated_hidden(model, ids, values: list) -> torch.Tensor:
    gates = [torch.as_tensor(v, dtype=torch.float64).expand(model.config.num_key_value_heads) for v in values]
    with torch.no_grad(), gated(model, gates, streaming_mask(N, SINK, WINDOW, ids.device)):
        return last_hidden(model, ids, torch.arange(N))


def test_gates_mix_dense_and_the_streaming_plan_per_kv_head():
    model = make_tiny_model(layers=3, dtype=torch.float64)
    ids = torch.randint(0, 128, (N,), generator=torch.Generator().manual_seed(0))
    split = streaming_plan(model)  # KV head 0 full, KV head 1 streaming, in every layer
    split.alphas = [[0.0, float(WINDOW)] for _ in split.alphas]
    split.betas = [[1.0, 0.0] for _ in split.betas]
    with torch.no_grad():
        dense = last_hidden(model, ids, torch.arange(N))
        with plan_applied(model, streaming_plan(model), backend="reference"):
            streaming = last_hidden(model, ids, torch.arange(N))
        with plan_applied(model, split, backend="reference"):
            half = last_hidden(model, ids, torch.arange(N))
    torch.testing.assert_close(gated_hidden(model, ids, [1.0] * 3), dense)
    # the reference kernel accumulates in float32
    torch.testing.assert_close(gated_hidden(model, ids, [0.0] * 3), streaming, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gated_hidden(model, ids, [[1.0, 0.0]] * 3), half, rtol=1e-5, atol=1e-5)
    assert (dense - streaming).abs().max() > 1e-3 and (half - streaming).abs().max() > 1e-3  # the window cuts something at this length
    assert model.config._attn_implementation != "moa_gate"


def test_gate_gradient_matches_finite_differences():
    model = make_tiny_model(layers=2, dtype=torch.float64)
    ids = torch.randint(0, 128, (N,), generator=torch.Generator().manual_seed(1))
    mask = streaming_mask(N, SINK, WINDOW, ids.device)
    with torch.no_grad():
        target = last_hidden(model, ids, torch.arange(N))

    def loss(gates):
        with gated(model, gates, mask):
            return (last_hidden(model, ids, torch.arange(N)) - target).pow(2).sum()

    gates = [torch.tensor([0.3, 0.7], dtype=torch.float64, requires_grad=True) for _ in range(2)]
    loss(gates).backward()
    eps = 1e-3  # RMSNorm runs in float32 even in a float64 model: a small step drowns in its rounding
    for layer in range(2):
        for head in range(2):
            plus = [g.detach().clone() for g in gates]
            minus = [g.detach().clone() for g in gates]
            plus[layer][head] += eps
            minus[layer][head] -= eps
            with torch.no_grad():
                numeric = (loss(plus) - loss(minus)) / (2 * eps)
            assert gates[layer].grad[head].item() == pytest.approx(numeric.item(), rel=1e-4)


def test_training_lowers_gates_only_under_the_penalty():
    model = make_tiny_model(layers=2)
    ids = torch.randint(0, 128, (N,), generator=torch.Generator().manual_seed(2))
    samples = [(ids, torch.arange(N - 10, N))]
    kept = train_gates(model, samples, sink=SINK, window=WINDOW, steps=5, lr=0.1, l1=0.0)
    pushed = train_gates(model, samples, sink=SINK, window=WINDOW, steps=20, lr=0.1, l1=10.0)
    assert kept.shape == (2, 2) and np.all(kept > 0.99)  # at gate 1 the output is dense's: no gradient
    assert pushed.max() < 0.5
    assert all(p.requires_grad for p in model.parameters())


def test_gate_plan_keeps_the_largest_gates_full_within_the_density():
    model = make_tiny_model(layers=3)
    template = streaming_plan(model)
    template.min_span = 2
    gates = np.array([[0.9, 0.1], [0.2, 0.8], [0.5, 0.4]])
    n = 64
    stream = plan_kv_density(template, n)
    for full_heads in range(7):
        # the KV density of `full_heads` full heads and the others streaming, from the plan module itself
        probe = streaming_plan(model)
        chosen = np.argsort(-gates.ravel(), kind="stable")[:full_heads]
        alphas = np.full(6, float(WINDOW))
        betas = np.zeros(6)
        alphas[chosen], betas[chosen] = 0.0, 1.0
        probe.alphas, probe.betas = alphas.reshape(3, 2).tolist(), betas.reshape(3, 2).tolist()
        density = plan_kv_density(probe, n)
        plan = gate_plan(template, gates, n, density, WINDOW)
        assert plan.solver["full_heads"] == full_heads
        assert np.array_equal(np.array(plan.betas) == 1.0, np.array(probe.betas) == 1.0)
        assert plan_kv_density(plan, n) <= density + 1e-12
        assert gate_plan(template, gates, n, density - 1e-6, WINDOW).solver["full_heads"] == max(full_heads - 1, 0)
    assert gate_plan(template, gates, n, stream, WINDOW).solver["full_heads"] == 0
