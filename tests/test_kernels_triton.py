"""Triton prefill and decode kernels against the dense reference.

On CPU these run under ``TRITON_INTERPRET=1`` (set in conftest) at small sizes in fp32 and fp16; the interpreter
is slow and wrong for bf16, so bf16 and larger sizes run only on CUDA (``gpu`` mark).
"""

from __future__ import annotations

import os

import pytest
import torch
from kernel_oracles import assert_lowp_close, decode_case, make_qkv

pytest.importorskip("triton")

from kernels.triton_decode import moa_decode_attention_triton  # noqa: E402
from kernels.triton_prefill import moa_attention_triton  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# (B, Hq, Hkv, N, D, spans, sink): ragged lengths, GQA, span 0 / 1 / >= N, mixed spans per KV group.
PREFILL_CASES = [
    (1, 2, 1, 1, 16, [1, 1], 0),
    (1, 4, 2, 63, 16, [0, 5, 63, 70], 4),
    (2, 2, 2, 65, 64, [17, 1], 64),
    (1, 3, 1, 232, 16, [40, 232, 0], 0),
]


def _on_device(*xs):
    return [x.to(DEVICE) for x in xs]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("b,hq,hkv,n,d,spans,sink", PREFILL_CASES)
def test_triton_prefill_matches_reference(b, hq, hkv, n, d, spans, sink, dtype):
    case = dict(b=b, hq=hq, hkv=hkv, n=n, d=d, seed=n + d)
    q, k, v = make_qkv(case, dtype)
    spans = torch.tensor(spans)
    out = moa_attention_triton(*_on_device(q, k, v), spans, sink).cpu()
    assert out.dtype == dtype
    assert_lowp_close(out, q, k, v, spans, sink)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("b,hq,hkv,n,d,spans_kv,sink,capacity", [
    (1, 4, 2, 100, 16, [3, 100], 4, 112),
    (2, 3, 3, 70, 64, [1, 0, 20], 0, 70),
])
def test_triton_decode_matches_prefill_last_row(b, hq, hkv, n, d, spans_kv, sink, capacity, dtype):
    q, k_cache, v_cache, lengths, expected = decode_case(b, hq, hkv, n, d, spans_kv, sink, capacity, dtype, seed=5)
    out = moa_decode_attention_triton(*_on_device(q, k_cache, v_cache, lengths)).cpu()
    assert out.dtype == dtype and out.shape == q.shape
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(out.float(), expected, atol=tol, rtol=tol)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("n", [1000, 4096])
def test_triton_prefill_large_on_gpu(n, dtype, monkeypatch):
    # One pinned config (the caller's, if set; fp32 a smaller one for shared memory): tests never autotune.
    pinned = "64,64,4,2" if dtype == torch.float32 else os.environ.get("MOA_TRITON_PREFILL_CONFIG", "128,64,4,3")
    monkeypatch.setenv("MOA_TRITON_PREFILL_CONFIG", pinned)
    case = dict(b=2, hq=8, hkv=2, n=n, d=128, seed=1)
    q, k, v = make_qkv(case, dtype)
    spans = torch.tensor([n // 8, n // 4, n // 2, n, 64, 1, 300, n // 3])
    out = moa_attention_triton(q.cuda(), k.cuda(), v.cuda(), spans, 64).cpu()
    assert_lowp_close(out, q, k, v, spans, 64, eps=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_decode_large_on_gpu(dtype):
    q, k_cache, v_cache, lengths, expected = decode_case(2, 8, 2, 4096, 128, [64, 4096], 64, 4200, dtype, seed=9)
    out = moa_decode_attention_triton(q.cuda(), k_cache.cuda(), v_cache.cuda(), lengths.cuda()).cpu()
    tol = 2e-3 if dtype == torch.float16 else 2e-2
    torch.testing.assert_close(out.float(), expected, atol=tol, rtol=tol)
