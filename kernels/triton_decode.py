"""Triton split-KV decode (flash-decoding) over the packed per-head KV cache: one new query token per head.

Layout (the one :mod:`kernels.kv_cache` writes): ``k_packed``/``v_packed`` are ``[B, T, D]``; KV head ``h`` owns
slots ``offsets[h] .. offsets[h+1] - 1`` and uses the first ``valid_lengths[h]`` of them, in any order; query head
``q`` reads KV head ``q // group``. An optional ``keep`` mask ``[Hq, T]`` narrows what each query head sees.

Schedule. Each KV head's capacity ``C_h`` is cut into chunks of ``chunk`` slots, and the work items
``(head, chunk)`` of all heads are laid end to end (head ``h`` owns items ``head_work[h] .. head_work[h+1] - 1``,
a prefix sum of ``max(1, ceil(C_h / chunk))``). One program per (work item, batch row) loads the group's query
heads once (padded to ``BLOCK_G >= 16`` rows for ``tl.dot``), streams its chunk's valid K/V tiles once for all of
them (and the group's ``keep`` tile, if any), and writes an fp32 normalised partial output and its log2-sum-exp.
The partials of one (KV head, batch row) are then merged with weights ``2^(lse_c - lse)``, ``BLOCK_C`` chunks at a
time; a head with no kept slot gets zeros. The merge runs in one of two ways:

- ``fused`` (the default; ``MOA_TRITON_DECODE_MERGE=fused|separate``): one launch per call. Each program counts
  itself done on a per-(batch row, KV head) device counter (an acquire-release atomic after a CTA barrier); the
  program that finishes its head's last chunk merges that head (reading the partials through L2) and resets the
  counter to zero, so the next call, or the next replay of a CUDA graph, starts from zero;
- ``separate``: a second launch, ``_merge_kernel``, grid ``(Hkv, B)``.

``chunk`` is a host-side choice from the static capacities and the batch (:func:`chunk_size`): the largest power
of two, at least ``MIN_CHUNK``, that still gives at least two programs per SM. So the grid is fixed for a layer
across decode steps, and the autotune key (``chunk``, head_dim, group) never sees a length. Valid lengths, offsets
and the mask are device tensors read by the kernels, so a step needs no host synchronisation and, after one
warm-up call (which compiles, autotunes and caches the schedule tables and the counters), can be captured in a
CUDA graph. Tests pin one config (``MOA_TRITON_DECODE_CONFIG=BLOCK_N,warps,stages``) so they never autotune.
Import only where Triton is installed.
"""

from __future__ import annotations

import functools
import os
from itertools import pairwise

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
CONFIG_ENV = "MOA_TRITON_DECODE_CONFIG"
MERGE_ENV = "MOA_TRITON_DECODE_MERGE"
MIN_CHUNK = 64
INTERPRET_CHUNK = 32  # small, so tests on CPU run several chunks per head and several tiles per chunk
MERGE_ROWS = 64  # chunks x query heads merged per step: BLOCK_C = MERGE_ROWS // group (a power of two)
_LOG2E = 1.4426950408889634
# (BLOCK_N, num_warps, num_stages)
AUTOTUNE_CONFIGS = [(32, 4, 2), (64, 4, 2), (64, 4, 3), (128, 4, 2), (128, 8, 2)]
INTERPRET_CONFIG = (16, 4, 1)


@triton.jit
def _merge_head(part_ptr, lse_ptr, o_ptr, b, kv, first, last, num_work, stride_ob, stride_oh,
                GROUP: tl.constexpr, BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                BLOCK_C: tl.constexpr, CACHE: tl.constexpr):
    """Merge the partials of work items ``[first, last)`` (one KV head, batch row ``b``) into the output rows of the
    head's query heads: an online log-sum-exp over ``BLOCK_C`` chunks at a time; zeros when nothing was kept."""
    offs_c = tl.arange(0, BLOCK_C)
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    g_ok = offs_g < GROUP
    d_ok = offs_d < HEAD_DIM
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    m = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    total = tl.zeros([BLOCK_G], dtype=tl.float32)
    for w0 in range(first, last, BLOCK_C):
        w = w0 + offs_c
        rows = (b * num_work + w)[:, None] * GROUP + offs_g[None, :]  # (BLOCK_C, BLOCK_G)
        ok = (w < last)[:, None] & g_ok[None, :]
        lse = tl.load(lse_ptr + rows, mask=ok, other=float("-inf"), cache_modifier=CACHE)  # (BLOCK_C, BLOCK_G)
        part = tl.load(part_ptr + rows[:, :, None] * HEAD_DIM + offs_d[None, None, :],
                       mask=ok[:, :, None] & d_ok[None, None, :], other=0.0,
                       cache_modifier=CACHE)  # (BLOCK_C, BLOCK_G, BLOCK_D)
        m_new = tl.maximum(m, tl.max(lse, 0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m - m_safe)
        weight = tl.exp2(lse - m_safe[None, :])  # (BLOCK_C, BLOCK_G); 0 for a chunk that kept nothing
        acc = acc * alpha[:, None] + tl.sum(part * weight[:, :, None], 0)
        total = total * alpha + tl.sum(weight, 0)
        m = m_new
    out = acc / tl.where(total == 0.0, 1.0, total)[:, None]  # (BLOCK_G, BLOCK_D); zeros for a head that kept nothing
    heads = kv * GROUP + offs_g
    tl.store(o_ptr + b * stride_ob + heads[:, None] * stride_oh + offs_d[None, :],
             out.to(o_ptr.dtype.element_ty), mask=g_ok[:, None] & d_ok[None, :])


@triton.jit
def _chunk_kernel(q_ptr, k_ptr, v_ptr, keep_ptr, offsets_ptr, lens_ptr, work_head_ptr, work_start_ptr,
                  head_work_ptr, part_ptr, lse_ptr, count_ptr, o_ptr, scale_log2, chunk, num_work, num_heads,
                  stride_qb, stride_qh, stride_kb, stride_kt, stride_vb, stride_vt, stride_mh, stride_mt,
                  stride_ob, stride_oh,
                  GROUP: tl.constexpr, BLOCK_G: tl.constexpr, MERGE_G: tl.constexpr, HEAD_DIM: tl.constexpr,
                  BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, HAS_KEEP: tl.constexpr,
                  FUSED: tl.constexpr, PRECISION: tl.constexpr):
    w = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    kv = tl.load(work_head_ptr + w)
    base = tl.load(offsets_ptr + kv)  # first packed slot of this KV head
    length = tl.minimum(tl.load(lens_ptr + kv), tl.load(offsets_ptr + kv + 1) - base)
    start = tl.load(work_start_ptr + w)  # head-local slots [start, stop) are this chunk's
    stop = tl.minimum(start + chunk, length)

    offs_g = tl.arange(0, BLOCK_G)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    g_ok = offs_g < GROUP
    d_ok = offs_d < HEAD_DIM
    heads = kv * GROUP + offs_g
    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                mask=g_ok[:, None] & d_ok[None, :], other=0.0)  # (BLOCK_G, BLOCK_D)
    k_base = k_ptr + b * stride_kb + base.to(tl.int64) * stride_kt
    v_base = v_ptr + b * stride_vb + base.to(tl.int64) * stride_vt

    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    for n0 in range(start, stop, BLOCK_N):
        slots = n0 + offs_n
        ok = slots < stop
        tile_ok = ok[:, None] & d_ok[None, :]
        k = tl.load(k_base + slots[:, None] * stride_kt + offs_d[None, :], mask=tile_ok, other=0.0)  # (BLOCK_N, D)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2  # (BLOCK_G, BLOCK_N)
        if HAS_KEEP:
            kept = tl.load(keep_ptr + heads[:, None] * stride_mh + (base + slots)[None, :] * stride_mt,
                           mask=g_ok[:, None] & ok[None, :], other=0)
            s = tl.where(kept != 0, s, float("-inf"))
        else:
            s = tl.where(ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing kept yet stays at zero
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + slots[:, None] * stride_vt + offs_d[None, :], mask=tile_ok, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new

    # This chunk's normalised output and log2-sum-exp (-inf when it kept nothing), (B, W, GROUP, D) fp32.
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    rows = (b * num_work + w) * GROUP + offs_g
    tl.store(part_ptr + rows[:, None] * HEAD_DIM + offs_d[None, :], acc / l_safe[:, None],
             mask=g_ok[:, None] & d_ok[None, :])
    tl.store(lse_ptr + rows, tl.where(l_i == 0.0, float("-inf"), m_i + tl.log2(l_safe)), mask=g_ok)
    if FUSED:
        tl.debug_barrier()  # every thread's partial is written before the release below
        counter = count_ptr + b * num_heads + kv
        done = tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu")  # chunks of this (row, head) finished before
        first = tl.load(head_work_ptr + kv)
        last = tl.load(head_work_ptr + kv + 1)
        if done == last - first - 1:  # the head's last chunk to finish merges it
            _merge_head(part_ptr, lse_ptr, o_ptr, b, kv, first, last, num_work, stride_ob, stride_oh,
                        GROUP, MERGE_G, HEAD_DIM, BLOCK_D, BLOCK_C, ".cg")
            tl.atomic_xchg(counter, 0, sem="relaxed", scope="gpu")  # ready for the next call


_chunk_autotuned = triton.autotune(
    configs=[triton.Config({"BLOCK_N": bn}, num_warps=w, num_stages=s) for bn, w, s in AUTOTUNE_CONFIGS],
    key=["chunk", "HEAD_DIM", "GROUP", "HAS_KEEP", "FUSED"],
)(_chunk_kernel)


@triton.jit
def _merge_kernel(part_ptr, lse_ptr, head_work_ptr, o_ptr, num_work, stride_ob, stride_oh,
                  GROUP: tl.constexpr, BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                  BLOCK_C: tl.constexpr):
    kv = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    _merge_head(part_ptr, lse_ptr, o_ptr, b, kv, tl.load(head_work_ptr + kv), tl.load(head_work_ptr + kv + 1),
                num_work, stride_ob, stride_oh, GROUP, BLOCK_G, HEAD_DIM, BLOCK_D, BLOCK_C, "")


def pinned_config() -> tuple[int, int, int] | None:
    """``(BLOCK_N, num_warps, num_stages)`` from ``MOA_TRITON_DECODE_CONFIG``, else :data:`INTERPRET_CONFIG` under
    the interpreter; None means autotune."""
    raw = os.environ.get(CONFIG_ENV, "").strip()
    if not raw:
        return INTERPRET_CONFIG if INTERPRET else None
    try:
        bn, warps, stages = (int(x) for x in raw.split(","))
    except ValueError:
        raise ValueError(f"{CONFIG_ENV}={raw!r}: expected three ints BLOCK_N,warps,stages") from None
    if bn < 16 or bn & (bn - 1) or warps < 1 or warps & (warps - 1) or stages < 1:
        raise ValueError(f"{CONFIG_ENV}={raw!r}: BLOCK_N must be a power of two >= 16, warps a power of two, "
                         "stages >= 1")
    return bn, warps, stages


def fused_merge_default() -> bool:
    """Whether calls merge inside the chunk kernel (one launch); ``MOA_TRITON_DECODE_MERGE`` overrides."""
    raw = os.environ.get(MERGE_ENV, "fused").strip() or "fused"
    if raw not in ("fused", "separate"):
        raise ValueError(f"{MERGE_ENV}={raw!r}: expected 'fused' or 'separate'")
    return raw == "fused"


@functools.cache
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def chunk_size(capacities, batch: int, device: torch.device | str, programs_per_sm: int = 2) -> int:
    """Slots per chunk for this layer: from the static capacities only, so the grid is fixed across steps.

    Under the interpreter (or off CUDA) a small fixed ``INTERPRET_CHUNK``; on CUDA :func:`chunk_rule` with a
    target of ``programs_per_sm`` programs per SM.
    """
    device = torch.device(device)
    if INTERPRET or device.type != "cuda":
        return INTERPRET_CHUNK
    return chunk_rule(capacities, batch, programs_per_sm * _sm_count(device))


def chunk_rule(capacities, batch: int, target_programs: int) -> int:
    """The largest power of two ``chunk``, at least ``MIN_CHUNK`` and at most the largest capacity rounded up,
    with ``batch * sum(ceil(C_h / chunk)) >= target_programs``; ``MIN_CHUNK`` when none reaches the target."""
    chunk = max(MIN_CHUNK, triton.next_power_of_2(max(capacities, default=1)))
    while chunk > MIN_CHUNK and batch * sum(triton.cdiv(c, chunk) for c in capacities) < target_programs:
        chunk //= 2
    return chunk


@functools.cache  # never evicted: a captured graph may hold the tables' addresses
def _schedule(offsets: tuple[int, ...], chunk: int, device: torch.device):
    """Device int32 tables for one layer's static layout: offsets ``[Hkv+1]``, each work item's KV head and
    head-local first slot ``[W]``, and each head's first work item ``[Hkv+1]`` (a prefix sum of chunk counts; a
    head of capacity 0 still gets one empty item, so its merge writes its zeros)."""
    counts = [max(1, triton.cdiv(hi - lo, chunk)) for lo, hi in pairwise(offsets)]
    work_head = [h for h, n in enumerate(counts) for _ in range(n)]
    work_start = [i * chunk for n in counts for i in range(n)]
    head_work = [0]
    for n in counts:
        head_work.append(head_work[-1] + n)

    def table(xs):
        return torch.tensor(xs, dtype=torch.int32, device=device)

    return table(offsets), table(work_head), table(work_start), table(head_work)


@functools.cache  # never evicted: a captured graph may hold the address
def _counters(device: torch.device, size: int) -> torch.Tensor:
    """Zeroed int32 done-counters of the fused merge, ``[size]`` (a power of two >= B * Hkv). Kept for the
    process's life: a captured CUDA graph holds their address, and each call leaves them at zero. One stream at a
    time per device uses them."""
    return torch.zeros(size, dtype=torch.int32, device=device)


def packed_decode_attention_triton(q: torch.Tensor, k_packed: torch.Tensor, v_packed: torch.Tensor, offsets,
                                   valid_lengths, *, keep: torch.Tensor | None = None, scale: float | None = None,
                                   chunk: int | None = None, fused: bool | None = None) -> torch.Tensor:
    """One decode step over the packed per-head cache; see the module docstring for the layout and schedule.

    q: (B, Hq, 1, D); k_packed, v_packed: (B, T, D); offsets: Hkv + 1 host ints (static for a layer);
    valid_lengths: (Hkv,) ints, ideally an int tensor on q's device (then nothing here synchronises; a host list
    is copied); keep: optional (Hq, T) bool on q's device; chunk: override :func:`chunk_size`; fused: merge in the
    chunk kernel (one launch) or in a second one (None: :func:`fused_merge_default`).
    Returns (B, Hq, 1, D) in q's dtype.
    """
    offsets = tuple(int(x) for x in offsets)
    _check(q, k_packed, v_packed, offsets, keep)
    b, hq, _, d = q.shape
    hkv = len(offsets) - 1
    group = hq // hkv
    capacities = [hi - lo for lo, hi in pairwise(offsets)]
    if not isinstance(valid_lengths, torch.Tensor) or valid_lengths.device != q.device:
        lengths = [int(x) for x in valid_lengths]
        if len(lengths) != hkv or any(not 0 <= x <= c for x, c in zip(lengths, capacities, strict=True)):
            raise ValueError(f"valid_lengths {lengths} must be {hkv} ints within each head's capacity")
        valid_lengths = torch.tensor(lengths, dtype=torch.int32).to(q.device)
    elif valid_lengths.shape != (hkv,) or valid_lengths.is_floating_point():
        raise ValueError(f"valid_lengths must be an int tensor of shape ({hkv},), got {tuple(valid_lengths.shape)}")
    lens = valid_lengths if valid_lengths.dtype == torch.int32 else valid_lengths.to(torch.int32)
    fused = fused_merge_default() if fused is None else bool(fused)

    chunk = chunk or chunk_size(capacities, b, q.device)
    offsets_t, work_head, work_start, head_work = _schedule(offsets, int(chunk), q.device)
    num_work = work_head.numel()
    q, k_packed, v_packed = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k_packed, v_packed))
    out = torch.empty(b, hq, d, device=q.device, dtype=q.dtype)  # (B, Hq, D)
    part = torch.empty(b, num_work, group, d, device=q.device, dtype=torch.float32)
    lse = torch.empty(b, num_work, group, device=q.device, dtype=torch.float32)
    counters = _counters(q.device, triton.next_power_of_2(b * hkv)) if fused else lens  # any pointer when separate
    mask = keep.view(torch.uint8) if keep is not None else lens  # any pointer when there is no mask
    stride_mh, stride_mt = (mask.stride(0), mask.stride(1)) if keep is not None else (0, 0)
    merge_g = triton.next_power_of_2(group)
    block_c = max(1, MERGE_ROWS // merge_g)
    block_d = max(16, triton.next_power_of_2(d))
    scale = d**-0.5 if scale is None else float(scale)
    args = (q, k_packed, v_packed, mask, offsets_t, lens, work_head, work_start, head_work, part, lse, counters, out,
            scale * _LOG2E, int(chunk), num_work, hkv, q.stride(0), q.stride(1), k_packed.stride(0),
            k_packed.stride(1), v_packed.stride(0), v_packed.stride(1), stride_mh, stride_mt, out.stride(0),
            out.stride(1))
    meta = dict(GROUP=group, BLOCK_G=max(16, merge_g), MERGE_G=merge_g, HEAD_DIM=d, BLOCK_D=block_d, BLOCK_C=block_c,
                HAS_KEEP=keep is not None, FUSED=fused, PRECISION="ieee" if q.dtype == torch.float32 else "tf32")
    config = pinned_config()
    if config is None:
        _chunk_autotuned[(num_work, b)](*args, **meta)
    else:
        block_n, warps, stages = config
        _chunk_kernel[(num_work, b)](*args, **meta, BLOCK_N=block_n, num_warps=warps, num_stages=stages)
    if not fused:
        _merge_kernel[(hkv, b)](part, lse, head_work, out, num_work, out.stride(0), out.stride(1), GROUP=group,
                                BLOCK_G=merge_g, HEAD_DIM=d, BLOCK_D=block_d, BLOCK_C=block_c)
    return out.unsqueeze(2)  # (B, Hq, 1, D)


def _check(q, k_packed, v_packed, offsets, keep) -> None:
    """Shape and layout checks on host-known metadata only (nothing here reads device memory)."""
    if q.dim() != 4 or q.shape[2] != 1:
        raise ValueError(f"q must be (B, Hq, 1, D), got {tuple(q.shape)}")
    if k_packed.dim() != 3 or k_packed.shape != v_packed.shape:
        raise ValueError(f"k_packed {tuple(k_packed.shape)} and v_packed {tuple(v_packed.shape)} must be equal (B, T, D)")
    b, hq, _, d = q.shape
    if (k_packed.shape[0], k_packed.shape[2]) != (b, d):
        raise ValueError(f"packed cache {tuple(k_packed.shape)} does not match q {tuple(q.shape)} in batch or head_dim")
    if len({q.dtype, k_packed.dtype, v_packed.dtype}) != 1 or len({q.device, k_packed.device, v_packed.device}) != 1:
        raise ValueError("q and the packed cache must share one dtype and one device")
    hkv = len(offsets) - 1
    if hkv < 1 or hq % hkv:
        raise ValueError(f"query heads {hq} must be a multiple of kv heads {hkv} (offsets has Hkv + 1 entries)")
    if offsets[0] < 0 or any(hi < lo for lo, hi in pairwise(offsets)) or offsets[-1] > k_packed.shape[1]:
        raise ValueError(f"offsets {list(offsets)} must be non-decreasing within [0, {k_packed.shape[1]}]")
    if keep is not None and (keep.shape != (hq, k_packed.shape[1]) or keep.dtype != torch.bool
                             or keep.device != q.device):
        raise ValueError(f"keep must be a bool ({hq}, {k_packed.shape[1]}) tensor on {q.device}")


def moa_decode_attention_triton(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                valid_lengths: torch.Tensor, scale: float | None = None,
                                split_size: int | None = None) -> torch.Tensor:
    """q: (B, Hq, 1, D); k_cache, v_cache: (B, Hkv, C, D); valid_lengths: (Hkv,). Returns (B, Hq, 1, D).

    The equal-capacity cache as a packed one (KV head ``h`` at slots ``h * C ..``), through the same kernels;
    ``split_size`` overrides the chunk size.
    """
    b, hkv, cap, d = k_cache.shape
    k_packed = k_cache.reshape(b, hkv * cap, d)  # a view for a contiguous cache
    v_packed = v_cache.reshape(b, hkv * cap, d)
    offsets = [h * cap for h in range(hkv + 1)]
    return packed_decode_attention_triton(q, k_packed, v_packed, offsets, valid_lengths, scale=scale, chunk=split_size)
