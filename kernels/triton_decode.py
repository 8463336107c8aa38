"""Triton decode: one new query token per head against a per-KV-head ragged cache (flash-decoding).

KV head ``h`` uses cache slots ``[0, valid_lengths[h])``. One program handles all ``GROUP`` query heads of one KV
head over one split of the cache, so each K/V block is read once for the whole group; the splits' partial
results are merged with their log-sum-exps. Import only where Triton is installed.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_CONFIGS = (
    [triton.Config({"BLOCK_N": 16})]
    if INTERPRET
    else [triton.Config({"BLOCK_N": bn}, num_warps=w) for bn, w in [(32, 4), (64, 4), (128, 4), (64, 8)]]
)


@triton.autotune(configs=_CONFIGS, key=["split_size", "HEAD_DIM", "GROUP"])
@triton.jit
def _decode_kernel(q_ptr, k_ptr, v_ptr, lens_ptr, o_ptr, lse_ptr, scale_log2, split_size,
                   stride_qb, stride_qh, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
                   num_kv, num_splits, GROUP: tl.constexpr, BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr,
                   BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    pid_bh = tl.program_id(0)
    split = tl.program_id(1)
    b = pid_bh // num_kv
    kv = pid_bh % num_kv
    length = tl.load(lens_ptr + kv)

    offs_g = tl.arange(0, BLOCK_G)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    g_ok = offs_g < GROUP
    d_ok = offs_d < HEAD_DIM
    heads = kv * GROUP + offs_g
    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                mask=g_ok[:, None] & d_ok[None, :], other=0.0)  # (BLOCK_G, D)
    k_base = k_ptr + b * stride_kb + kv * stride_kh
    v_base = v_ptr + b * stride_vb + kv * stride_vh

    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    start = split * split_size
    stop = tl.minimum(start + split_size, length)
    for n0 in range(start, stop, BLOCK_N):
        slots = n0 + offs_n
        ok = slots < stop
        kv_ok = ok[:, None] & d_ok[None, :]
        k = tl.load(k_base + slots[:, None] * stride_kn + offs_d[None, :], mask=kv_ok, other=0.0)  # (BLOCK_N, D)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2  # (BLOCK_G, BLOCK_N)
        s = tl.where(ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + slots[:, None] * stride_vn + offs_d[None, :], mask=kv_ok, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new

    # Partial result of this split: normalised output and log2-sum-exp (-inf for an empty split).
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    row = (b * num_kv + kv) * num_splits + split  # (B, Hkv, splits) flattened
    o_ptrs = o_ptr + (row * BLOCK_G + offs_g[:, None]) * BLOCK_D + offs_d[None, :]
    tl.store(o_ptrs, acc / l_safe[:, None])
    tl.store(lse_ptr + row * BLOCK_G + offs_g, tl.where(l_i == 0.0, float("-inf"), m_i + tl.log2(l_safe)))


def moa_decode_attention_triton(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                valid_lengths: torch.Tensor, scale: float | None = None,
                                split_size: int | None = None) -> torch.Tensor:
    """q: (B, Hq, 1, D); k_cache, v_cache: (B, Hkv, C, D); valid_lengths: (Hkv,). Returns (B, Hq, 1, D)."""
    b, hq, _, d = q.shape
    hkv, cap = k_cache.shape[1], k_cache.shape[2]
    group = hq // hkv
    if split_size is None:  # enough programs to fill the GPU for B * Hkv small, without tiny splits
        split_size = 64 if INTERPRET else max(256, triton.next_power_of_2(triton.cdiv(cap, 32)))
    splits = triton.cdiv(cap, split_size)
    block_g, block_d = max(16, triton.next_power_of_2(group)), max(16, triton.next_power_of_2(d))
    q = q.contiguous()
    k_cache, v_cache = (x if x.stride(-1) == 1 else x.contiguous() for x in (k_cache, v_cache))
    lens = valid_lengths.to(device=q.device, dtype=torch.int32).contiguous()
    part = torch.empty(b, hkv, splits, block_g, block_d, device=q.device, dtype=torch.float32)
    lse = torch.empty(b, hkv, splits, block_g, device=q.device, dtype=torch.float32)
    scale = d**-0.5 if scale is None else float(scale)
    _decode_kernel[(b * hkv, splits)](
        q, k_cache, v_cache, lens, part, lse, scale * 1.4426950408889634, split_size,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), hkv, splits,
        GROUP=group, BLOCK_G=block_g, HEAD_DIM=d, BLOCK_D=block_d,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
    )
    # Merge the splits: weights 2^(lse_s - lse_total); an empty cache gives zeros.
    total = torch.logsumexp(lse * 0.6931471805599453, dim=2, keepdim=True)  # natural-log units
    weight = torch.exp(lse * 0.6931471805599453 - total).nan_to_num(0.0)  # (B, Hkv, splits, G')
    out = (part * weight.unsqueeze(-1)).sum(dim=2)  # (B, Hkv, G', D')
    return out[:, :, :group, :d].reshape(b, hq, 1, d).to(q.dtype)
