"""The profiling loss: mean cross-entropy of the model's own response tokens.

It is the shared response-masked loss of :mod:`pipeline.evaluation.response_loss` (summed NLL over the response
tokens ``T``, predicted from the positions ``t - 1``), divided by ``|T|``. The ``N x vocab`` logit matrix is never
built: the output head runs on chunks of the response positions only.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from pipeline.evaluation.response_loss import loss_targets, sequence_nll

__all__ = ["frozen_parameters", "loss_targets", "response_loss"]


def response_loss(model, input_ids: torch.Tensor, loss_mask: torch.Tensor, *, grad_inputs: bool = False):
    """Mean response-token cross-entropy for one sequence ``input_ids`` ``[n]``, a scalar tensor.

    ``grad_inputs=True`` feeds the embeddings as a leaf that requires grad, so gradients reach the attention
    layers even when every parameter is frozen. Raises ``ValueError`` when no token enters the loss.
    """
    total, count = sequence_nll(model, input_ids, loss_mask, grad_inputs=grad_inputs)
    return total / count


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
