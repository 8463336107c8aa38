"""Attention influence: blockwise vs the full-matrix oracle, vs true masking, GQA grouping, loss definition."""

import math

import pytest
import torch
from conftest import TINY_ARCHS, make_tiny_model
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import spearmanr

from pipeline.profile import (
    attention_influence,
    attention_influences,
    entry_influence,
    naive_attention_influence,
    naive_token_influence,
    token_influence,
)
from pipeline.profile.hooks import attention_implementation
from pipeline.profile.influence import group_heads
from pipeline.profile.loss import response_loss

_MODELS = {}


def tiny64(arch: str = "llama", heads: int = 4, kv_heads: int = 2):
    """Cached float64 tiny models (building one takes a noticeable fraction of a second)."""
    key = (arch, heads, kv_heads)
    if key not in _MODELS:
        _MODELS[key] = make_tiny_model(arch, heads=heads, kv_heads=kv_heads, dtype=torch.float64)
    return _MODELS[key]


def sample(n: int, seed: int = 0, response_from: float = 0.6):
    """Random token ids ``[n]`` and a loss mask marking the last ``1 - response_from`` of them."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 128, (n,), generator=gen)
    mask = torch.zeros(n, dtype=torch.uint8)
    mask[min(n - 1, max(1, int(response_from * n))):] = 1
    return ids, mask


def close(got: torch.Tensor, want: torch.Tensor, rtol: float = 1e-6) -> bool:
    """Max abs difference within ``rtol`` of the oracle's largest magnitude (exact when the oracle is all 0)."""
    return bool((got - want).abs().max() <= rtol * want.abs().max())


@pytest.mark.parametrize("arch", TINY_ARCHS)
@settings(max_examples=4, deadline=None)
@given(n=st.integers(2, 90), block=st.sampled_from([5, 16, 64]), granularity=st.sampled_from(["kv_head", "head"]))
def test_blockwise_matches_full_matrix(arch, n, block, granularity):
    model = tiny64(arch)
    ids, mask = sample(n, seed=n)
    got = attention_influence(model, ids, mask, block, granularity, dtype=torch.float64)
    want = naive_attention_influence(model, ids, mask, block, granularity)
    nb = math.ceil(n / block)
    heads = 2 if granularity == "kv_head" else 4
    assert got.shape == want.shape == (2, heads, nb, nb)
    assert close(got, want)
    assert torch.equal(got.triu(1), torch.zeros_like(got))  # no influence from future key blocks


@pytest.mark.parametrize("granularity", ["kv_head", "head"])
def test_net_block_sums_match_signed_full_matrix(granularity):
    """The net influence is the signed sum of the full-matrix oracle's E over each block (rows and columns), and
    the absolute influence from the same pass is still the contract's sum of |E|."""
    model = tiny64()
    n, block = 45, 16
    ids, mask = sample(n, seed=3)
    absolute, net = attention_influences(model, ids, mask, block, granularity, dtype=torch.float64)
    token, _ = naive_token_influence(model, ids, mask)  # (L, Hq, n, n), signed
    nb = math.ceil(n / block)
    padded = torch.nn.functional.pad(token, (0, nb * block - n, 0, nb * block - n))
    blocks = padded.unflatten(-1, (nb, block)).unflatten(-3, (nb, block)).sum((-3, -1))  # (L, Hq, nb, nb)
    want = group_heads(blocks, 2, granularity)
    assert (want < 0).any()  # the oracle has blocks of net negative influence: signed and absolute sums differ
    assert close(net, want)
    assert close(absolute, naive_attention_influence(model, ids, mask, block, granularity))


def test_token_level_matches_full_matrix_and_row_zero_is_zero():
    model = tiny64()
    ids, mask = sample(37)
    got = token_influence(model, ids, mask, dtype=torch.float64)  # (L, Hq, n, n)
    want, _ = naive_token_influence(model, ids, mask)
    assert close(got, want)
    assert torch.equal(got[..., 0, 0], torch.zeros_like(got[..., 0, 0]))  # A_00 == 1: defined as 0
    assert torch.equal(got.triu(1), torch.zeros_like(got))


@settings(max_examples=20, deadline=None)
@given(m=st.integers(1, 12), seed=st.integers(0, 10_000), sharpness=st.floats(0.1, 30.0))
def test_entry_influence_is_exact_for_a_linear_loss(m, seed, sharpness):
    """For L = A . G the first-order change is the exact one; brute-force every mask-and-renormalise."""
    gen = torch.Generator().manual_seed(seed)
    probs = torch.softmax(sharpness * torch.randn(m, generator=gen, dtype=torch.float64), 0)
    grads = torch.randn(m, generator=gen, dtype=torch.float64)
    got = entry_influence(probs.view(1, m), grads.view(1, m), (probs * grads).sum().view(1)).view(m)
    for j in range(m):
        if probs[j] == 1.0:
            assert got[j] == 0.0
            continue
        masked = probs.clone()
        masked[j] = 0.0
        want = (masked / masked.sum() * grads).sum() - (probs * grads).sum()
        # D - G_j cancels as A_j -> 1; the rounding bound grows like 1 / (1 - A_j).
        bound = 64 * torch.finfo(torch.float64).eps * grads.abs().max() / (1 - probs[j])
        assert abs(got[j] - want) <= bound


class MaskOneEntry:
    """Eager causal attention that zeroes A[i, j] of one layer/head and renormalises that row."""

    def __init__(self, layer: int, head: int, i: int, j: int):
        self.layer, self.head, self.i, self.j = layer, head, i, j

    def __call__(self, module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        n = query.shape[2]
        group = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(group, 1), value.repeat_interleave(group, 1)
        scores = (query @ key.transpose(-1, -2) * scaling).masked_fill(
            torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
        probs = scores.softmax(-1)
        if module.layer_idx == self.layer:
            keep = torch.ones_like(probs)
            keep[0, self.head, self.i, self.j] = 0.0
            probs = probs * keep
            probs = probs / probs.sum(-1, keepdim=True)
        return (probs @ value).transpose(1, 2).contiguous(), None


def test_first_order_ranks_true_loss_changes():
    model = tiny64()
    n = 48
    ids, mask = sample(n, seed=3, response_from=2 / 3)
    predicted = token_influence(model, ids, mask, dtype=torch.float64)
    with torch.no_grad():
        base = response_loss(model, ids, mask).item()
    gen = torch.Generator().manual_seed(7)
    pred, true = [], []
    for _ in range(40):
        layer, head = int(torch.randint(0, 2, (1,), generator=gen)), int(torch.randint(0, 4, (1,), generator=gen))
        i = int(torch.randint(1, n, (1,), generator=gen))
        j = int(torch.randint(0, i + 1, (1,), generator=gen))
        with attention_implementation(model, "test_mask_one", MaskOneEntry(layer, head, i, j)), torch.no_grad():
            true.append(response_loss(model, ids, mask).item() - base)
        pred.append(float(predicted[layer, head, i, j]))
    assert spearmanr(pred, true).statistic > 0.9


@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (4, 1), (4, 4)])
def test_kv_head_granularity_sums_query_heads(heads, kv_heads):
    model = tiny64("qwen2", heads, kv_heads)
    ids, mask = sample(50, seed=1)
    per_head = naive_attention_influence(model, ids, mask, 16, "head")  # oracle: per query head
    per_kv = attention_influence(model, ids, mask, 16, "kv_head", dtype=torch.float64)
    group = heads // kv_heads
    want = torch.stack([per_head[:, g * group:(g + 1) * group].sum(1) for g in range(kv_heads)], dim=1)
    assert per_kv.shape == (2, kv_heads, 4, 4)
    assert close(per_kv, want)


@pytest.mark.parametrize("answer_weight", [0.5, 3.0])
def test_answer_tokens_add_their_own_mean_to_the_response_mean(answer_weight):
    """Oracle: per-token cross-entropy from full logits, mean over the response plus the weighted answer mean."""
    model = tiny64()
    ids, mask = sample(30, seed=6)
    mask[[22, 23, 24]] = 2  # ANSWER: still response tokens
    with torch.no_grad():
        logits = model(input_ids=ids.view(1, -1)).logits[0]  # (n, V)
        nll = torch.nn.functional.cross_entropy(logits[:-1], ids[1:], reduction="none")  # (n - 1,): predicts t >= 1
        response, answer = nll[mask[1:] > 0], nll[mask[1:] == 2]
        want = response.mean() + answer_weight * answer.mean()
        got = response_loss(model, ids, mask, answer_weight=answer_weight)
        plain = response_loss(model, ids, mask)
    assert torch.isclose(got, want, rtol=1e-12)
    assert torch.isclose(plain, response.mean(), rtol=1e-12)  # weight 0: the plain mean over every response token
    assert not torch.isclose(got, plain)


def test_a_response_without_answer_tokens_keeps_the_plain_mean():
    model = tiny64()
    ids, mask = sample(30, seed=6)
    with torch.no_grad():
        assert torch.equal(response_loss(model, ids, mask, answer_weight=2.0), response_loss(model, ids, mask))


def test_answer_weight_reaches_the_influence():
    """The profile's influence is the loss's: answer weighting changes it, and weight 0 is the plain profile."""
    model = tiny64()
    ids, mask = sample(48, seed=3, response_from=2 / 3)
    answered = mask.clone()
    answered[40:43] = 2
    plain = attention_influence(model, ids, mask, 16, dtype=torch.float64)
    assert close(attention_influence(model, ids, answered, 16, dtype=torch.float64, answer_weight=0.0), plain)
    weighted = attention_influence(model, ids, answered, 16, dtype=torch.float64, answer_weight=2.0)
    assert not close(weighted, plain, rtol=1e-3)


def test_response_loss_is_the_shifted_label_loss():
    """Against the textbook shift on full logits: logits[:-1] predict labels[1:], -100 outside the response."""
    model = tiny64()
    ids, mask = sample(30, seed=5)
    mask[0] = 1  # position 0 cannot be predicted; it must not count
    labels = torch.where(mask.bool(), ids, torch.full_like(ids, -100))
    with torch.no_grad():
        logits = model(input_ids=ids.view(1, -1)).logits[0]  # (n, V)
        want = torch.nn.functional.cross_entropy(logits[:-1], labels[1:], ignore_index=-100)
        got = response_loss(model, ids, mask)
    assert torch.isclose(got, want, rtol=1e-12)


def test_capture_restores_the_model():
    model = make_tiny_model("mistral", dtype=torch.float64)
    ids, mask = sample(20)
    before = model.config._attn_implementation
    attention_influence(model, ids, mask, 8)
    assert model.config._attn_implementation == before
    assert all(p.requires_grad and p.grad is None for p in model.parameters())


def test_empty_loss_mask_is_rejected():
    model = tiny64()
    ids, mask = sample(20)
    mask.zero_()
    mask[0] = 1  # only position 0: nothing can be predicted
    with pytest.raises(ValueError, match="no response token"):
        attention_influence(model, ids, mask)


def test_sliding_window_shorter_than_the_sequence_is_rejected():
    model = make_tiny_model("mistral", dtype=torch.float64)
    model.config.sliding_window = 8
    ids, mask = sample(20)
    with pytest.raises(ValueError, match="sliding-window"):
        attention_influence(model, ids, mask)
