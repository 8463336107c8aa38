"""Decode attention over the per-head packed KV cache of :mod:`kernels.kv_cache`.

Layout (the contract a fused kernel over the packed buffer should match): ``k_packed``/``v_packed`` are
``[B, T, D]``; KV head ``h`` owns slots ``offsets[h] .. offsets[h+1] - 1`` and uses the first
``valid_lengths[h]`` of them, in any order (RoPE is already applied, so slot order does not matter). Query head
``q`` reads KV head ``q // (Hq / Hkv)``. An optional ``keep`` mask ``[Hq, T]`` narrows what each query head sees;
the cache needs it only when query heads of one GQA group have different spans.

Backends. ``triton`` (and ``auto`` on CUDA) runs the split-KV kernel of :mod:`kernels.triton_decode` over the
packed buffer itself: one launch per layer (the merge fused in), no loop over heads, the ``keep`` mask applied
inside the kernel. Pass ``valid_lengths`` as an int tensor on the cache's device (``PerHeadLayer.lengths``) and nothing
synchronises with the host, so the step can be captured in a CUDA graph. ``torch`` (and ``auto`` elsewhere) scores
the whole packed buffer in one matmul per layer under an additive mask of each query head's own visible slots
(:func:`biased_decode_attention`); the runtime (:func:`layer_decode_attention`) takes that mask from the cache
layer, which edits it in place as tokens arrive, and :func:`packed_decode_attention_torch` builds it from the valid
lengths and ``keep``. ``reference``, the oracle, calls :func:`kernels.moa_decode_attention`
once per KV head on that head's slots as a one-KV-head cache (once on a ``[B, Hkv, C, D]`` view when every head has
the same capacity); with ``keep``, a dense masked matmul per KV head.
"""

from __future__ import annotations

import functools

import torch

import kernels


def packed_decode_attention(q: torch.Tensor, k_packed: torch.Tensor, v_packed: torch.Tensor, offsets, valid_lengths,
                            *, keep: torch.Tensor | None = None, scale: float | None = None,
                            backend: str = "auto") -> torch.Tensor:
    """Attention of one new token per sequence over a packed per-head cache.

    q: (B, Hq, 1, D); k_packed, v_packed: (B, T, D); offsets: Hkv + 1 host ints (static for a layer);
    valid_lengths: Hkv ints, a list or an int tensor (on q's device for the sync-free Triton path);
    keep: optional (Hq, T) bool. Returns (B, Hq, 1, D) in q's dtype.
    """
    if backend not in kernels.DECODE_BACKENDS:
        raise ValueError(f"unknown decode backend {backend!r}; expected one of {kernels.DECODE_BACKENDS}")
    if backend == "triton" or (backend == "auto" and q.is_cuda):
        from kernels.triton_decode import packed_decode_attention_triton

        return packed_decode_attention_triton(q, k_packed, v_packed, offsets, valid_lengths, keep=keep, scale=scale)
    if backend in ("torch", "auto"):
        return packed_decode_attention_torch(q, k_packed, v_packed, offsets, valid_lengths, keep=keep, scale=scale)
    offsets, valid_lengths = [int(x) for x in offsets], [int(n) for n in valid_lengths]
    hkv = len(valid_lengths)
    group = q.shape[1] // hkv
    capacities = {offsets[h + 1] - offsets[h] for h in range(hkv)}
    if keep is None and len(capacities) == 1:  # equal heads: the packed buffer is a (B, Hkv, C, D) cache
        shape = (hkv, capacities.pop())
        return kernels.moa_decode_attention(q, k_packed.unflatten(1, shape), v_packed.unflatten(1, shape),
                                            torch.tensor(valid_lengths), backend=backend, scale=scale)
    outs = []
    for h, n in enumerate(valid_lengths):
        lo, heads = offsets[h], slice(h * group, (h + 1) * group)
        k = k_packed[:, lo:lo + n].unsqueeze(1)  # (B, 1, n, D)
        v = v_packed[:, lo:lo + n].unsqueeze(1)
        if keep is None:
            outs.append(kernels.moa_decode_attention(q[:, heads], k, v, torch.tensor([n]), backend=backend,
                                                     scale=scale))
        else:
            outs.append(masked_decode_attention(q[:, heads], k, v, keep[heads, lo:lo + n], scale=scale))
    return torch.cat(outs, dim=1)  # (B, Hq, 1, D)


def packed_decode_attention_torch(q: torch.Tensor, k_packed: torch.Tensor, v_packed: torch.Tensor, offsets,
                                  valid_lengths, *, keep: torch.Tensor | None = None,
                                  scale: float | None = None) -> torch.Tensor:
    """The packed decode step in three torch calls, whatever the heads' capacities: every query head scores every
    slot of the buffer, and a mask keeps its own KV head's valid slots (and ``keep``).

    Decode is memory-bound: one matmul reads each cached key once for all query heads, where a loop over KV heads
    pays a handful of small calls per head. The extra scores (other heads' slots) cost ``Hq * T`` multiply-adds of
    size ``D``, nothing next to reading the buffer. Same arguments and result as :func:`packed_decode_attention`.
    """
    hq = q.shape[1]
    slot_head, slot_local, foreign = _slot_index(tuple(int(x) for x in offsets), hq, q.device)  # (T,), (T,), (Hq, T)
    lengths = torch.as_tensor(valid_lengths, device=q.device)  # (Hkv,)
    hidden = foreign | (slot_local >= lengths[slot_head])  # (Hq, T): another head's slot, or not filled yet
    if keep is not None:
        hidden |= ~keep
    bias = torch.zeros(hidden.shape, dtype=torch.float32, device=q.device).masked_fill_(hidden, float("-inf"))
    return biased_decode_attention(q, k_packed, v_packed, bias, scale=scale)


def biased_decode_attention(q: torch.Tensor, k_packed: torch.Tensor, v_packed: torch.Tensor, bias: torch.Tensor,
                            *, scale: float | None = None) -> torch.Tensor:
    """The packed decode step given its additive mask: every query head scores every slot, plus ``bias``.

    q: (B, Hq, 1, D); k_packed, v_packed: (B, T, D); bias: (Hq, T) float32, 0 where a query head sees a slot and
    -inf elsewhere (:meth:`kernels.kv_cache.PerHeadLayer.decode_bias` keeps it up to date between steps). Three
    calls in float32 (scores with the mask added, softmax, weighted sum), rounded to q's dtype once. Returns
    (B, Hq, 1, D) in q's dtype; a head that sees no slot gets 0.

    A low-precision cache is cast to float32 for the step, which gives the fused flash op's precision (dense
    attention's decode). Scores rounded to bfloat16 by a bf16 matmul, and probabilities rounded before the weighted
    sum, put the output 5-15x further from the exact result at logits of about 20 (max error 0.019 against 0.0035
    at 1500 slots). The casts make the call 35% slower at 1500 slots (0.077 against 0.057 ms per layer, on a 2-core
    CPU) and 2.3x at 6000 (0.24 against 0.11 ms), a few percent of a whole decode step.
    """
    b, hq, _, d = q.shape
    scale = d**-0.5 if scale is None else float(scale)
    acc = torch.promote_types(q.dtype, torch.float32)
    scores = torch.baddbmm(bias.to(acc), q.reshape(b, hq, d).to(acc), k_packed.to(acc).transpose(1, 2),
                           alpha=scale)  # (B, Hq, T)
    probs = torch.softmax(scores, dim=-1).nan_to_num_(0.0)
    return torch.bmm(probs, v_packed.to(acc)).view(b, hq, 1, d).to(q.dtype)  # (B, Hq, 1, D)


def layer_decode_attention(q: torch.Tensor, layer, *, scale: float | None = None,
                           backend: str = "auto") -> torch.Tensor:
    """One decode step over a :class:`kernels.kv_cache.PerHeadLayer` that holds the new token: the torch path
    (``torch``, and ``auto`` off CUDA) reads the layer's incrementally kept mask; the others get its valid lengths
    and ``keep`` mask (:func:`packed_decode_attention`)."""
    if backend == "torch" or (backend == "auto" and not q.is_cuda):
        return biased_decode_attention(q, layer.keys, layer.values, layer.decode_bias(), scale=scale)
    return packed_decode_attention(q, layer.keys, layer.values, layer.offsets, layer.lengths,
                                   keep=layer.decode_keep(), scale=scale, backend=backend)


@functools.lru_cache(maxsize=256)
def _slot_index(offsets: tuple[int, ...], heads: int, device: torch.device):
    """For each packed slot: the KV head owning it ``[T]`` and its index among that head's slots ``[T]``; and
    which slots belong to another KV head than each query head's ``[Hq, T]`` bool."""
    counts = torch.tensor([hi - lo for lo, hi in zip(offsets, offsets[1:], strict=False)], device=device)
    head = torch.repeat_interleave(torch.arange(counts.numel(), device=device), counts)
    local = torch.arange(offsets[-1], device=device) - torch.tensor(offsets[:-1], device=device)[head]
    owner = torch.arange(heads, device=device) // (heads // counts.numel())  # (Hq,): each query head's KV head
    return head, local, owner.view(-1, 1) != head.view(1, -1)


def masked_decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor,
                            *, scale: float | None = None) -> torch.Tensor:
    """Dense single-query attention of ``G`` query heads over one KV head's tokens, under a per-query-head mask.

    q: (B, G, 1, D); k, v: (B, 1, n, D); keep: (G, n) bool. Returns (B, G, 1, D); a head keeping nothing gets 0.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale  # (B, G, 1, n)
    scores = scores.masked_fill(~keep.unsqueeze(1), float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    return torch.matmul(probs, v.float()).to(q.dtype)  # (B, G, 1, D)
