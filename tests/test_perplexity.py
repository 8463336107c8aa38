"""Response-masked perplexity and the shared response loss against full-logits oracles."""

import math

import pytest
import torch
import torch.nn.functional as F

from pipeline.evaluation.perplexity import perplexity, response_nll
from pipeline.evaluation.response_loss import sequence_nll
from pipeline.plan import Plan
from pipeline.profile.loss import response_loss
from pipeline.sparse_runtime import apply_plan, remove_plan
from tests.conftest import make_tiny_model

VOCAB = 64


def ragged_batch(seed: int = 1):
    """Two tail-padded samples of 20 and 24 real tokens, response spans inside each, junk in the padding."""
    torch.manual_seed(seed)
    n, pad = 24, 5
    input_ids = torch.randint(0, VOCAB, (2, n + pad))
    loss_mask = torch.zeros_like(input_ids, dtype=torch.uint8)
    loss_mask[0, 9:20] = 1
    loss_mask[0, 20:] = 1  # marked padding must not count
    loss_mask[1, 3:24] = 1
    return input_ids, loss_mask, torch.tensor([20, 24])


def full_logits_nll(model, input_ids, loss_mask, lengths) -> tuple[float, int]:
    """Oracle: one padded batch forward with an attention mask, all ``n x V`` logits, textbook shift."""
    real = torch.arange(input_ids.shape[1])[None, :] < lengths[:, None]  # (S, N)
    with torch.no_grad():
        logits = model(input_ids, attention_mask=real.long()).logits  # (S, N, V)
    logp = torch.log_softmax(logits[:, :-1].double(), -1)  # (S, N-1, V)
    picked = logp.gather(-1, input_ids[:, 1:, None])[..., 0]  # (S, N-1)
    counted = loss_mask[:, 1:].bool() & real[:, 1:]
    return float(-picked[counted].sum()), int(counted.sum())


def test_response_nll_matches_prefix_by_prefix_log_probs():
    model = make_tiny_model("llama", vocab=VOCAB, dtype=torch.float64)
    input_ids, loss_mask, lengths = ragged_batch()
    loss_mask[:] = 0
    loss_mask[0, 15:20] = 1
    loss_mask[1, 10:24] = 1
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


@pytest.mark.parametrize("chunk_size", [1, 4, 7, 1024])
def test_chunked_response_nll_equals_full_logits_cross_entropy(chunk_size):
    model = make_tiny_model("qwen2", vocab=VOCAB, dtype=torch.float64)
    input_ids, loss_mask, lengths = ragged_batch(seed=3)
    want_total, want_count = full_logits_nll(model, input_ids, loss_mask, lengths)
    total, count = response_nll(model, input_ids, loss_mask, lengths, chunk_size=chunk_size)
    assert count == want_count == 11 + 21
    assert math.isclose(total, want_total, rel_tol=1e-9)


def test_response_nll_runs_under_an_applied_plan():
    """The backbone-then-head path keeps the model's sparse attention: equal to full logits under the plan."""
    model = make_tiny_model("llama", vocab=VOCAB, dtype=torch.float64)
    input_ids, loss_mask, lengths = ragged_batch(seed=5)
    dense_total, _ = response_nll(model, input_ids, loss_mask, lengths)
    apply_plan(model, Plan.uniform(model, 0.0, sink=2, min_span=4), backend="reference")
    try:
        want = sum(full_logits_nll(model, input_ids[row:row + 1, :n], loss_mask[row:row + 1, :n], lengths[row:row + 1])[0]
                   for row, n in enumerate(lengths.tolist()))
        total, _ = response_nll(model, input_ids, loss_mask, lengths, chunk_size=5)
    finally:
        remove_plan(model)
    assert math.isclose(total, want, rel_tol=1e-9)
    assert not math.isclose(total, dense_total, rel_tol=1e-3)


def test_output_head_never_sees_all_positions():
    """The ``n x V`` logits are never built: the head runs on chunks of response positions only."""
    model = make_tiny_model("llama", vocab=VOCAB)
    input_ids, loss_mask, lengths = ragged_batch()
    rows = []
    handle = model.get_output_embeddings().register_forward_pre_hook(
        lambda _module, args: rows.append(args[0].reshape(-1, args[0].shape[-1]).shape[0]))
    try:
        _, count = response_nll(model, input_ids, loss_mask, lengths, chunk_size=4)
    finally:
        handle.remove()
    assert rows, "the output head was never called"
    assert max(rows) <= 4
    assert sum(rows) == count  # each response position once, nothing else


def test_profile_loss_gradient_equals_full_logits_gradient():
    """The profiler's mean loss (chunked and checkpointed under autograd) has the full-logits gradient."""
    model = make_tiny_model("mistral", vocab=VOCAB, dtype=torch.float64)
    input_ids, loss_mask, _ = ragged_batch(seed=4)
    ids, mask = input_ids[1, :24], loss_mask[1, :24]
    embeds = model.get_input_embeddings()(ids[None]).detach()  # (1, n, D)

    oracle_in = embeds.clone().requires_grad_(True)
    logits = model(inputs_embeds=oracle_in).logits[0]  # (n, V)
    labels = torch.where(mask.bool(), ids, torch.full_like(ids, -100))
    want = F.cross_entropy(logits[:-1], labels[1:], ignore_index=-100)
    want.backward()

    got_in = embeds.clone().requires_grad_(True)
    original = model.get_input_embeddings().forward
    model.get_input_embeddings().forward = lambda _ids: got_in  # route the shared loss through our leaf
    try:
        got, count = sequence_nll(model, ids, mask, chunk_size=3)
        (got / count).backward()
    finally:
        model.get_input_embeddings().forward = original
    assert torch.isclose(got / count, want, rtol=1e-12)
    assert torch.allclose(got_in.grad, oracle_in.grad, rtol=1e-9, atol=1e-12)
    assert torch.isclose(response_loss(model, ids, mask), want, rtol=1e-12)


def test_logit_post_processing_is_refused():
    model = make_tiny_model("llama", vocab=VOCAB)
    model.config.final_logit_softcapping = 30.0
    input_ids, loss_mask, lengths = ragged_batch()
    with pytest.raises(ValueError, match="post-processes its logits"):
        response_nll(model, input_ids, loss_mask, lengths)
