"""Response-masked perplexity against a token-by-token oracle."""

import math

import torch

from pipeline.evaluation.perplexity import perplexity, response_nll
from tests.conftest import make_tiny_model


def test_response_nll_matches_prefix_by_prefix_log_probs():
    model = make_tiny_model("llama", vocab=64, dtype=torch.float64)
    torch.manual_seed(1)
    n, pad = 24, 5
    input_ids = torch.randint(0, 64, (2, n + pad))
    loss_mask = torch.zeros_like(input_ids, dtype=torch.uint8)
    loss_mask[0, 15:20] = 1
    loss_mask[1, 10:24] = 1
    lengths = torch.tensor([20, 24])
    oracle_total, oracle_count = 0.0, 0
    with torch.no_grad():
        for row in range(2):
            for t in range(int(lengths[row])):
                if loss_mask[row, t]:
                    logits = model(input_ids[row, :t].unsqueeze(0)).logits[0, -1]
                    oracle_total -= float(torch.log_softmax(logits, -1)[input_ids[row, t]])
                    oracle_count += 1
    total, count = response_nll(model, input_ids, loss_mask, lengths)
    assert count == oracle_count == 5 + 14
    assert math.isclose(total, oracle_total, rel_tol=1e-9)
    assert math.isclose(perplexity(model, input_ids, loss_mask, lengths), math.exp(oracle_total / oracle_count), rel_tol=1e-9)
