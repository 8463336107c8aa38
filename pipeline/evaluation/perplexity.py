"""Response-masked perplexity: the model's loss on the answer tokens of long-context samples."""

from __future__ import annotations

import math

import torch

from pipeline.evaluation.response_loss import CHUNK_SIZE, loss_targets, sequence_nll


@torch.no_grad()
def response_nll(model, input_ids: torch.Tensor, loss_mask: torch.Tensor, lengths: torch.Tensor, *,
                 chunk_size: int = CHUNK_SIZE) -> tuple[float, int]:
    """Summed negative log-likelihood of the masked tokens and their count, one sample at a time.

    input_ids, loss_mask: ``[S, N]`` (tail-padded); lengths: ``[S]`` real tokens. The token at ``t`` counts when
    ``loss_mask[t] == 1`` and is predicted from position ``t - 1``. Each sample runs at its real length, so a
    sparse plan sees ``N = lengths[s]``; the output head runs on at most ``chunk_size`` response positions at a
    time, never on all ``N``.
    """
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for row in range(input_ids.shape[0]):
        n = int(lengths[row])
        if loss_targets(loss_mask[row, :n]).numel() == 0:
            continue
        tokens = input_ids[row, :n].to(device)  # (n,)
        nll, scored = sequence_nll(model, tokens, loss_mask[row, :n].to(device), chunk_size=chunk_size)
        total += float(nll)
        count += scored
    return total, count


def perplexity(model, input_ids: torch.Tensor, loss_mask: torch.Tensor, lengths: torch.Tensor) -> float:
    """``exp`` of the mean response-token NLL over all samples."""
    total, count = response_nll(model, input_ids, loss_mask, lengths)
    if count == 0:
        raise ValueError("no response tokens to score")
    return math.exp(total / count)
