"""The profiling loss: mean cross-entropy of the model's own response tokens.

``loss_mask[t] == 1`` marks token ``t`` as a response token. Under the causal-LM shift, token ``t`` is predicted
from the logits at position ``t - 1``, so the loss is

    L = mean over T of CE(logits[t - 1], input_ids[t]),   T = {t >= 1 : loss_mask[t] == 1}.

Position 0 can never be predicted and is left out even if marked. Logits are only computed at the ``t - 1``
positions (``logits_to_keep``), which keeps the ``N x vocab`` logit matrix out of memory.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F


def loss_targets(loss_mask: torch.Tensor) -> torch.Tensor:
    """Indices ``t >= 1`` of the response tokens that enter the loss, int64 ``[T]``."""
    mask = loss_mask.to(torch.bool).clone()
    mask[:1] = False
    return mask.nonzero().flatten()


def response_loss(model, input_ids: torch.Tensor, loss_mask: torch.Tensor, *, grad_inputs: bool = False):
    """Mean response-token cross-entropy for one sequence ``input_ids`` ``[n]`` (see the module docstring).

    ``grad_inputs=True`` feeds the embeddings as a leaf that requires grad, so gradients reach the attention
    layers even when every parameter is frozen. Raises ``ValueError`` when no token enters the loss.
    """
    targets = loss_targets(loss_mask).to(input_ids.device)
    if targets.numel() == 0:
        raise ValueError("the loss mask selects no response token after position 0")
    ids = input_ids.view(1, -1)
    kwargs = dict(logits_to_keep=targets - 1, use_cache=False)
    if grad_inputs:
        embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
        logits = model(inputs_embeds=embeds, **kwargs).logits[0]  # (T, V)
    else:
        logits = model(input_ids=ids, **kwargs).logits[0]  # (T, V)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return F.cross_entropy(logits, input_ids[targets])


@contextlib.contextmanager
def frozen_parameters(model) -> Iterator[None]:
    """Turn off ``requires_grad`` on every parameter inside the block, restoring the flags afterwards."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
