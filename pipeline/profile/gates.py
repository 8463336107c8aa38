"""Distillation-trained head gates: which KV heads a model needs whole, measured jointly (DuoAttention-style).

Every KV head ``h`` of every layer gets a gate ``a_h`` in ``[0, 1]``; its attention output becomes

    a_h * full_causal(q, k, v) + (1 - a_h) * streaming(q, k, v),

where ``streaming`` keeps a sink and a local window. The model's weights stay frozen; the gates (initialised at 1)
are trained with Adam to keep the final hidden states at chosen positions close to dense attention's (squared
error relative to the dense states' mean square) plus ``l1`` times the mean gate, so gates fall wherever streaming
costs the output little, all heads streaming together: a joint measure, which the one-head-at-a-time influence of
:mod:`pipeline.profile.influence` is not. :func:`gate_plan` turns the gates into a full-or-streaming plan at a KV
density. ``scripts/gate_heads.py`` trains and scores them on a run.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator

import numpy as np
import torch
from tqdm import tqdm
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from kernels.pattern import kv_density as kv_density_at
from kernels.pattern import span_at
from pipeline.plan import Plan, plan_attention_density, plan_kv_density
from pipeline.profile.loss import frozen_parameters
from pipeline.sparse_runtime import attention_modules

GATED = "moa_gate"
"""The attention implementation name the gated attention is registered under."""


def streaming_mask(n: int, sink: int, window: int, device) -> torch.Tensor:
    """``[n, n]`` bool, True where query ``i`` may read key ``j``: causal, and ``j`` in the sink or the last
    ``window`` positions."""
    i = torch.arange(n, device=device)[:, None]
    j = torch.arange(n, device=device)[None, :]
    return (j <= i) & ((j < sink) | (i - j < window))


def gated_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **_):
    """``a * full + (1 - a) * streaming`` per KV head (module docstring); returns ``([B, n, Hq, D], None)``."""
    group = query.shape[1] // key.shape[1]
    key = key.repeat_interleave(group, 1)  # (B, Hq, n, D)
    value = value.repeat_interleave(group, 1)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    full = sdpa(query, key, value, is_causal=True, scale=scaling)  # (B, Hq, n, D)
    local = sdpa(query, key, value, attn_mask=module.moa_stream_mask, scale=scaling)
    gate = module.moa_gate.clamp(0.0, 1.0).repeat_interleave(group)[None, :, None, None]  # (1, Hq, 1, 1)
    out = local + gate * (full - local)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(GATED, gated_attention)
AttentionMaskInterface.register(GATED, lambda **_: None)


def last_hidden(model, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """The final normed hidden states at ``positions``: ``[T, d]``."""
    return model.model(input_ids=ids[None]).last_hidden_state[0, positions]


@contextlib.contextmanager
def gated(model, gates: list[torch.Tensor], stream_mask: torch.Tensor | None = None) -> Iterator[None]:
    """Run ``model``'s attention gated inside the block: layer ``l`` mixes with ``gates[l]`` ``[Hkv]`` and the
    streaming mask ``stream_mask`` ``[n, n]`` (set ``module.moa_stream_mask`` per length when None)."""
    modules = attention_modules(model)
    previous = model.config._attn_implementation
    for module, gate in zip(modules, gates, strict=True):
        module.moa_gate = gate
        module.moa_stream_mask = stream_mask
    model.set_attn_implementation(GATED)
    try:
        yield
    finally:
        model.set_attn_implementation(previous)
        for module in modules:
            del module.moa_gate, module.moa_stream_mask


def train_gates(model, samples, *, sink: int, window: int, steps: int, lr: float, l1: float,
                progress=tqdm) -> np.ndarray:
    """Gates ``[L, Hkv]`` in [0, 1] trained by distillation from dense attention (module docstring).

    ``samples`` are ``(input_ids [n], positions [T])`` pairs: the hidden states at ``positions`` are distilled; one
    sample per step, in turn. ``progress`` wraps the loops (a tqdm-like callable)."""
    if not samples:
        raise ValueError("no sample to train the head gates on")
    with torch.no_grad():
        targets = [last_hidden(model, ids, pos) for ids, pos in progress(samples, desc="gate targets")]  # [T, d] each
    num_kv = model.config.num_key_value_heads
    gates = [torch.nn.Parameter(torch.ones(num_kv)) for _ in attention_modules(model)]
    optimiser = torch.optim.Adam(gates, lr=lr)
    masks: dict[int, torch.Tensor] = {}
    with frozen_parameters(model), gated(model, gates):
        bar = progress(range(steps), desc="gate steps")
        for step in bar:
            ids, positions = samples[step % len(samples)]
            n = ids.numel()
            mask = masks.setdefault(n, streaming_mask(n, sink, window, ids.device))
            for module in attention_modules(model):
                module.moa_stream_mask = mask
            hidden = last_hidden(model, ids, positions)  # (T, d)
            target = targets[step % len(samples)]
            distill = (hidden - target).pow(2).mean() / target.pow(2).mean()
            mean_gate = torch.cat(gates).clamp(0, 1).mean()
            loss = distill + l1 * mean_gate
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            with torch.no_grad():
                for gate in gates:
                    gate.clamp_(0.0, 1.0)
            bar.set_postfix(distill=f"{distill.item():.4f}", mean_gate=f"{mean_gate.item():.3f}")
    return torch.stack([g.detach() for g in gates]).numpy()


def gate_plan(template: Plan, gates: np.ndarray, length: int, kv_density: float, window: int) -> Plan:
    """Full span for the heads with the largest gates, the sink plus ``window`` for the rest: as many full heads as
    keep the KV density at ``length`` at most ``kv_density`` (ties broken by layer, then head). ``gates`` is
    ``[L, Hkv]``; under ``granularity="head"`` every query head takes its KV head's choice."""
    full_share = kv_density_at(length, span_at(0.0, 1.0, length, template.min_span), template.sink)
    stream_share = kv_density_at(length, span_at(window, 0.0, length, template.min_span), template.sink)
    heads = gates.size
    room = (kv_density * heads - stream_share * heads) / max(full_share - stream_share, 1e-9)
    count = int(np.clip(np.floor(room + 1e-9), 0, heads))
    order = np.argsort(-gates.ravel(), kind="stable")[:count]
    full = np.zeros(heads, dtype=bool)
    full[order] = True
    full = full.reshape(gates.shape)  # (L, Hkv)
    if template.granularity == "head":
        full = full.repeat(len(template.alphas[0]) // gates.shape[1], axis=1)  # (L, Hq)
    plan = copy.deepcopy(template)
    plan.alphas = np.where(full, 0.0, float(window)).tolist()
    plan.betas = np.where(full, 1.0, 0.0).tolist()
    plan.density_budget = {length: float(kv_density)}
    plan.solver = {**template.solver, "name": "gates", "full_heads": int(full.sum()), "streaming_window": window}
    plan.expected = {length: {"kv_density": plan_kv_density(plan, length),
                              "attention_density": plan_attention_density(plan, length), "influence_loss": None}}
    return plan
