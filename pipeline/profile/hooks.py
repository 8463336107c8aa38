"""Model-agnostic hooks: run any HF decoder through a custom ``AttentionInterface`` function.

Two pieces:

- :func:`attention_implementation` registers a function under a name and switches the model to it for the
  duration of a ``with`` block (no per-model patches; every model that dispatches through
  ``ALL_ATTENTION_FUNCTIONS`` works).
- :func:`capture_attention` uses it to run one forward+backward pass with SDPA attention while stashing, per
  layer, the post-RoPE ``q`` and un-repeated ``k``/``v`` plus, from a hook on the attention output, the output
  gradient ``dO`` and FlashAttention's row term ``D_i = dO_i . O_i``. These are everything needed to recompute
  the attention probabilities ``A`` and their gradients ``G_ij = dO_i . v_j`` blockwise afterwards.

Attention-mask functions are not registered for the custom names, so transformers passes ``attention_mask=None``
and the functions here apply the plain causal mask themselves: inputs must be single, unpadded sequences.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from pipeline.profile.loss import frozen_parameters, response_loss

CAPTURE_NAME = "moa_profile"


@contextlib.contextmanager
def attention_implementation(model, name: str, fn: Callable) -> Iterator[None]:
    """Register ``fn`` as attention implementation ``name`` and switch ``model`` to it inside the block."""
    AttentionInterface.register(name, fn)
    previous = model.config._attn_implementation
    model.set_attn_implementation(name)
    try:
        yield
    finally:
        model.set_attn_implementation(previous)


def check_supported(query: torch.Tensor, key: torch.Tensor, attention_mask, kwargs: dict) -> None:
    """Reject what the causal-only recomputation cannot reproduce: batches, padding masks, windows, softcap."""
    n = query.shape[2]
    if query.shape[0] != 1:
        raise ValueError(f"attention profiling takes one sequence at a time, got batch {query.shape[0]}")
    if attention_mask is not None:
        raise ValueError("attention profiling expects attention_mask=None (one unpadded causal sequence)")
    if key.shape[2] != n:
        raise ValueError("attention profiling needs as many keys as queries (no KV cache)")
    window = kwargs.get("sliding_window")
    if window is not None and window < n:
        raise ValueError(f"sliding-window attention (window {window} < {n} tokens) is not supported by profiling")
    if kwargs.get("softcap") is not None:
        raise ValueError("attention logit soft-capping is not supported by profiling")


@dataclass
class LayerStash:
    """What one attention layer leaves behind for the blockwise recomputation (batch dimension dropped)."""

    q: torch.Tensor
    """(Hq, n, D) queries after RoPE/normalisation, model dtype."""
    k: torch.Tensor
    """(Hkv, n, D) keys, not repeated over the query groups."""
    v: torch.Tensor
    """(Hkv, n, D) values."""
    scale: float
    grad_out: torch.Tensor | None = None
    """(Hq, n, D) dL/dO in at least float32, set by the backward hook."""
    row_dot: torch.Tensor | None = None
    """(Hq, n) D_i = dO_i . O_i = sum_n A_in G_in in at least float32, set by the backward hook."""


class _Capture:
    """The attention function registered as ``moa_profile``; collects one :class:`LayerStash` per call."""

    def __init__(self):
        self.stashes: list[LayerStash] = []

    def __call__(self, module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        check_supported(query, key, attention_mask, kwargs)
        out, _ = sdpa_attention_forward(
            module, query, key, value, None, dropout=dropout, scaling=scaling, is_causal=True
        )  # (1, n, Hq, D)
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        stash = LayerStash(q=query.detach()[0], k=key.detach()[0], v=value.detach()[0], scale=float(scale))
        self.stashes.append(stash)
        if out.requires_grad:
            saved_out = out.detach()

            def on_grad(grad: torch.Tensor) -> None:
                wide = torch.promote_types(grad.dtype, torch.float32)
                grad_wide = grad[0].to(wide)  # (n, Hq, D)
                stash.row_dot = (grad_wide * saved_out[0].to(wide)).sum(-1).T.contiguous()  # (Hq, n)
                stash.grad_out = grad_wide.transpose(0, 1).contiguous()  # (Hq, n, D)

            out.register_hook(on_grad)
        return out, None


def capture_attention(model, input_ids: torch.Tensor, loss_mask: torch.Tensor,
                      answer_weight: float = 0.0) -> list[LayerStash]:
    """One forward+backward pass of :func:`response_loss` (with ``answer_weight``); returns one stash per attention
    layer, in call order.

    Parameters are frozen for the pass, so backward computes activation gradients only. A layer whose output
    does not influence the loss gets zero ``dO``.
    """
    capture = _Capture()
    with attention_implementation(model, CAPTURE_NAME, capture), frozen_parameters(model):
        loss = response_loss(model, input_ids, loss_mask, grad_inputs=True, answer_weight=answer_weight)
        loss.backward()
    for stash in capture.stashes:
        if stash.grad_out is None:
            wide = torch.promote_types(stash.q.dtype, torch.float32)
            stash.grad_out = torch.zeros(stash.q.shape, dtype=wide, device=stash.q.device)
            stash.row_dot = torch.zeros(stash.q.shape[:2], dtype=wide, device=stash.q.device)
    return capture.stashes
