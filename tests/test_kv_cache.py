"""Per-head packed KV cache: which tokens it holds, decode attention over it, and its memory, against brute force."""

import pytest
import torch
from conftest import make_tiny_model
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AttentionInterface

from kernels.decode import packed_decode_attention
from kernels.kv_cache import PerHeadLayer
from kernels.pattern import token_mask
from kernels.reference import moa_attention_reference
from pipeline.plan import Plan, plan_kv_density, spans_for
from pipeline.sparse_runtime import apply_plan, cache_argument, make_cache


def position_states(positions, hkv: int) -> torch.Tensor:
    """Key states ``[1, Hkv, n, 1]`` whose value is the token position, so slots can be read back as positions."""
    return torch.tensor(positions, dtype=torch.float32).view(1, 1, -1, 1).expand(1, hkv, -1, 1).contiguous()


def cached_positions(layer: PerHeadLayer, head: int) -> list[int]:
    lo = layer.offsets[head]
    return sorted(int(x) for x in layer.keys[0, lo:lo + layer.valid_lengths()[head], 0])


def prefilled_layer(query_spans, kv_spans, sink: int, prompt: int, total: int) -> PerHeadLayer:
    """A one-sequence layer (2 KV heads, head size 1) holding the positions ``0 .. prompt - 1`` as its states."""
    layer = PerHeadLayer(query_spans, kv_spans, sink, total, batch_size=1, head_dim=1, dtype=torch.float32,
                         device="cpu")
    layer.update(position_states(range(prompt), 2), position_states(range(prompt), 2))
    return layer


def kept_keys(i: int, span: int, sink: int) -> list[int]:
    """Keys the token-level mask keeps for query ``i``: row ``i`` of the mask."""
    return token_mask(i + 1, span, sink)[i].nonzero().flatten().tolist()


@settings(max_examples=30, deadline=None)
@given(sink=st.integers(0, 6), spans=st.lists(st.integers(1, 12), min_size=2, max_size=2),
       prompt=st.integers(1, 20), steps=st.integers(0, 15), spare=st.integers(0, 5))
def test_cache_holds_exactly_the_mask(sink, spans, prompt, steps, spare):
    total = prompt + steps + spare
    layer = PerHeadLayer([s for s in spans for _ in range(2)], spans, sink, total, batch_size=1, head_dim=1,
                         dtype=torch.float32, device="cpu")
    layer.update(position_states(range(prompt), 2), position_states(range(prompt), 2))
    for i in range(prompt - 1, prompt + steps):
        if i >= prompt:
            layer.update(position_states([i], 2), position_states([i], 2))
        assert layer.get_seq_length() == i + 1
        positions = layer.slot_positions()
        for h, span in enumerate(spans):
            assert cached_positions(layer, h) == kept_keys(i, span, sink)
            lo, hi = layer.offsets[h], layer.offsets[h + 1]
            held = layer.keys[0, lo:hi, 0].long()
            valid = layer.valid_lengths()[h]
            assert positions[lo:lo + valid].tolist() == held[:valid].tolist()
            assert (positions[lo + valid:hi] == -1).all()


@settings(max_examples=15, deadline=None)
@given(sink=st.integers(0, 5), query_spans=st.lists(st.integers(1, 10), min_size=4, max_size=4),
       prompt=st.integers(1, 12), steps=st.integers(1, 12))
def test_decode_keep_is_each_query_heads_mask(sink, query_spans, prompt, steps):
    kv_spans = [max(query_spans[:2]), max(query_spans[2:])]
    total = prompt + steps
    layer = prefilled_layer(query_spans, kv_spans, sink, prompt, total)
    for i in range(prompt, total):
        layer.update(position_states([i], 2), position_states([i], 2))
        keep = layer.decode_keep()
        if keep is None:
            assert query_spans[:2] == [kv_spans[0]] * 2 and query_spans[2:] == [kv_spans[1]] * 2
            continue
        positions = layer.slot_positions()
        for q, span in enumerate(query_spans):
            assert sorted(positions[keep[q]].tolist()) == kept_keys(i, span, sink)


@settings(max_examples=40, deadline=None)
@given(sink=st.integers(0, 5), query_spans=st.lists(st.integers(0, 10), min_size=4, max_size=4),
       prompt=st.integers(1, 12), steps=st.integers(1, 14), first_call=st.integers(0, 6))
def test_decode_bias_is_each_query_heads_mask_at_every_step(sink, query_spans, prompt, steps, first_call):
    """The decode mask kept by index edits between steps shows each query head exactly the slots holding the keys
    its row of the token mask keeps, from whichever step it is first asked for (rings wrap, spans of 0 see only the
    sink)."""
    kv_spans = [max(1, *query_spans[:2]), max(1, *query_spans[2:])]
    total = prompt + steps
    layer = prefilled_layer(query_spans, kv_spans, sink, prompt, total)
    for i in range(prompt, total):
        layer.update(position_states([i], 2), position_states([i], 2))
        if i - prompt < first_call:
            continue
        bias = layer.decode_bias()
        assert set(bias.unique().tolist()) <= {0.0, float("-inf")}
        for q, span in enumerate(query_spans):
            head = q // 2
            lo = layer.offsets[head]
            filled = range(lo, lo + layer.valid_lengths()[head])  # slots holding a token (checked above)
            seen = sorted(int(layer.keys[0, slot, 0]) for slot in filled if bias[q, slot] == 0)
            assert seen == kept_keys(i, span, sink)
            assert all(bias[q, slot] == float("-inf") for slot in range(layer.offsets[-1]) if slot not in filled)


@pytest.mark.parametrize("query_spans", [[3, 3, 7, 7], [5, 5, 5, 5], [2, 5, 7, 1]],
                         ids=["per-kv-head", "equal-heads", "mixed-group"])
@pytest.mark.parametrize("sink", [0, 2])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_decode_matches_reference(query_spans, sink, backend):
    """Decoding token by token through the cache equals the rows of dense masked attention at a fixed span."""
    torch.manual_seed(0)
    b, hq, hkv, d, prompt, total = 2, 4, 2, 8, 6, 19
    q = torch.randn(b, hq, total, d)
    k, v = torch.randn(b, hkv, total, d), torch.randn(b, hkv, total, d)
    spans = torch.tensor(query_spans)
    ref = moa_attention_reference(q, k, v, spans, sink)  # (B, Hq, total, D)
    kv_spans = spans.view(hkv, -1).amax(dim=1)
    layer = PerHeadLayer(spans, kv_spans, sink, total, batch_size=b, head_dim=d, dtype=torch.float32, device="cpu")
    layer.update(k[:, :, :prompt], v[:, :, :prompt])
    for i in range(prompt, total):
        layer.update(k[:, :, i:i + 1], v[:, :, i:i + 1])
        out = packed_decode_attention(q[:, :, i:i + 1], layer.keys, layer.values, layer.offsets,
                                      layer.valid_lengths(), keep=layer.decode_keep(), backend=backend)
        torch.testing.assert_close(out, ref[:, :, i:i + 1])


@pytest.mark.parametrize("granularity", ["kv_head", "head"])
def test_gqa_memory_is_plan_kv_density_and_decode_equals_recomputation(granularity):
    """Under GQA (4 query heads on 2 KV heads): allocated bytes are the plan's KV density times the dense cache,
    and decoding through the cache equals the dense masked recomputation. At ``head`` granularity the query heads
    of a group have different spans, so each KV head's ring is its group's largest span and the narrower heads
    must mask some cached tokens."""
    layers, batch, prompt, new, steps = 3, 2, 60, 140, 6
    model = make_tiny_model("llama", layers=layers, heads=4, kv_heads=2, head_dim=16)
    plan = Plan.uniform(model, 0.0, sink=8, min_span=4, granularity=granularity)
    heads = len(plan.alphas[0])
    plan.alphas = [[4.0 + 9 * h + 5 * layer for h in range(heads)] for layer in range(layers)]
    plan.betas = [[0.15 * (h % 2) + 0.1 * (h // 2) for h in range(heads)] for _ in range(layers)]
    plan = apply_plan(model, plan)
    if granularity == "head":  # spans differ within every group, and some rings wrap during the prompt
        spans = torch.stack([spans_for(plan, layer, prompt + new) for layer in range(layers)]).view(layers, 2, 2)
        assert (spans[..., 0] != spans[..., 1]).all() and spans.amax(-1).min() + plan.sink < prompt
    cache = make_cache(model, prompt, new, batch_size=batch)
    dense = layers * batch * 2 * (prompt + new) * 16 * 2 * 4  # layers, batch, KV heads, tokens, dim, K and V, fp32
    expected = plan_kv_density(plan, prompt + new) * dense
    assert abs(cache.nbytes_allocated - expected) <= 0.02 * expected

    seq = torch.randint(0, 128, (batch, prompt + steps), generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        logits = [model(seq[:, :prompt], **{cache_argument(): cache}).logits[:, -1]]
        used = sum(min(prompt, c) for layer in cache.layers for c in layer.capacities) * batch * 16 * 2 * 4
        assert cache.nbytes_used == used < cache.nbytes_allocated
        for i in range(prompt, prompt + steps - 1):
            logits.append(model(seq[:, i:i + 1], **{cache_argument(): cache}).logits[:, -1])
        recomputed = recompute_logits(model, plan, seq[:, :-1], prompt + new)[:, prompt - 1:]  # (B, steps, V)
    torch.testing.assert_close(torch.stack(logits, dim=1), recomputed, atol=1e-4, rtol=1e-4)
    assert cache.get_seq_length() == prompt + steps - 1


def recompute_logits(model, plan, ids, span_length):
    """The whole sequence at once under :func:`moa_attention_reference` with spans fixed at ``span_length``."""
    def reference(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
        spans = spans_for(plan, module.layer_idx, span_length)
        return moa_attention_reference(query, key, value, spans, plan.sink, scale=scaling).transpose(1, 2), None

    AttentionInterface.register("moa_test_reference", reference)
    previous = model.config._attn_implementation
    model.set_attn_implementation("moa_test_reference")
    try:
        return model(ids, use_cache=False).logits
    finally:
        model.set_attn_implementation(previous)


def test_refuses_what_it_cannot_hold():
    layer = PerHeadLayer([4, 4], [4], 2, 8, batch_size=1, head_dim=1, dtype=torch.float32, device="cpu")
    with pytest.raises(ValueError, match="planned for 8 tokens"):
        layer.update(position_states(range(9), 1), position_states(range(9), 1))
    layer.update(position_states(range(5), 1), position_states(range(5), 1))
    with pytest.raises(ValueError, match="one token per step"):
        layer.update(position_states([5, 6], 1), position_states([5, 6], 1))
    with pytest.raises(ValueError, match="built for batch 1"):
        layer.update(torch.zeros(2, 1, 1, 1), torch.zeros(2, 1, 1, 1))


def brute_force_packed_decode(q, k_packed, v_packed, offsets, valid_lengths, keep, scale):
    """Per sequence and query head, in float64: softmax over its own KV head's first ``valid`` slots that ``keep``
    allows (zeros where none is)."""
    b, hq, _, d = q.shape
    group = hq // (len(offsets) - 1)
    out = torch.zeros(b, hq, 1, d, dtype=torch.float64)
    for i in range(b):
        for h in range(hq):
            lo = offsets[h // group]
            slots = [s for s in range(lo, lo + valid_lengths[h // group]) if keep is None or keep[h, s]]
            if slots:
                probs = torch.softmax(k_packed[i, slots].double() @ q[i, h, 0].double() * scale, dim=0)  # (n,)
                out[i, h, 0] = probs @ v_packed[i, slots].double()
    return out


@pytest.mark.parametrize("with_keep", [False, True])
@pytest.mark.parametrize("valid", [[3, 17, 0], [5, 17, 9], [1, 2, 3]])
def test_one_call_packed_decode_equals_brute_force(valid, with_keep):
    """Unequal capacities, partly filled or empty heads, and a per-query-head ``keep`` mask: the one-matmul torch
    path gives what a per-head float64 softmax gives."""
    gen = torch.Generator().manual_seed(3)
    offsets = [0, 5, 22, 31]  # capacities 5, 17, 9
    q = torch.randn(2, 6, 1, 16, generator=gen)  # (B, Hq, 1, D), group 2
    k, v = (torch.randn(2, 31, 16, generator=gen) for _ in range(2))  # (B, T, D)
    keep = torch.rand(6, 31, generator=gen) < 0.6 if with_keep else None
    out = packed_decode_attention(q, k, v, offsets, torch.tensor(valid, dtype=torch.int32), keep=keep,
                                  backend="torch", scale=0.3)
    expected = brute_force_packed_decode(q, k, v, offsets, valid, keep, 0.3)
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)
