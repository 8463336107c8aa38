"""The response-masked loss, shared by profiling (its gradient) and evaluation (perplexity).

``loss_mask[t] > 0`` marks token ``t`` as a response token (``RESPONSE``; calibration marks the tokens that state
the answer, and the one before them, ``ANSWER``: see :func:`pipeline.calibration.builder.answer_positions`). Under
the causal-LM shift, token ``t`` is predicted from the hidden state at position ``t - 1``, so the summed negative
log-likelihood is

    NLL = sum over T of w[t] * CE(lm_head(h[t - 1]), input_ids[t]),   T = {t >= 1 : loss_mask[t] > 0},

with every weight ``w[t] = 1`` unless the caller gives per-position weights.

Position 0 can never be predicted and is left out even if marked. The ``n x vocab`` logit matrix is never built:
the backbone returns the last hidden states ``[n, D]``, only the ``|T|`` rows at ``t - 1`` are kept, and the
output head runs on at most ``chunk_size`` of them at a time. Under autograd each chunk is checkpointed, so the
backward pass also holds one chunk's logits at a time.

The logits are ``model.get_output_embeddings()`` applied to ``model.base_model``'s last hidden state, which is
how every Llama, Mistral and Qwen2/3 model computes them; a model that rescales or soft-caps its logits after
the head is refused.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

CHUNK_SIZE = 1024
RESPONSE, ANSWER = 1, 2
"""``loss_mask`` values: a response token, and a response token that states the answer (or commits to it)."""
_LOGIT_POSTPROCESSING = ("final_logit_softcapping", "logit_scale", "logits_scaling")


def loss_targets(loss_mask: torch.Tensor) -> torch.Tensor:
    """Indices ``t >= 1`` of the response tokens that enter the loss, int64 ``[T]``."""
    mask = loss_mask.to(torch.bool).clone()
    mask[:1] = False
    return mask.nonzero().flatten()


def _check_plain_head(model) -> None:
    config = model.config
    found = [key for key in _LOGIT_POSTPROCESSING if getattr(config, key, None) not in (None, 1, 1.0)]
    if found:
        raise ValueError(f"{type(model).__name__} post-processes its logits ({', '.join(found)}); "
                         f"the response loss only supports a plain output head")


def _chunk_nll(head: torch.nn.Module, hidden: torch.Tensor, labels: torch.Tensor,
               weights: torch.Tensor | None = None) -> torch.Tensor:
    """Summed cross-entropy of one chunk, each token's weighted by ``weights`` ``[C]`` if given: hidden ``[C, D]``,
    labels ``[C]``."""
    logits = head(hidden)  # (C, V)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    if weights is None:
        return F.cross_entropy(logits, labels, reduction="sum")
    return (F.cross_entropy(logits, labels, reduction="none") * weights.to(logits.dtype)).sum()


def sequence_nll(model, input_ids: torch.Tensor, loss_mask: torch.Tensor, *, grad_inputs: bool = False,
                 chunk_size: int = CHUNK_SIZE, token_weights: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
    """Summed response-token NLL of one sequence and the number of tokens in it (see the module docstring).

    input_ids, loss_mask: ``[n]``; token_weights: ``[n]`` or None (every weight 1), read at the response positions
    only. Returns a scalar tensor (differentiable when autograd is on) and ``|T|``.
    ``grad_inputs=True`` feeds the embeddings as a leaf that requires grad, so gradients reach the attention
    layers even when every parameter is frozen. Raises ``ValueError`` when no token enters the loss.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    _check_plain_head(model)
    targets = loss_targets(loss_mask).to(input_ids.device)  # (T,)
    if targets.numel() == 0:
        raise ValueError("the loss mask selects no response token after position 0")
    ids = input_ids.view(1, -1)  # (1, n)
    backbone, head = model.base_model, model.get_output_embeddings()
    if grad_inputs:
        embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)  # (1, n, D)
        hidden = backbone(inputs_embeds=embeds, use_cache=False).last_hidden_state[0]  # (n, D)
    else:
        hidden = backbone(input_ids=ids, use_cache=False).last_hidden_state[0]  # (n, D)
    hidden = hidden[targets - 1]  # (T, D): only the positions that predict a response token
    labels = input_ids[targets]  # (T,)
    weights = None if token_weights is None else token_weights.to(input_ids.device)[targets]  # (T,)
    total = None
    for start in range(0, targets.numel(), chunk_size):
        h, y = hidden[start:start + chunk_size], labels[start:start + chunk_size]  # (C, D), (C,)
        w = None if weights is None else weights[start:start + chunk_size]  # (C,)
        if torch.is_grad_enabled() and h.requires_grad:
            part = checkpoint(_chunk_nll, head, h, y, w, use_reentrant=False)
        else:
            part = _chunk_nll(head, h, y, w)
        total = part if total is None else total + part
    return total, int(targets.numel())
