"""Independent oracles the kernel tests share (no hypothesis, so the GPU machine can import them).

A reference computed entirely in the low dtype (for the flash-attention bound
``max|out - ref32| <= 2 * max|ref_lowp - ref32|``) and a decode oracle built from the last row of a dense prefill.
"""

from __future__ import annotations

import torch

from kernels.pattern import head_masks
from kernels.reference import moa_attention_reference


def reference_lowp(q, k, v, spans, sink):
    """The dense masked reference computed entirely in q's dtype (flash-attention's ``upcast=False``)."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)  # (B, Hq, N, D)
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5  # (B, Hq, N, N)
    keep = head_masks(q.shape[2], spans, sink)
    probs = torch.softmax(scores.masked_fill(~keep, float("-inf")), dim=-1).nan_to_num(0.0)
    return probs @ v


def assert_lowp_close(out, q, k, v, spans, sink, eps=1e-5):
    """``max|out - ref32| <= 2 * max|ref_lowp - ref32| + eps`` (the flash-attention test idiom)."""
    ref32 = moa_attention_reference(q.float(), k.float(), v.float(), spans, sink)
    if q.dtype == torch.float32:
        bound = eps
    else:
        bound = 2 * (reference_lowp(q, k, v, spans, sink).float() - ref32).abs().max().item() + eps
    err = (out.float() - ref32).abs().max().item()
    assert err <= bound, f"max error {err:.3g} > bound {bound:.3g}"


def decode_case(b, hq, hkv, n, d, spans_kv, sink, capacity, dtype, seed):
    """A cache holding, per KV head, exactly the keys the last query of an ``n``-token prefill keeps, in shuffled
    slot order with garbage after them; and the expected output: the last row of the dense reference."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, n, d, generator=gen).to(dtype)
    k = torch.randn(b, hkv, n, d, generator=gen).to(dtype)
    v = torch.randn(b, hkv, n, d, generator=gen).to(dtype)
    spans_q = torch.tensor(spans_kv).repeat_interleave(hq // hkv)
    expected = moa_attention_reference(q.float(), k.float(), v.float(), spans_q, sink)[:, :, -1:]  # (B, Hq, 1, D)
    k_cache = torch.randn(b, hkv, capacity, d, generator=gen).to(dtype) * 50  # garbage beyond valid slots
    v_cache = torch.randn(b, hkv, capacity, d, generator=gen).to(dtype) * 50
    lengths = []
    for h, span in enumerate(spans_kv):
        j = torch.arange(n)
        kept = j[(j < sink) | (n - 1 - j < span)]
        kept = kept[torch.randperm(len(kept), generator=gen)]
        k_cache[:, h, : len(kept)] = k[:, h, kept]
        v_cache[:, h, : len(kept)] = v[:, h, kept]
        lengths.append(len(kept))
    return q[:, :, -1:], k_cache, v_cache, torch.tensor(lengths), expected


def make_qkv(case, dtype, requires_grad=False):
    gen = torch.Generator().manual_seed(case["seed"])
    shapes = [(case["b"], case["hq"], case["n"], case["d"])] + [(case["b"], case["hkv"], case["n"], case["d"])] * 2
    return [torch.randn(s, generator=gen).to(dtype).requires_grad_(requires_grad) for s in shapes]
