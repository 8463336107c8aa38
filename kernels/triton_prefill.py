"""Triton prefill: block-sparse sink-plus-band attention with an online softmax (FlashAttention-2 style).

One program computes ``BLOCK_M`` query rows ``[m0, m0 + BLOCK_M)`` of one query head against its KV head
``h // group`` (GQA without repeating K/V). It visits only the key blocks that hold a kept pair, in three loops
over one inner function whose ``MASK`` flag is a ``tl.constexpr``:

- (a) sink blocks ``[0, P)``: wholly inside the sink and wholly causal, no mask;
- (b) interior band blocks ``[Q, D)``: wholly causal and wholly inside every row's band, no mask;
- (c) masked blocks: a partial sink block ``[P, S1)``, the band's lower edge ``[L, Q)`` and the diagonal
  ``[D, E)``, walked as one loop whose block index jumps over the gaps.

:func:`block_ranges` is the host twin of that arithmetic (the tests check it, and the kernel against it, by brute
force over the token mask). Programs run heavy first on a 1-D grid: KV groups by their largest span, each
group's tiles last first, the query heads of a group side by side so they share K/V blocks in L2. On sm_90+ the
loads and the store go through device-side tensor descriptors (TMA); elsewhere, and by default under
``TRITON_INTERPRET=1``, through pointers. Autotuning is keyed on the power-of-two buckets of the length and of the
widest span (host spans only), head_dim and group; :func:`pin_config` or
``MOA_TRITON_PREFILL_CONFIG=BM,BN,warps,stages`` replaces it with one config.
Import this module only where Triton is installed.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
CONFIG_ENV = "MOA_TRITON_PREFILL_CONFIG"
LOG2E = 1.4426950408889634

# (BLOCK_M, BLOCK_N, num_warps, num_stages); BLOCK_M >= BLOCK_N, both powers of two.
AUTOTUNE_CONFIGS = [(128, 128, 8, 2), (128, 64, 4, 3), (128, 64, 4, 4), (128, 64, 8, 3), (64, 64, 4, 3),
                    (128, 32, 4, 3)]
INTERPRET_CONFIG = (32, 16, 4, 1)  # several blocks per tile and all three loops already at N ~ 100

_pinned: tuple[int, int, int, int] | None = None


def pin_config(config: tuple[int, int, int, int] | None) -> None:
    """Launch every call with ``(BLOCK_M, BLOCK_N, num_warps, num_stages)`` instead of autotuning; None unpins.
    Takes precedence over ``MOA_TRITON_PREFILL_CONFIG``."""
    global _pinned
    _pinned = None if config is None else _check_config(tuple(config), "pin_config")


def pinned_config() -> tuple[int, int, int, int] | None:
    """The config a launch uses without autotuning: :func:`pin_config`'s, else ``MOA_TRITON_PREFILL_CONFIG``,
    else :data:`INTERPRET_CONFIG` under the interpreter; None means autotune."""
    if _pinned is not None:
        return _pinned
    raw = os.environ.get(CONFIG_ENV, "").strip()
    if raw:
        try:
            config = tuple(int(x) for x in raw.split(","))
        except ValueError:
            raise ValueError(f"{CONFIG_ENV}={raw!r}: expected four ints BM,BN,warps,stages") from None
        return _check_config(config, CONFIG_ENV)
    return INTERPRET_CONFIG if INTERPRET else None


def _check_config(config, where: str) -> tuple[int, int, int, int]:
    if len(config) != 4:
        raise ValueError(f"{where}: expected (BLOCK_M, BLOCK_N, num_warps, num_stages), got {config}")
    bm, bn, warps, stages = (int(x) for x in config)
    pow2 = all(x >= 16 and x & (x - 1) == 0 for x in (bm, bn))
    if not pow2 or bm < bn or warps < 1 or warps & (warps - 1) or stages < 1:
        raise ValueError(f"{where}: {config} needs BLOCK_M >= BLOCK_N, both powers of two >= 16, "
                         "num_warps a power of two and num_stages >= 1")
    return bm, bn, warps, stages


def block_ranges(m0: int, n: int, span: int, sink: int, block_m: int, block_n: int) -> dict[str, tuple[int, int]]:
    """Key ranges (block-aligned starts, ``[start, stop)``) one query tile ``[m0, m0 + block_m)`` visits.

    ``sink`` and ``interior`` run without the mask; ``sink_edge``, ``band_edge`` and ``diagonal`` with it. A block
    ``[n0, n0 + BN)`` is mask-free iff it is causal for the tile's first row (``n0 + BN - 1 <= m0``) and either
    wholly in the sink (``n0 + BN <= sink``) or in the band of the tile's last row (``m0 + BM - 1 - n0 < span``).
    The host twin of the kernel's arithmetic; every bound is a block multiple except the diagonal's stop.
    """
    bn = block_n
    m1 = min(m0 + block_m, n)  # rows past n are never stored
    c_hi = (m0 + 1) // bn * bn  # blocks below are causal for every row
    s_end = -(-min(sink, m1) // bn) * bn  # blocks holding a kept sink key
    p = min(sink // bn * bn, c_hi)  # wholly-sink, wholly-causal blocks
    if span > 0:
        lo = max(m0 - span + 1, 0) // bn * bn  # first block of the band
        band_ok = -(-max(m0 + block_m - span, 0) // bn) * bn  # first block inside the last row's band
        el, q, d, e = max(lo, p), min(max(band_ok, p), c_hi), c_hi, m1
    else:  # no band: the sink alone
        el = q = d = e = s_end
    s1 = min(s_end, el)
    return {"sink": (0, p), "interior": (q, d), "sink_edge": (p, s1), "band_edge": (el, q), "diagonal": (d, e)}


@triton.jit
def _load_block(src, n0, offs_n, offs_d, n_ctx, stride_n, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                USE_TMA: tl.constexpr, MASK: tl.constexpr):
    """Rows ``[n0, n0 + BLOCK_N)`` of a (N, HEAD_DIM) K or V slab; zeros past N and past HEAD_DIM."""
    if USE_TMA:
        x = src.load([n0, 0])
    elif MASK:
        x = tl.load(src + n0 * stride_n, mask=((n0 + offs_n)[:, None] < n_ctx) & (offs_d[None, :] < HEAD_DIM),
                    other=0.0)
    elif BLOCK_D == HEAD_DIM:  # mask-free blocks lie wholly below N
        x = tl.load(src + n0 * stride_n)
    else:
        x = tl.load(src + n0 * stride_n, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
    return x


@triton.jit
def _attend(acc, m_i, l_i, q, k_src, v_src, n0, offs_m, offs_n, offs_d, n_ctx, span, sink, stride_kn, stride_vn,
            scale_log2, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
            USE_TMA: tl.constexpr, MASK: tl.constexpr):
    """Online-softmax update with key block ``[n0, n0 + BLOCK_N)``; ``MASK`` applies the token mask."""
    k = _load_block(k_src, n0, offs_n, offs_d, n_ctx, stride_kn, HEAD_DIM, BLOCK_D, USE_TMA, MASK)  # (BN, BD)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2  # (BM, BN), log2 units
    if MASK:
        cols = (n0 + offs_n)[None, :]
        rows = offs_m[:, None]
        keep = (cols <= rows) & ((cols < sink) | (rows - cols < span))  # rows >= N are never stored
        s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing kept yet
    else:
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = m_new
    p = tl.exp2(s - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    v = _load_block(v_src, n0, offs_n, offs_d, n_ctx, stride_vn, HEAD_DIM, BLOCK_D, USE_TMA, MASK)  # (BN, BD)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return acc, m_new, l_i


@triton.jit
def _prefill_fwd(q_ptr, k_ptr, v_ptr, o_ptr, spans_ptr, kv_order_ptr, record_ptr, sink, n_ctx, n_bucket, span_bucket,
                 batch, num_kv, scale_log2, stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
                 stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_on,
                 GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, PRECISION: tl.constexpr, USE_TMA: tl.constexpr, RECORD: tl.constexpr):
    # Heavy first: pid -> (KV rank, batch, tile from last, head in group), fastest last.
    pid = tl.program_id(0)
    n_tiles = tl.cdiv(n_ctx, BLOCK_M)
    g = pid % GROUP
    r = pid // GROUP
    tile = n_tiles - 1 - r % n_tiles
    r = r // n_tiles
    b = r % batch
    kv = tl.load(kv_order_ptr + r // batch)  # KV heads sorted by their group's largest span
    h = kv * GROUP + g
    span = tl.load(spans_ptr + h)
    m0 = tile * BLOCK_M

    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    q_base = q_ptr + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    k_base = k_ptr + b.to(tl.int64) * stride_kb + kv.to(tl.int64) * stride_kh
    v_base = v_ptr + b.to(tl.int64) * stride_vb + kv.to(tl.int64) * stride_vh
    o_base = o_ptr + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
    q_ok = (offs_m[:, None] < n_ctx) & (offs_d[None, :] < HEAD_DIM)
    if USE_TMA:  # per-(batch, head) 2-D descriptors: rows past N and columns past HEAD_DIM read as zero
        q_desc = tl.make_tensor_descriptor(q_base, shape=[n_ctx, HEAD_DIM], strides=[stride_qn, 1],
                                           block_shape=[BLOCK_M, BLOCK_D])
        k_src = tl.make_tensor_descriptor(k_base, shape=[n_ctx, HEAD_DIM], strides=[stride_kn, 1],
                                          block_shape=[BLOCK_N, BLOCK_D])
        v_src = tl.make_tensor_descriptor(v_base, shape=[n_ctx, HEAD_DIM], strides=[stride_vn, 1],
                                          block_shape=[BLOCK_N, BLOCK_D])
        q = q_desc.load([m0, 0])  # (BM, BD)
    else:
        q = tl.load(q_base + offs_m[:, None] * stride_qn + offs_d[None, :], mask=q_ok, other=0.0)  # (BM, BD)
        k_src = k_base + offs_n[:, None] * stride_kn + offs_d[None, :]
        v_src = v_base + offs_n[:, None] * stride_vn + offs_d[None, :]

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)

    # Block ranges: the same arithmetic as block_ranges() on the host. All operands are >= 0, so // is floor.
    m1 = tl.minimum(m0 + BLOCK_M, n_ctx)
    c_hi = (m0 + 1) // BLOCK_N * BLOCK_N
    s_end = tl.cdiv(tl.minimum(sink, m1), BLOCK_N) * BLOCK_N
    p_end = tl.minimum(sink // BLOCK_N * BLOCK_N, c_hi)
    lo = tl.maximum(m0 - span + 1, 0) // BLOCK_N * BLOCK_N
    band_ok = tl.cdiv(tl.maximum(m0 + BLOCK_M - span, 0), BLOCK_N) * BLOCK_N
    has_band = span > 0
    e_lo = tl.where(has_band, tl.maximum(lo, p_end), s_end)
    i_lo = tl.where(has_band, tl.minimum(tl.maximum(band_ok, p_end), c_hi), s_end)
    d_lo = tl.where(has_band, c_hi, s_end)
    d_hi = tl.where(has_band, m1, s_end)
    s1 = tl.minimum(s_end, e_lo)
    rec = record_ptr + ((b * (num_kv * GROUP) + h) * n_tiles + tile) * (tl.cdiv(n_ctx, BLOCK_N) + 1)
    if RECORD:
        tl.store(rec + tl.cdiv(n_ctx, BLOCK_N), pid)

    # (a) sink blocks, no mask
    for n0 in range(0, p_end, BLOCK_N):
        acc, m_i, l_i = _attend(acc, m_i, l_i, q, k_src, v_src, n0, offs_m, offs_n, offs_d, n_ctx, span, sink,
                                stride_kn, stride_vn, scale_log2, HEAD_DIM, BLOCK_D, PRECISION, USE_TMA, False)
        if RECORD:
            tl.atomic_add(rec + n0 // BLOCK_N, 1 << 16)
    # (b) interior band blocks, no mask
    for n0 in range(i_lo, d_lo, BLOCK_N):
        acc, m_i, l_i = _attend(acc, m_i, l_i, q, k_src, v_src, n0, offs_m, offs_n, offs_d, n_ctx, span, sink,
                                stride_kn, stride_vn, scale_log2, HEAD_DIM, BLOCK_D, PRECISION, USE_TMA, False)
        if RECORD:
            tl.atomic_add(rec + n0 // BLOCK_N, 1 << 16)
    # (c) masked blocks: [p_end, s1), then [e_lo, i_lo), then [d_lo, d_hi)
    n_sink_edge = (s1 - p_end) // BLOCK_N
    n_first_two = n_sink_edge + (i_lo - e_lo) // BLOCK_N
    for t in range(0, n_first_two + tl.cdiv(d_hi - d_lo, BLOCK_N)):
        n0 = (p_end + t * BLOCK_N + tl.where(t >= n_sink_edge, e_lo - s1, 0)
              + tl.where(t >= n_first_two, d_lo - i_lo, 0))
        acc, m_i, l_i = _attend(acc, m_i, l_i, q, k_src, v_src, n0, offs_m, offs_n, offs_d, n_ctx, span, sink,
                                stride_kn, stride_vn, scale_log2, HEAD_DIM, BLOCK_D, PRECISION, USE_TMA, True)
        if RECORD:
            tl.atomic_add(rec + n0 // BLOCK_N, 1)

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)  # span 0 without sink: zeros, as in the reference
    out = (acc / l_safe[:, None]).to(o_ptr.dtype.element_ty)
    if USE_TMA:
        o_desc = tl.make_tensor_descriptor(o_base, shape=[n_ctx, HEAD_DIM], strides=[stride_on, 1],
                                           block_shape=[BLOCK_M, BLOCK_D])
        o_desc.store([m0, 0], out)
    else:
        tl.store(o_base + offs_m[:, None] * stride_on + offs_d[None, :], out, mask=q_ok)


_prefill_autotuned = triton.autotune(
    configs=[triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
             for bm, bn, w, s in AUTOTUNE_CONFIGS],
    # Length and widest-span buckets, not exact values: one tuning per bucket (span_bucket is read only here).
    key=["n_bucket", "span_bucket", "HEAD_DIM", "GROUP"],
)(_prefill_fwd)


def tma_supported(*tensors: torch.Tensor) -> bool:
    """Whether device-side tensor descriptors can address these (B, H, N, D) tensors: CUDA sm_90+, a Triton with
    ``tl.make_tensor_descriptor``, a contiguous last dim and 16-byte aligned base and strides."""
    if not hasattr(tl, "make_tensor_descriptor") or not all(x.is_cuda for x in tensors):
        return False
    if torch.cuda.get_device_capability(tensors[0].device)[0] < 9:
        return False
    return all(x.stride(-1) == 1 and x.data_ptr() % 16 == 0 and all(s * x.element_size() % 16 == 0
                                                                   for s in x.stride()[:-1]) for x in tensors)


def _scratch(size: int, alignment: int, stream):
    return torch.empty(size, device="cuda", dtype=torch.int8)


def _ensure_allocator() -> None:
    """Device-side descriptors need a global scratch allocator; install one unless the caller set their own."""
    try:
        from triton.runtime import _allocation

        current = _allocation._allocator
        current = current.get() if hasattr(current, "get") else current
        if not isinstance(current, _allocation.NullAllocator):
            return
    except (ImportError, AttributeError):
        pass
    triton.set_allocator(_scratch)


def _launch(q, k, v, spans, sink, scale, tma, record=None, config=None):
    b, hq, n, d = q.shape
    hkv = k.shape[1]
    group = hq // hkv
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    # The widest span's power-of-two bucket tunes separately (a tile's block count follows it); read only from
    # host spans, so a call with device spans never synchronises (then the length bucket stands in for it).
    widest = min(int(spans.max()), n) if spans.device.type == "cpu" and spans.numel() else n
    spans = spans.to(device=q.device, dtype=torch.int64).clamp(max=2**30).to(torch.int32).contiguous()  # int32-safe
    kv_order = spans.view(hkv, group).amax(1).argsort(descending=True, stable=True).to(torch.int32)
    scale = d**-0.5 if scale is None else float(scale)
    if tma is None:
        tma = not INTERPRET and tma_supported(q, k, v, out)
    elif tma and not (INTERPRET or tma_supported(q, k, v, out)):
        raise ValueError("tensor descriptors need CUDA sm_90+ and 16-byte aligned q, k, v")
    if tma and not INTERPRET:
        _ensure_allocator()
    args = (q, k, v, out, spans, kv_order, out if record is None else record, int(sink), n,
            triton.next_power_of_2(n), triton.next_power_of_2(max(widest, 1)), b, hkv, scale * LOG2E,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2))
    meta = dict(GROUP=group, HEAD_DIM=d, BLOCK_D=max(16, triton.next_power_of_2(d)),
                PRECISION="ieee" if q.dtype == torch.float32 else "tf32", USE_TMA=bool(tma),
                RECORD=record is not None)

    def grid(meta):
        return (b * hq * triton.cdiv(n, meta["BLOCK_M"]),)

    config = config or pinned_config()
    if config is None:
        _prefill_autotuned[grid](*args, **meta)
    else:
        bm, bn, warps, stages = config
        _prefill_fwd[grid](*args, **meta, BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages)
    return out


def moa_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spans: torch.Tensor, sink: int,
                         scale: float | None = None, *, tma: bool | None = None) -> torch.Tensor:
    """Sink-plus-band prefill. q: (B, Hq, N, D); k, v: (B, Hkv, N, D); spans: (Hq,). Returns (B, Hq, N, D).

    ``tma`` forces tensor descriptors on (an error where unsupported) or off; None uses them on sm_90+ only."""
    return _launch(q, k, v, spans, sink, scale, tma)


def trace_visits(n: int, spans, sink: int, group: int = 1, batch: int = 1, head_dim: int = 16,
                 config: tuple[int, int, int, int] | None = None, tma: bool | None = None):
    """Run the kernel with its visit record on and return ``(visits, pids)``.

    ``visits[b, h, tile, block]`` counts the kernel's visits of key block ``block`` from query tile ``tile``:
    ``1`` per masked visit, ``1 << 16`` per mask-free one. ``pids[b, h, tile]`` is the program that ran it."""
    spans = torch.as_tensor(spans)
    hq = len(spans)
    bm, bn = (config or pinned_config() or AUTOTUNE_CONFIGS[0])[:2]
    device = "cpu" if INTERPRET else "cuda"
    q = torch.zeros(batch, hq, n, head_dim, device=device)
    kv = torch.zeros(batch, hq // group, n, head_dim, device=device)
    tiles, blocks = triton.cdiv(n, bm), triton.cdiv(n, bn)
    record = torch.zeros(batch, hq, tiles, blocks + 1, dtype=torch.int32, device=device)
    _launch(q, kv, kv, spans, sink, None, tma, record=record, config=config or (bm, bn, 4, 1))
    record = record.cpu()
    return record[..., :blocks], record[..., blocks]
