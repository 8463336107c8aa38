"""The full-matrix baseline: eager attention that keeps every layer's ``A`` and reads ``G = dL/dA`` by autograd.

It holds ``L * Hq * n * n`` probabilities and as many gradients at once, which is what the blockwise profiler in
:mod:`pipeline.profile.influence` avoids. It serves as the test oracle and the memory baseline of
``scripts/bench_profile.py``.
"""

from __future__ import annotations

import torch

from pipeline.profile.hooks import attention_implementation, check_supported
from pipeline.profile.influence import block_sums, entry_influence, group_heads
from pipeline.profile.loss import frozen_parameters, response_loss

NAIVE_NAME = "moa_profile_naive"


class _EagerProbs:
    """Eager causal attention that retains the gradient of each layer's probabilities ``(Hq, n, n)``."""

    def __init__(self):
        self.probs: list[torch.Tensor] = []
        self.num_kv_heads = 0

    def __call__(self, module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        check_supported(query, key, attention_mask, kwargs)
        n, d = query.shape[2], query.shape[3]
        self.num_kv_heads = key.shape[1]
        group = query.shape[1] // key.shape[1]
        key = key.repeat_interleave(group, dim=1)  # (1, Hq, n, D)
        value = value.repeat_interleave(group, dim=1)
        scale = scaling if scaling is not None else d**-0.5
        scores = query @ key.transpose(-1, -2) * scale  # (1, Hq, n, n)
        future = torch.ones(n, n, dtype=torch.bool, device=query.device).triu(1)
        probs = torch.softmax(scores.masked_fill(future, float("-inf")), dim=-1)
        if probs.requires_grad:
            probs.retain_grad()
        self.probs.append(probs)
        return (probs @ value).transpose(1, 2).contiguous(), None  # (1, n, Hq, D)


def _probs_and_grads(model, input_ids: torch.Tensor, loss_mask: torch.Tensor) -> tuple[list, list, int]:
    """Per layer ``A`` ``(Hq, n, n)`` and ``G = dL/dA`` from one forward+backward; plus the KV head count."""
    eager = _EagerProbs()
    with attention_implementation(model, NAIVE_NAME, eager), frozen_parameters(model):
        response_loss(model, input_ids, loss_mask, grad_inputs=True).backward()
    grads = [torch.zeros_like(p[0]) if p.grad is None else p.grad[0] for p in eager.probs]
    probs = [p.detach()[0] for p in eager.probs]
    return probs, grads, eager.num_kv_heads


def naive_token_influence(model, input_ids: torch.Tensor, loss_mask: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Signed token-level ``E`` ``[L, Hq, n, n]`` from the materialised ``A`` and its autograd gradient.

    Also returns the number of KV heads seen, for :func:`pipeline.profile.influence.group_heads`.
    """
    probs, grads, num_kv_heads = _probs_and_grads(model, input_ids, loss_mask)
    e = [entry_influence(a, g, (a * g).sum(-1)) for a, g in zip(probs, grads, strict=True)]
    return torch.stack(e), num_kv_heads


def naive_attention_influence(model, input_ids: torch.Tensor, loss_mask: torch.Tensor, block_size: int = 64,
                              granularity: str = "kv_head") -> torch.Tensor:
    """Same contract as :func:`pipeline.profile.attention_influence`, from the full per-layer matrices.

    Every layer's ``A`` and ``G`` are held at once (the point of this baseline); ``E`` is formed one layer at a
    time so the peak is not inflated further by temporaries.
    """
    probs, grads, num_kv_heads = _probs_and_grads(model, input_ids, loss_mask)
    layers = []
    while probs:
        a, g = probs.pop(0), grads.pop(0)
        e = entry_influence(a, g, (a * g).sum(-1)).abs_()  # (Hq, n, n)
        n = e.shape[-1]
        rows = [block_sums(e[:, start : start + block_size], block_size) for start in range(0, n, block_size)]
        layers.append(torch.stack(rows, dim=1))  # (Hq, nb, nb)
        del a, g, e
    return group_heads(torch.stack(layers), num_kv_heads, granularity)
