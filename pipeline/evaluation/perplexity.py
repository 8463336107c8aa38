"""Response-masked perplexity: the model's loss on the answer tokens of long-context samples."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


@torch.no_grad()
def response_nll(model, input_ids: torch.Tensor, loss_mask: torch.Tensor, lengths: torch.Tensor) -> tuple[float, int]:
    """Summed negative log-likelihood of the masked tokens and their count, one sample at a time.

    input_ids, loss_mask: ``[S, N]`` (tail-padded); lengths: ``[S]`` real tokens. The token at ``t`` counts when
    ``loss_mask[t] == 1`` and is predicted from position ``t - 1``. Each sample runs at its real length, so a
    sparse plan sees ``N = lengths[s]``.
    """
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for row in range(input_ids.shape[0]):
        n = int(lengths[row])
        tokens = input_ids[row, :n].unsqueeze(0).to(device)  # (1, n)
        targets_mask = loss_mask[row, 1:n].bool().to(device)  # (n-1,)
        if not targets_mask.any():
            continue
        logits = model(tokens, use_cache=False).logits[0, :-1]  # (n-1, V)
        scored = logits[targets_mask].to(torch.float64)  # (R, V): only the response rows, in full precision
        nll = F.cross_entropy(scored, tokens[0, 1:][targets_mask], reduction="sum")
        total += float(nll)
        count += int(targets_mask.sum())
    return total, count


def perplexity(model, input_ids: torch.Tensor, loss_mask: torch.Tensor, lengths: torch.Tensor) -> float:
    """``exp`` of the mean response-token NLL over all samples."""
    total, count = response_nll(model, input_ids, loss_mask, lengths)
    if count == 0:
        raise ValueError("no response tokens to score")
    return math.exp(total / count)
