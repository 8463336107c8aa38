"""Triton prefill: block-sparse sink-plus-band attention with an online softmax (FlashAttention-2 style).

One program computes one block of ``BLOCK_M`` query rows of one query head. It visits only the key blocks that
intersect the sink (``[0, sink)``) or the band of its rows (``[m0 - S + 1, m1)``); the exact token mask is applied
inside every visited block, so partial blocks give the token-level result. The KV head of query head ``h`` is
``h // group`` (GQA without repeating K/V). Import this module only where Triton is installed; under
``TRITON_INTERPRET=1`` it runs on CPU tensors with one small block configuration.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

if INTERPRET:
    _CONFIGS = [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16})]
else:
    _CONFIGS = [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
        for bm, bn, w, s in [(64, 32, 4, 3), (64, 64, 4, 3), (128, 32, 4, 3), (128, 64, 8, 3), (128, 64, 4, 2)]
    ]


@triton.jit
def _visit(acc, m_i, l_i, q, k_ptrs, v_ptrs, start, stop, offs_m, offs_n, offs_d, n_ctx, span, sink,
           stride_kn, stride_vn, scale_log2, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
           PRECISION: tl.constexpr):
    """Online-softmax update over key blocks starting at ``start`` (a block multiple) up to ``stop``."""
    for n0 in range(start, stop, BLOCK_N):
        cols = n0 + offs_n  # (BLOCK_N,)
        kv_ok = (cols[:, None] < n_ctx) & (offs_d[None, :] < HEAD_DIM)
        k = tl.load(k_ptrs + n0 * stride_kn, mask=kv_ok, other=0.0)  # (BLOCK_N, D)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2  # (BLOCK_M, BLOCK_N), log2 units
        rows = offs_m[:, None]
        keep = (cols[None, :] <= rows) & ((cols[None, :] < sink) | (rows - cols[None, :] < span))
        keep &= cols[None, :] < n_ctx
        s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing kept yet
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_ptrs + n0 * stride_vn, mask=kv_ok, other=0.0)  # (BLOCK_N, D)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.autotune(configs=_CONFIGS, key=["n_ctx", "HEAD_DIM", "GROUP"])
@triton.jit
def _prefill_kernel(q_ptr, k_ptr, v_ptr, o_ptr, spans_ptr, sink, n_ctx, scale_log2,
                    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
                    stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_on,
                    num_heads, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    kv = h // GROUP
    span = tl.load(spans_ptr + h)

    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    q_ok = (offs_m[:, None] < n_ctx) & (offs_d[None, :] < HEAD_DIM)
    q = tl.load(q_ptr + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qn + offs_d[None, :],
                mask=q_ok, other=0.0)  # (BLOCK_M, D)
    k_ptrs = k_ptr + b * stride_kb + kv * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :]
    v_ptrs = v_ptr + b * stride_vb + kv * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :]

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)

    # Key blocks of the band: [m0 - span + 1, m0 + BLOCK_M), clipped to [0, n_ctx).
    hi = tl.minimum(m0 + BLOCK_M, n_ctx)
    band_lo = tl.maximum(m0 - span + 1, 0)
    band_lo = tl.where(span > 0, band_lo, hi)  # span 0: no band
    band_start = (band_lo // BLOCK_N) * BLOCK_N
    # Sink blocks that lie before the band's first block; the band loop covers the rest.
    sink_stop = tl.minimum(tl.minimum(sink, hi), band_start)
    acc, m_i, l_i = _visit(acc, m_i, l_i, q, k_ptrs, v_ptrs, 0, sink_stop, offs_m, offs_n, offs_d, n_ctx, span,
                           sink, stride_kn, stride_vn, scale_log2, HEAD_DIM, BLOCK_N, PRECISION)
    acc, m_i, l_i = _visit(acc, m_i, l_i, q, k_ptrs, v_ptrs, band_start, hi, offs_m, offs_n, offs_d, n_ctx, span,
                           sink, stride_kn, stride_vn, scale_log2, HEAD_DIM, BLOCK_N, PRECISION)

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)  # span 0 without sink: zeros, as in the reference
    out = acc / l_safe[:, None]
    tl.store(o_ptr + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_on + offs_d[None, :],
             out.to(o_ptr.dtype.element_ty), mask=q_ok)


def moa_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spans: torch.Tensor, sink: int,
                         scale: float | None = None) -> torch.Tensor:
    """Sink-plus-band prefill. q: (B, Hq, N, D); k, v: (B, Hkv, N, D); spans: (Hq,). Returns (B, Hq, N, D)."""
    b, hq, n, d = q.shape
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    spans = spans.to(device=q.device, dtype=torch.int32).contiguous()
    scale = d**-0.5 if scale is None else float(scale)
    precision = "ieee" if q.dtype == torch.float32 else "tf32"

    def grid(meta):
        return (triton.cdiv(n, meta["BLOCK_M"]), b * hq)

    _prefill_kernel[grid](
        q, k, v, out, spans, int(sink), n, scale * 1.4426950408889634,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
        hq, GROUP=hq // k.shape[1], HEAD_DIM=d, BLOCK_D=max(16, triton.next_power_of_2(d)), PRECISION=precision,
    )
    return out
