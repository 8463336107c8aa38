"""CPU prefill for the sink-plus-band pattern that skips masked work, on PyTorch's fused flash-attention kernel.

Forward, for one span ``S`` (query heads of one KV head folded into the rows, so K/V are never repeated):

- rows ``i < S`` keep every ``j <= i``: one causal flash call over the prefix;
- rows ``i >= S`` are cut into ``T`` chunks of ``c`` rows. Chunk ``t`` keeps the band keys
  ``[t*c + 1, t*c + c + S)``, a window that is a zero-copy strided view of K, so all chunks go to the kernel
  as one batch ``(T, B*Hkv, G*c, D)``. The window is split into the interior (kept by every row, no mask) and the
  two ``c x c`` triangles at its ends (masked); the sink ``[0, sink)`` is a fourth call. The four partial results
  are merged once with their log-sum-exps.

So the work is the kept pairs plus two ``c x c`` triangles per chunk, in a handful of kernel calls whatever N.
Backward is FlashAttention's: per query chunk, each key segment's gradient comes from the flash backward kernel
given the merged output and log-sum-exp (:func:`chunk_plan` lists the segments).

The fused kernels are private ATen ops (tested on torch 2.13). On first use they are checked against a tiny dense
computation (output, log-sum-exp layout, gradients); where they are missing or disagree, a portable matmul-softmax
implementation of the same contract (:func:`portable_flash_forward`, :func:`portable_flash_backward`) takes over,
with one warning. It computes the same pairs, in row blocks of bounded size, only slower.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

from kernels.tensor_cache import cached

FUSED_OPS = ("_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention_for_cpu_backward")
"""The private ATen forward and backward ops of PyTorch's fused CPU flash attention."""
PORTABLE_BLOCK = 1 << 22
"""Score elements per row block of the portable path (16 MiB in float32), which bounds its extra memory."""
_selected_ops: tuple[Callable, Callable] | None = None  # (forward, backward), chosen on first use


def _flash_fwd(query, key, value, dropout_p=0.0, is_causal=False, *, attn_mask=None, scale=None):
    """Flash forward: ``(out (..., L, D), lse (..., L))``, by the fused op or its portable stand-in."""
    return _ops()[0](query, key, value, dropout_p, is_causal, attn_mask=attn_mask, scale=scale)


def _flash_bwd(grad_out, query, key, value, out, lse, dropout_p=0.0, is_causal=False, *, attn_mask=None, scale=None):
    """Flash backward: ``(dq, dk, dv)`` given the forward's output and log-sum-exp."""
    return _ops()[1](grad_out, query, key, value, out, lse, dropout_p, is_causal, attn_mask=attn_mask, scale=scale)


def _ops() -> tuple[Callable, Callable]:
    """The fused ops where they pass :func:`fused_ops_problem`, else the portable ones (warning once)."""
    global _selected_ops
    if _selected_ops is None:
        problem = fused_ops_problem()
        if problem is None:
            _selected_ops = fused_ops()
        else:
            warnings.warn(f"kernels.cpu: {problem} on torch {torch.__version__}; using the portable attention path "
                          "(same results, slower)", RuntimeWarning, stacklevel=4)
            _selected_ops = (portable_flash_forward, portable_flash_backward)
    return _selected_ops


def fused_ops() -> tuple[Callable, Callable]:
    """PyTorch's fused CPU flash-attention forward and backward; AttributeError where this torch lacks them."""
    return tuple(getattr(torch.ops.aten, name) for name in FUSED_OPS)


def fused_ops_problem() -> str | None:
    """Why the fused ops cannot be used here, or None when they exist and match a tiny dense computation."""
    try:
        fwd, bwd = fused_ops()
    except (AttributeError, RuntimeError) as err:
        return f"PyTorch's fused CPU flash-attention op is missing ({err})"
    try:
        with torch.inference_mode(False), torch.enable_grad():  # first use may come under no_grad or inference
            return _check_ops(fwd, bwd)
    except Exception as err:  # noqa: BLE001 - a private op failing in any way means: do not use it
        return f"PyTorch's fused CPU flash-attention op failed its check ({type(err).__name__}: {err})"


def _check_ops(fwd: Callable, bwd: Callable) -> str | None:
    """Run ``fwd``/``bwd`` as this module does (causal, and masked with the log-sum-exp stored ``(B, L, H)``) on a
    tiny problem; compare output, log-sum-exp and gradients with a float64 dense computation."""
    gen = torch.Generator().manual_seed(0)
    q, k, v, dout = (torch.randn(1, 2, 6, 8, generator=gen) for _ in range(4))  # (B, H, L, D)
    causal_keep = torch.ones(6, 6, dtype=torch.bool).tril()
    band_keep = causal_keep & ~causal_keep.tril(-3)  # a band of 3
    band_keep[:, 0] = True  # and a sink
    band_mask = torch.zeros(6, 6).masked_fill_(~band_keep, float("-inf"))
    for causal, attn_mask, keep in ((True, None, causal_keep), (False, band_mask, band_keep)):
        q64, k64, v64 = (x.double().requires_grad_() for x in (q, k, v))
        scores = (q64 @ k64.transpose(-1, -2) * 0.5).masked_fill(~keep, float("-inf"))  # (B, H, L, L)
        lse_ref = torch.logsumexp(scores, dim=-1)  # (B, H, L)
        out_ref = torch.softmax(scores, dim=-1) @ v64
        grads_ref = torch.autograd.grad(out_ref, (q64, k64, v64), dout.double())
        out, lse = fwd(q, k, v, 0.0, causal, attn_mask=attn_mask, scale=0.5)
        if tuple(lse.shape) != tuple(lse_ref.shape) or not torch.allclose(lse.double(), lse_ref, atol=1e-4):
            return f"the fused op's log-sum-exp {tuple(lse.shape)} does not match torch.logsumexp {tuple(lse_ref.shape)}"
        if not torch.allclose(out.double(), out_ref, atol=1e-4):
            return "the fused op's output does not match dense attention"
        lse_stored = torch.empty(1, 6, 2, dtype=lse.dtype).transpose(1, 2).copy_(lse)  # (B, H, L) in (B, L, H) order
        grads = bwd(dout, q, k, v, out, lse_stored, 0.0, causal, attn_mask=attn_mask, scale=0.5)
        if not all(torch.allclose(g.double(), r, atol=1e-4) for g, r in zip(grads, grads_ref, strict=True)):
            return "the fused backward op's gradients do not match dense attention"
    q4 = torch.randn(1, 4, 6, 8, generator=gen)  # query heads 0-1 read KV head 0, heads 2-3 KV head 1
    out, _ = fwd(q4, k, v, 0.0, True, scale=0.5)
    k4, v4 = (x.double().repeat_interleave(2, dim=1) for x in (k, v))
    scores = (q4.double() @ k4.transpose(-1, -2) * 0.5).masked_fill(~causal_keep, float("-inf"))
    if not torch.allclose(out.double(), torch.softmax(scores, dim=-1) @ v4, atol=1e-4):
        return "the fused op does not share each KV head between consecutive query heads (GQA by head count)"
    return None


def _row_blocks(query: torch.Tensor, key: torch.Tensor):
    """Row ranges ``[r0, r1)`` of ``query`` whose score blocks hold at most :data:`PORTABLE_BLOCK` elements."""
    rows, per_row = query.shape[-2], max(1, query.shape[:-2].numel() * key.shape[-2])
    step = max(1, PORTABLE_BLOCK // per_row)
    return [(r0, min(r0 + step, rows)) for r0 in range(0, rows, step)]


def _block_scores(query, key, r0: int, r1: int, is_causal: bool, attn_mask, scale: float, dtype) -> torch.Tensor:
    """Masked, scaled scores of rows ``[r0, r1)``: ``(..., r, S)`` in ``dtype``; masked pairs are -inf."""
    scores = torch.matmul(query[..., r0:r1, :].to(dtype), key.to(dtype).transpose(-1, -2)) * scale
    if attn_mask is not None:
        scores = scores + attn_mask[..., r0:r1, :].to(dtype)
    if is_causal:  # top-left aligned, as the fused op
        rows = torch.arange(r0, r1, device=query.device).view(-1, 1)
        scores = scores.masked_fill(torch.arange(key.shape[-2], device=query.device) > rows, float("-inf"))
    return scores


def _repeat_kv(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(..., Hkv, S, D) -> (..., heads, S, D), query head ``h`` reading KV head ``h // (heads // Hkv)`` as the fused
    op does when given fewer KV heads than query heads."""
    return x if x.shape[-3] == heads else x.repeat_interleave(heads // x.shape[-3], dim=-3)


def portable_flash_forward(query, key, value, dropout_p=0.0, is_causal=False, *, attn_mask=None, scale=None):
    """The fused forward's contract in plain torch: ``(out (..., L, D) in query's dtype, lse (..., L))``.

    query: (..., H, L, D); key, value: (..., Hkv, S, D) with the same leading dims, ``H`` a multiple of ``Hkv``;
    attn_mask: additive, broadcastable to (..., H, L, S). A row that keeps no key gets output 0 and log-sum-exp -inf.
    """
    if dropout_p:
        raise ValueError("the portable flash path has no dropout")
    acc = torch.promote_types(query.dtype, torch.float32)
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    out = query.new_empty(query.shape)
    lse = torch.empty(query.shape[:-1], dtype=acc, device=query.device)
    key, value = _repeat_kv(key, query.shape[-3]), _repeat_kv(value, query.shape[-3])
    values = value.to(acc)
    for r0, r1 in _row_blocks(query, key):
        scores = _block_scores(query, key, r0, r1, is_causal, attn_mask, scale, acc)  # (..., r, S)
        lse[..., r0:r1] = torch.logsumexp(scores, dim=-1)
        probs = torch.exp(scores - lse[..., r0:r1, None]).nan_to_num_(0.0)  # empty rows: exp(nan) -> 0
        out[..., r0:r1, :] = torch.matmul(probs, values).to(query.dtype)
    return out, lse


def portable_flash_backward(grad_out, query, key, value, out, lse, dropout_p=0.0, is_causal=False, *,
                            attn_mask=None, scale=None):
    """The fused backward's contract in plain torch: ``(dq, dk, dv)`` from the forward's ``out`` and ``lse``."""
    if dropout_p:
        raise ValueError("the portable flash path has no dropout")
    acc = torch.promote_types(query.dtype, torch.float32)
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    dq = torch.empty(query.shape, dtype=acc, device=query.device)
    dk = torch.zeros(key.shape, dtype=acc, device=key.device)
    dv = torch.zeros(value.shape, dtype=acc, device=value.device)
    delta = (grad_out.to(acc) * out.to(acc)).sum(dim=-1)  # (..., L): rowsum(dO * O)
    keys, values = key.to(acc), value.to(acc)
    for r0, r1 in _row_blocks(query, key):
        scores = _block_scores(query, key, r0, r1, is_causal, attn_mask, scale, acc)  # (..., r, S)
        probs = torch.exp(scores - lse[..., r0:r1, None].to(acc)).nan_to_num_(0.0)
        dout = grad_out[..., r0:r1, :].to(acc)  # (..., r, D)
        dv += torch.matmul(probs.transpose(-1, -2), dout)
        dscores = probs * (torch.matmul(dout, values.transpose(-1, -2)) - delta[..., r0:r1, None]) * scale
        dq[..., r0:r1, :] = torch.matmul(dscores, keys)
        dk += torch.matmul(dscores.transpose(-1, -2), query[..., r0:r1, :].to(acc))
    return dq.to(query.dtype), dk.to(key.dtype), dv.to(value.dtype)

# Query positions per chunk (each chunk holds this many rows of every query head of a KV head). Each row also
# computes chunk - 1 masked keys, so short chunks waste less; long ones make fewer, larger kernel calls. Measured on
# a 2-core CPU in bfloat16, the sum over the 30 layers of SmolLM2's selected 50% plan (9 query / 3 KV heads, D=64,
# medians of 7): chunk 64 took 93, 262 and 740 ms at 496, 1008 and 2032 tokens, chunk 192 took 99, 286 and 857 ms,
# dense causal attention 108, 302 and 1026 ms; chunk 32, 96, 128 and 256 were in between. On synthetic spans (the
# same heads) at 4096 and 8192 tokens, in bfloat16 and float32, 64 was the fastest or within 3% of it, 192 up to
# 20% slower.
DEFAULT_CHUNK = 64


@dataclass(frozen=True)
class Segment:
    """Keys ``[start, stop)`` of one chunk, with an additive mask ``(group * rows, stop - start)`` or None."""

    start: int
    stop: int
    mask: torch.Tensor | None


@dataclass(frozen=True)
class Chunk:
    """Query rows ``[q0, q1)`` and the key segments they attend to."""

    q0: int
    q1: int
    segments: tuple[Segment, ...]


@functools.lru_cache(maxsize=16)
def chunk_plan(n: int, span: int, sink: int, chunk: int, group: int, dtype: torch.dtype) -> tuple[Chunk, ...]:
    """The segments of every query chunk for one head at length ``n``; masks are shared across chunks."""
    masks: dict[tuple, tuple | None] = {}

    def segment(q0: int, q1: int, start: int, stop: int) -> Segment | None:
        in_sink = stop <= sink
        # The token mask of a segment depends only on offsets relative to the chunk (sink keys ignore the band).
        key = (q1 - q0, start - q0, stop - q0, in_sink)
        if key not in masks:
            i = torch.arange(q0, q1).view(-1, 1)
            j = torch.arange(start, stop).view(1, -1)
            keep = j <= i
            if not in_sink:
                keep &= i - j < span
            if not keep.any():
                masks[key] = None
            elif keep.all():
                masks[key] = (None,)
            else:
                additive = torch.zeros(keep.shape, dtype=dtype).masked_fill_(~keep, float("-inf"))
                masks[key] = (additive.repeat(group, 1),)  # (group * rows, keys): rows of the folded heads
        found = masks[key]
        return None if found is None else Segment(start, stop, *found)

    chunks = []
    for q0 in range(0, n, chunk):
        q1 = min(q0 + chunk, n)
        band_first = max(0, q0 - span + 1)  # band start of the chunk's first row
        band_last = max(0, q1 - span)  # band start of its last row
        cuts = {0, min(sink, q1), q0, q1}
        if span > 0:
            cuts |= {band_first, band_last}
        cuts = sorted(c for c in cuts if 0 <= c <= q1)
        segments = []
        for start, stop in zip(cuts, cuts[1:], strict=False):
            if start >= sink and (span == 0 or stop <= band_first):
                continue  # between the sink and the band: kept by no row
            seg = segment(q0, q1, start, stop)
            if seg is not None:
                segments.append(seg)
        chunks.append(Chunk(q0, q1, tuple(segments)))
    return tuple(chunks)


def _rows(x: torch.Tensor, q0: int, q1: int) -> torch.Tensor:
    """(B, Hkv, G, N, D) -> rows [q0, q1) folded to (B, Hkv, G * r, D)."""
    b, h, g, _, d = x.shape
    return x[:, :, :, q0:q1].reshape(b, h, g * (q1 - q0), d)


def _unfold(x: torch.Tensor, g: int) -> torch.Tensor:
    """(B, Hkv, G * r, ...) -> (B, Hkv, G, r, ...)."""
    return x.unflatten(2, (g, x.shape[2] // g))


def _window_mask(rows: int, span: int, group: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask ``(group * rows, span + rows - 1)`` of a chunk's band window, cached (a model's layers share
    it).

    Row ``r`` of a chunk is query ``i0 + r``; window column ``w`` is key ``i0 - span + 1 + w``; the row keeps it
    iff ``r <= w <= r + span - 1``, the same for every chunk.
    """

    def build():
        r = torch.arange(rows).view(-1, 1)
        w = torch.arange(span + rows - 1).view(1, -1)
        keep = (w >= r) & (w <= r + span - 1)
        return torch.zeros(keep.shape, dtype=dtype).masked_fill_(~keep, float("-inf")).repeat(group, 1)

    return cached(("band_window", rows, span, group, dtype), build)


def _sink_mask(t: int, c: int, first: int, n_sink: int, group: int, dtype: torch.dtype) -> torch.Tensor | None:
    """Additive mask ``(T, 1, group * c, n_sink)`` of the sink keys for rows ``i = span + first + t*c + r``, cached.

    Row ``i`` keeps sink key ``j`` iff ``j <= i - span`` (nearer keys are in its band window), so only rows
    near the start are masked; None when none is.
    """

    def build():
        keep = torch.arange(n_sink).view(1, 1, 1, -1) <= first + torch.arange(t * c).view(t, 1, c, 1)
        if keep.all():
            return None
        return torch.zeros(keep.shape, dtype=dtype).masked_fill_(~keep, float("-inf")).repeat(1, 1, group, 1)

    return cached(("band_sink", t, c, first, n_sink, group, dtype), build)


def _band_forward(q, k, v, span: int, sink: int, chunk: int, scale: float):
    """Output ``(B, Hkv, G, N, D)`` and log-sum-exp ``(B, Hkv, G, N)`` (in the flash kernel's storage order).

    Precision. The rows inside the span are plain causal attention, run in the inputs' dtype by the op dense
    attention runs: they equal dense attention's output bit for bit (a head the plan keeps whole computes exactly
    what dense computes). The other rows merge a band part and a sink part; with low-precision inputs they are
    computed in float32 and rounded once, after the merge. (Given bfloat16 inputs the fused op rounds its
    probabilities before multiplying by V, and rounding each part before merging adds to that: about 40% of those
    rows' outputs came out up to 12 units in the last place off, against 0.005% one unit off in float32. The op ran
    as fast in float32 on a 2-core CPU.)
    """
    b, h, g, n, d = q.shape
    out = q.new_empty(q.shape)
    work = torch.promote_types(q.dtype, torch.float32)
    lse = torch.empty(b, n, h, g, dtype=work).permute(0, 2, 3, 1)  # (B, Hkv, G, N)
    prefix = min(span, n)  # rows i < span keep every key j <= i: plain causal attention, one call (GQA by count)
    if prefix:
        o, l_ = _flash_fwd(q[:, :, :, :prefix].reshape(b, h * g, prefix, d), k[:, :, :prefix], v[:, :, :prefix], 0.0,
                           True, scale=scale)  # (B, Hkv * G, P, D), (B, Hkv * G, P)
        out[:, :, :, :prefix], lse[:, :, :, :prefix] = o.unflatten(1, (h, g)), l_.unflatten(1, (h, g))
    if prefix == n:
        return out, lse
    q, k, v = (x.to(work) for x in (q, k, v))  # no copy when already float32
    c = min(chunk, max(span, 16))
    full = (n - prefix) // c
    if full:  # whole chunks, then the shorter last one: every window ends inside the sequence
        _band_chunks(q, k, v, out, lse, prefix, full, c, span, sink, scale)
    if n - prefix - full * c:
        _band_chunks(q, k, v, out, lse, prefix + full * c, 1, n - prefix - full * c, span, sink, scale)
    return out, lse


def _band_chunks(q, k, v, out, lse, i0: int, t: int, c: int, span: int, sink: int, scale: float) -> None:
    """Rows ``[i0, i0 + t*c)`` (``i0 >= span``) as ``t`` chunks of ``c``, in one batched call per key set.

    Chunk ``tau`` attends to its window ``[i0 + tau*c - span + 1, i0 + tau*c + c)`` (a strided view of K/V, no
    copy) and, when ``sink > 0``, to the sink ``[0, sink)``; the two are merged by their log-sum-exps and written
    straight into ``out``.
    """
    b, h, g, n, d = q.shape
    bh, width = b * h, span + c - 1
    qc = q[:, :, :, i0:i0 + t * c].reshape(b, h, g, t, c, d).permute(3, 0, 1, 2, 4, 5).reshape(t, bh, g * c, d)
    kf, vf = k.reshape(bh, n, d), v.reshape(bh, n, d)

    def windows(x):  # (T, B*Hkv, width, D): chunk tau's band keys, as a view of x
        return x.as_strided((t, bh, width, d), (c * d, n * d, d, 1), x.storage_offset() + (i0 - span + 1) * d)

    parts = []  # (out (T, B*Hkv, G*c, D), lse (T, B*Hkv, G*c)) of the band window, then of the sink
    if span:
        parts.append(_flash_fwd(qc, windows(kf), windows(vf), 0.0, False,
                                attn_mask=_window_mask(c, span, g, q.dtype), scale=scale))
    n_sink = min(sink, n)
    if n_sink:
        keys, values = (x[:, :n_sink].expand(t, bh, n_sink, d) for x in (kf, vf))  # no copy
        parts.append(_flash_fwd(qc, keys, values, 0.0, False, scale=scale,
                                attn_mask=_sink_mask(t, c, i0 - span, n_sink, g, q.dtype)))
    target = out[:, :, :, i0:i0 + t * c].view(b, h, g, t, c, d).permute(3, 0, 1, 2, 4, 5).view(t, bh, g, c, d)
    if len(parts) == 1:
        o, l_ = parts[0]
        target.copy_(o.view_as(target))
    else:
        (o, l_), (o_sink, l_sink) = parts
        w_sink = torch.sigmoid(l_sink - l_).unsqueeze(-1)  # softmax weight of the sink part
        l_ = torch.logaddexp(l_, l_sink)
        if target.dtype == o.dtype:
            torch.lerp(o.view_as(target), o_sink.view_as(target), w_sink.view(t, bh, g, c, 1), out=target)
        else:  # merged in float32, rounded once
            target.copy_(torch.lerp(o, o_sink, w_sink).view_as(target))
    lse[:, :, :, i0:i0 + t * c] = l_.view(t, b, h, g, c).permute(1, 2, 3, 0, 4).reshape(b, h, g, t * c)


class _BandAttention(torch.autograd.Function):
    """Sink-plus-band attention for query heads folded per KV head; one span for all of them."""

    @staticmethod
    def forward(ctx, q, k, v, span: int, sink: int, chunk: int, scale: float):
        # q: (B, Hkv, G, N, D); k, v: (B, Hkv, N, D)
        out, lse = _band_forward(q, k, v, span, sink, chunk, scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.span, ctx.sink, ctx.chunk, ctx.scale = span, sink, chunk, scale
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        b, h, g, n, _ = q.shape
        plan = chunk_plan(n, ctx.span, ctx.sink, ctx.chunk, g, q.dtype)
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        dout = dout.contiguous()
        for c in plan:
            qc, oc, doc = (_rows(x, c.q0, c.q1) for x in (q, out, dout))
            # (B, Hkv, G, r) -> (B, Hkv, G * r) with the flash kernel's (B, rows, heads) storage order
            lc = lse[:, :, :, c.q0:c.q1].permute(0, 2, 3, 1).reshape(b, -1, h).transpose(1, 2)
            dqc = torch.zeros_like(qc)
            for s in c.segments:
                gq, gk, gv = _flash_bwd(doc, qc, k[:, :, s.start:s.stop], v[:, :, s.start:s.stop], oc, lc, 0.0,
                                        False, attn_mask=s.mask, scale=ctx.scale)
                dqc += gq
                dk[:, :, s.start:s.stop] += gk
                dv[:, :, s.start:s.stop] += gv
            dq[:, :, :, c.q0:c.q1] = _unfold(dqc, g)
        return dq, dk, dv, None, None, None, None


def moa_attention_cpu(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spans: torch.Tensor, sink: int,
                      scale: float | None = None, chunk: int = DEFAULT_CHUNK) -> torch.Tensor:
    """Exact sink-plus-band attention on CPU tensors, differentiable.

    q: (B, Hq, N, D); k, v: (B, Hkv, N, D); spans: (Hq,) ints at this N. Query heads that share a KV head and a
    span are computed together; a head with span 0 and no sink gets zeros, as in the reference.
    """
    b, hq, n, d = q.shape
    hkv = k.shape[1]
    scale = d**-0.5 if scale is None else float(scale)
    buckets, inverse = _bucket_plan(tuple(min(int(s), n) for s in spans.tolist()), hkv)
    outs = []
    for bucket in buckets:
        qs, ks, vs = bucket.take(q, k, v)
        if bucket.span == 0 and sink == 0:
            outs.append(qs * 0)  # no key kept: zeros, still connected to the graph (zero gradient)
            continue
        g = bucket.group
        qs = qs.reshape(b, ks.shape[1], g, n, d)  # (B, Hkv', G', N, D)
        out = _BandAttention.apply(qs, ks.contiguous(), vs.contiguous(), bucket.span, sink, chunk, scale)
        outs.append(out.reshape(b, ks.shape[1] * g, n, d))
    out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)  # (B, Hq, N, D), heads in bucket order
    return out if inverse is None else out[:, inverse]


@dataclass(frozen=True)
class Bucket:
    """KV heads that run in one call: each with ``group`` of its query heads, all at one span."""

    span: int
    group: int
    kv_heads: tuple[int, ...]
    query_heads: tuple[int, ...]
    contiguous: bool
    """Whether the heads are one run of whole groups, so that slicing (no copy) selects them."""

    def take(self, q, k, v):
        """This bucket's ``(q, k, v)``: views where :attr:`contiguous`, else gathered copies."""
        if self.contiguous:
            k0, k1, q0, q1 = self.kv_heads[0], self.kv_heads[-1] + 1, self.query_heads[0], self.query_heads[-1] + 1
            return q[:, q0:q1], k[:, k0:k1], v[:, k0:k1]
        return q[:, list(self.query_heads)], k[:, list(self.kv_heads)], v[:, list(self.kv_heads)]


@functools.lru_cache(maxsize=4096)  # a plan has one span tuple per layer and length
def _bucket_plan(span_list: tuple[int, ...], hkv: int) -> tuple[tuple[Bucket, ...], torch.Tensor | None]:
    """The calls for one layer's spans: (KV head, its query heads with one span) bucketed by (span, count), and the
    permutation that puts the buckets' output heads back in order (None when they already are)."""
    group = len(span_list) // hkv
    members: dict[tuple[int, int], list[tuple[int, list[int]]]] = {}
    for kv in range(hkv):
        heads = range(kv * group, (kv + 1) * group)
        for s in sorted({span_list[h] for h in heads}):
            same = [h for h in heads if span_list[h] == s]
            members.setdefault((s, len(same)), []).append((kv, same))
    buckets = []
    for (s, g), found in members.items():
        kv_heads = tuple(kv for kv, _ in found)
        query_heads = tuple(h for _, hs in found for h in hs)
        contiguous = (g == group and kv_heads == tuple(range(kv_heads[0], kv_heads[-1] + 1)))
        buckets.append(Bucket(s, g, kv_heads, query_heads, contiguous))
    order = [h for bucket in buckets for h in bucket.query_heads]
    inverse = None if order == list(range(len(span_list))) else torch.tensor(order).argsort()
    return tuple(buckets), inverse


def moa_decode_attention_torch(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                               valid_lengths: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """One decode step as a masked matmul over each KV head's valid slots; GQA by folding query heads.

    q: (B, Hq, 1, D); k_cache, v_cache: (B, Hkv, C, D); valid_lengths: (Hkv,). Returns (B, Hq, 1, D).
    """
    b, hq, _, d = q.shape
    hkv, cap = k_cache.shape[1], k_cache.shape[2]
    scale = d**-0.5 if scale is None else float(scale)
    qg = q.reshape(b, hkv, hq // hkv, d)  # (B, Hkv, G, D)
    scores = torch.matmul(qg, k_cache.transpose(-1, -2)) * scale  # (B, Hkv, G, C)
    valid = torch.arange(cap, device=q.device) < valid_lengths.to(q.device).view(-1, 1, 1)  # (Hkv, 1, C)
    probs = torch.softmax(scores.float().masked_fill(~valid, float("-inf")), dim=-1).nan_to_num(0.0)
    return torch.matmul(probs.to(v_cache.dtype), v_cache).reshape(b, hq, 1, d)  # (B, Hq, 1, D)
