"""The profiling loss: mean cross-entropy of the model's own response tokens, plus the answer's.

It is the shared response-masked loss of :mod:`pipeline.evaluation.response_loss` (NLL over the response tokens
``T``, predicted from the positions ``t - 1``):

    loss = mean over T of NLL  +  answer_weight * mean over A of NLL,

where ``A`` are the response tokens calibration marked ``ANSWER``: those that state the gold answer and the one
just before them, where the model commits to stating it. A retrieval answer turns on that one commit token (README,
"Where a lost passkey goes wrong"); in a mean over a 12-token sentence its gradient is a twelfth of the whole, so
the heads that fetch the answer look no more important than the ones that shape the sentence. ``answer_weight=0``,
or a sample without answer tokens (a wrong response), leaves the plain mean. The ``N x vocab`` logit matrix is
never built: the output head runs on chunks of the response positions only.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from pipeline.evaluation.response_loss import ANSWER, loss_targets, sequence_nll

__all__ = ["frozen_parameters", "loss_targets", "response_loss"]


def response_loss(model, input_ids: torch.Tensor, loss_mask: torch.Tensor, *, grad_inputs: bool = False,
                  answer_weight: float = 0.0):
    """The profiling loss (module docstring) for one sequence ``input_ids`` ``[n]``, a scalar tensor.

    ``grad_inputs=True`` feeds the embeddings as a leaf that requires grad, so gradients reach the attention
    layers even when every parameter is frozen. Raises ``ValueError`` when no token enters the loss.
    """
    targets = loss_targets(loss_mask)  # (T,)
    answer = targets[loss_mask[targets] == ANSWER]  # (|A|,)
    if answer_weight == 0 or answer.numel() == 0:  # the plain mean (sequence_nll raises when T is empty)
        total, count = sequence_nll(model, input_ids, loss_mask, grad_inputs=grad_inputs)
        return total / count
    weights = torch.zeros(loss_mask.shape, dtype=torch.float64)  # (n,)
    weights[targets] = 1.0 / targets.numel()
    weights[answer] += answer_weight / answer.numel()
    total, _ = sequence_nll(model, input_ids, loss_mask, grad_inputs=grad_inputs, token_weights=weights)
    return total


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
