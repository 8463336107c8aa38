"""The cpu prefill backend, the torch decode path and the kernel API, against the dense masked reference.

The oracles these tests share with the Triton tests are in ``kernel_oracles.py``.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from kernel_oracles import assert_lowp_close, decode_case, make_qkv

import kernels
from kernels.cpu import chunk_plan, moa_attention_cpu
from kernels.pattern import head_masks, kept_pairs
from kernels.reference import moa_attention_reference


@st.composite
def prefill_cases(draw, lengths=(1, 63, 65, 232, 1000), dims=(16, 64, 128)):
    """Random shapes and per-head spans: 0, 1, random, >= N, mixed within a KV group."""
    hkv = draw(st.integers(1, 2))
    group = draw(st.sampled_from([1, 2, 3]))
    n = draw(st.sampled_from(lengths))
    span = st.one_of(st.sampled_from([0, 1, n, n + 7]), st.integers(1, max(1, n)))
    spans = torch.tensor(draw(st.lists(span, min_size=hkv * group, max_size=hkv * group)))
    return dict(b=draw(st.integers(1, 2)), hq=hkv * group, hkv=hkv, n=n, d=draw(st.sampled_from(dims)),
                spans=spans, sink=draw(st.sampled_from([0, 4, 64])), seed=draw(st.integers(0, 2**16)))


@settings(max_examples=20, deadline=None)
@given(case=prefill_cases(), dtype=st.sampled_from([torch.float32, torch.float16]),
       chunk=st.sampled_from([16, 64, 256]))
def test_cpu_matches_reference(case, dtype, chunk):
    q, k, v = make_qkv(case, dtype)
    out = moa_attention_cpu(q, k, v, case["spans"], case["sink"], chunk=chunk)
    assert out.dtype == dtype and out.shape == q.shape
    assert_lowp_close(out, q, k, v, case["spans"], case["sink"])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cpu_low_precision_rows_match_dense_or_are_rounded_once(dtype):
    """In bf16/fp16, a head with span >= N equals dense causal attention (the same fused op in the same dtype) bit
    for bit, and the rows inside a shorter span nearly so (the op's blocking follows the call's length: at most 1%
    of elements differ). Every other row is the float64 reference rounded to the dtype, give or take the float32
    computation: at most 1% of its elements one unit in the last place off, none further (units taken at 1/64 or
    above, so that cancellation near zero is not counted). The fused op in bf16 puts about a third of them up to 11
    units off, and merging band and sink parts rounded separately adds more."""
    spans = torch.tensor([40, 40, 40, 97, 97, 97, 300, 300, 300])
    case = dict(b=1, hq=9, hkv=3, n=300, d=64, sink=16, seed=5, spans=spans)
    q, k, v = make_qkv(case, dtype)
    out = moa_attention_cpu(q, k, v, spans, case["sink"], chunk=32)
    dense = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    inside = torch.arange(case["n"]).view(1, -1) < spans.view(-1, 1)  # (Hq, N): rows i < span
    assert torch.equal(out[:, 6:], dense[:, 6:])
    assert (out[0][inside] != dense[0][inside]).double().mean().item() <= 0.01
    exact = moa_attention_reference(q.double(), k.double(), v.double(), spans, case["sink"])
    rounded = exact.to(dtype)
    ulp = rounded.double().abs().clamp_min(1 / 64).log2().floor().exp2() * torch.finfo(dtype).eps
    off = ((out.double() - rounded.double()).abs() / ulp).round()[0][~inside]  # (rows, D)
    assert off.max().item() <= 1 and (off > 0).double().mean().item() <= 0.01, \
        f"{(off > 0).double().mean().item():.3%} of elements off by up to {off.max().item():.0f} ulp"


@pytest.mark.parametrize("slots", [300, 1500])
def test_bf16_decode_is_as_precise_as_the_fused_op(slots):
    """One bf16 decode step over a packed cache, against the float64 result: within 1.5x the error of PyTorch's
    fused flash op (dense attention's decode) given the same keys and mask. Scores rounded to bf16 before the
    softmax, or probabilities rounded before the weighted sum, are 2.5-15x further off at these logits."""
    from kernels.decode import biased_decode_attention

    gen = torch.Generator().manual_seed(slots)
    q = (torch.randn(1, 6, 1, 64, generator=gen) * 2).bfloat16()
    k = (torch.randn(1, slots, 64, generator=gen) * 2).bfloat16()
    v = torch.randn(1, slots, 64, generator=gen).bfloat16()
    bias = torch.zeros(6, slots).masked_fill_(torch.rand(6, slots, generator=gen) < 0.3, float("-inf"))
    exact = biased_decode_attention(q.double(), k.double(), v.double(), bias.double(), scale=0.125)
    fused, _ = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, k.unsqueeze(1), v.unsqueeze(1), 0.0, False, attn_mask=bias.bfloat16().view(1, 6, 1, slots), scale=0.125)
    ours = biased_decode_attention(q, k, v, bias, scale=0.125)
    assert ours.dtype == torch.bfloat16
    fused_err, our_err = ((x.double() - exact).abs().max().item() for x in (fused, ours))
    assert our_err <= 1.5 * fused_err, f"error {our_err:.3g} against the fused op's {fused_err:.3g}"


@pytest.mark.parametrize("kv_spans", [(40, 9, 40), (9, 40, 40), (40, 40, 40), (0, 9, 0)],
                         ids=["same-span-apart", "same-span-adjacent", "one-span", "empty-heads-apart"])
def test_cpu_groups_kv_heads_that_share_a_span(kv_spans):
    """Plan layouts: three KV heads, every query head of a KV head at its span. KV heads with one span run as one
    call, sliced when adjacent and gathered when not; the output (heads put back in order) and the gradients
    must equal the reference's."""
    case = dict(b=1, hq=6, hkv=3, n=150, d=16, sink=4, seed=3, spans=torch.tensor(kv_spans).repeat_interleave(2))
    q, k, v = make_qkv(case, torch.float32, requires_grad=True)
    upstream = torch.randn(q.shape, generator=torch.Generator().manual_seed(4))
    out = moa_attention_cpu(q, k, v, case["spans"], case["sink"], chunk=32)
    assert_lowp_close(out.detach(), q.detach(), k.detach(), v.detach(), case["spans"], case["sink"])
    grads = torch.autograd.grad(out, (q, k, v), upstream)
    inputs = [x.detach().double().requires_grad_() for x in (q, k, v)]
    ref_grads = torch.autograd.grad(moa_attention_reference(*inputs, case["spans"], case["sink"]), inputs,
                                    upstream.double())
    for got, expected in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got.double(), expected, atol=1e-4, rtol=1e-4)


@settings(max_examples=8, deadline=None)
@given(case=prefill_cases(lengths=(1, 63, 65, 232), dims=(16,)), chunk=st.sampled_from([16, 64]))
def test_cpu_gradients_match_reference(case, chunk):
    """fp32 gradients of the cpu backend against float64 reference autograd, with the same bound idiom."""
    q, k, v = make_qkv(case, torch.float32, requires_grad=True)
    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(case["seed"] + 1))
    def grads(fn, inputs, upstream):  # inputs a fully masked head never uses get zero gradients
        return torch.autograd.grad(fn(*inputs, case["spans"], case["sink"]), inputs, upstream, allow_unused=True,
                                   materialize_grads=True)

    got = grads(lambda *a: moa_attention_cpu(*a, chunk=chunk), (q, k, v), grad_out)
    ref32 = grads(moa_attention_reference, (q, k, v), grad_out)
    ref64 = grads(moa_attention_reference, tuple(x.detach().double().requires_grad_() for x in (q, k, v)),
                  grad_out.double())
    for name, g, r32, r64 in zip("qkv", got, ref32, ref64, strict=True):
        bound = 2 * (r32.double() - r64).abs().max().item() + 1e-5
        err = (g.double() - r64).abs().max().item()
        assert err <= bound, f"d{name}: error {err:.3g} > bound {bound:.3g}"


@pytest.mark.parametrize("n,span,sink,chunk", [(1000, 250, 64, 64), (4096, 512, 64, 256), (232, 232, 4, 64),
                                               (300, 1, 0, 16)])
def test_cpu_plan_skips_masked_work(n, span, sink, chunk):
    """The segments cover every kept pair once, and computed pairs exceed kept pairs by at most one chunk
    squared per chunk (the two triangles at the band's edges)."""
    plan = chunk_plan(n, span, sink, chunk, 1, torch.float32)
    covered = torch.zeros(n, n, dtype=torch.int32)
    computed = 0
    for c in plan:
        for s in c.segments:
            keep = torch.ones(c.q1 - c.q0, s.stop - s.start, dtype=torch.bool) if s.mask is None else s.mask == 0
            covered[c.q0:c.q1, s.start:s.stop] += keep.int()
            computed += (c.q1 - c.q0) * (s.stop - s.start)
    assert torch.equal(covered.bool(), head_masks(n, torch.tensor([span]), sink)[0])
    assert covered.max() == 1
    assert computed <= kept_pairs(n, span, sink) + len(plan) * chunk * chunk


@pytest.mark.parametrize("n,spans,sink,chunk", [(1000, [250, 250], 64, 64), (2048, [512, 100], 4, 192),
                                                (300, [1, 1], 0, 16), (500, [0, 600], 64, 32)])
def test_cpu_forward_skips_masked_work(monkeypatch, n, spans, sink, chunk):
    """Pairs the forward hands to the flash kernel, per query head: at most the kept pairs plus ``chunk - 1``
    per row (the band window's two triangles) plus ``sink**2`` (sink keys of rows whose band still covers them)."""
    import kernels.cpu as cpu

    computed = []

    def spy(query, key, value, dropout, causal, **kwargs):
        rows, keys = query.shape[-2], key.shape[-2]
        per_head = rows * (rows + 1) // 2 if causal else rows * keys
        computed.append(query.shape[0] * query.shape[1] * per_head)  # (T or B) x heads x pairs
        return flash(query, key, value, dropout, causal, **kwargs)

    flash = cpu._flash_fwd
    monkeypatch.setattr(cpu, "_flash_fwd", spy)
    q, k, v = torch.randn(1, 2, n, 16), torch.randn(1, 2, n, 16), torch.randn(1, 2, n, 16)
    spans = torch.tensor(spans)
    out = moa_attention_cpu(q, k, v, spans, sink, chunk=chunk)
    torch.testing.assert_close(out, moa_attention_reference(q, k, v, spans, sink), atol=1e-5, rtol=1e-5)
    bound = sum(kept_pairs(n, min(int(s), n), sink) + n * (chunk - 1) + sink**2 for s in spans)
    assert sum(computed) <= bound


def test_cpu_folds_gqa_without_copying_kv(monkeypatch):
    """All heads sharing one span: the flash kernel sees slices of the caller's K and V (no gather, no repeat)."""
    import kernels.cpu as cpu

    q, k, v = torch.randn(1, 4, 70, 16), torch.randn(1, 2, 70, 16), torch.randn(1, 2, 70, 16)
    seen = []

    def spy(query, key, value, *args, **kwargs):
        seen.append(key.untyped_storage().data_ptr() == k.untyped_storage().data_ptr())
        return flash(query, key, value, *args, **kwargs)

    flash = cpu._flash_fwd
    monkeypatch.setattr(cpu, "_flash_fwd", spy)
    spans = torch.full((4,), 9)
    out = moa_attention_cpu(q, k, v, spans, 4, chunk=16)
    assert seen and all(seen)
    torch.testing.assert_close(out, moa_attention_reference(q, k, v, spans, 4), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["auto", "reference", "cpu"])
def test_api_backends_agree(backend):
    case = dict(b=1, hq=4, hkv=2, n=130, d=16, spans=torch.tensor([5, 64, 130, 0]), sink=4, seed=3)
    q, k, v = make_qkv(case, torch.float32)
    out = kernels.moa_attention(q, k, v, case["spans"], case["sink"], backend=backend, scale=0.2)
    ref = moa_attention_reference(q, k, v, case["spans"], case["sink"], scale=0.2)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("bad,match", [
    (dict(backend="cuda"), "unknown backend"),
    (dict(k=torch.randn(1, 3, 8, 16), v=torch.randn(1, 3, 8, 16)), "multiple of kv heads"),
    (dict(spans=torch.tensor([1.0, 2.0, 3.0, 4.0])), "int tensor"),
    (dict(spans=torch.tensor([1, 2])), "shape"),
    (dict(spans=torch.tensor([1, -1, 2, 3])), ">= 0"),
    (dict(v=torch.randn(1, 2, 9, 16)), "differ in shape"),
    (dict(q=torch.randn(1, 4, 8, 16, dtype=torch.float64)), "dtype"),
])
def test_api_rejects_bad_inputs(bad, match):
    args = dict(q=torch.randn(1, 4, 8, 16), k=torch.randn(1, 2, 8, 16), v=torch.randn(1, 2, 8, 16),
                spans=torch.tensor([1, 2, 3, 4]), backend="auto")
    args.update(bad)
    with pytest.raises(ValueError, match=match):
        kernels.moa_attention(args["q"], args["k"], args["v"], args["spans"], 4, backend=args["backend"])


@pytest.mark.parametrize("backend", ["torch", "reference", "auto"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_decode_matches_prefill_last_row(backend, dtype):
    q, k_cache, v_cache, lengths, expected = decode_case(2, 6, 3, 300, 64, [1, 40, 300], 4, 320, dtype, seed=7)
    out = kernels.moa_decode_attention(q, k_cache, v_cache, lengths, backend=backend)
    assert out.shape == q.shape and out.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(out.float(), expected, atol=tol, rtol=tol)


def test_decode_empty_head_gives_zeros_and_bad_lengths_raise():
    q, k_cache, v_cache = torch.randn(1, 2, 1, 16), torch.randn(1, 2, 8, 16), torch.randn(1, 2, 8, 16)
    out = kernels.moa_decode_attention(q, k_cache, v_cache, torch.tensor([0, 8]), backend="torch")
    assert torch.equal(out[:, 0], torch.zeros(1, 1, 16))
    with pytest.raises(ValueError, match="valid_lengths"):
        kernels.moa_decode_attention(q, k_cache, v_cache, torch.tensor([9, 1]))


def test_flex_mask_matches_reference():
    """The FlexAttention baseline's mask (run eagerly here; the benchmark compiles it) is the same pattern."""
    from torch.nn.attention.flex_attention import flex_attention

    from kernels.flex import sink_band_block_mask

    q, k, v = torch.randn(1, 3, 130, 16), torch.randn(1, 3, 130, 16), torch.randn(1, 3, 130, 16)
    spans = (1, 40, 130)
    out = flex_attention(q, k, v, block_mask=sink_band_block_mask(130, spans, 4, "cpu"))
    torch.testing.assert_close(out, moa_attention_reference(q, k, v, torch.tensor(spans), 4), atol=1e-5, rtol=1e-5)
