"""Decode attention over the per-head packed KV cache of :mod:`kernels.kv_cache`.

Layout (the contract a fused kernel over the packed buffer should match): ``k_packed``/``v_packed`` are
``[B, T, D]``; KV head ``h`` owns slots ``offsets[h] .. offsets[h+1] - 1`` and uses the first
``valid_lengths[h]`` of them, in any order (RoPE is already applied, so slot order does not matter). Query head
``q`` reads KV head ``q // (Hq / Hkv)``. An optional ``keep`` mask ``[Hq, T]`` narrows what each query head sees;
the cache needs it only when query heads of one GQA group have different spans.

This implementation calls :func:`kernels.moa_decode_attention` (``backend`` is one of its decode backends):
once on a ``[B, Hkv, C, D]`` view when every head has the same capacity, otherwise once per KV head on that
head's slots as a one-KV-head cache, so no padding is ever materialised. Valid lengths travel as host tensors,
so the per-call argument checks never synchronise with the GPU. With ``keep``, a dense masked matmul in torch.
"""

from __future__ import annotations

import torch

import kernels


def packed_decode_attention(q: torch.Tensor, k_packed: torch.Tensor, v_packed: torch.Tensor, offsets, valid_lengths,
                            *, keep: torch.Tensor | None = None, scale: float | None = None,
                            backend: str = "auto") -> torch.Tensor:
    """Attention of one new token per sequence over a packed per-head cache.

    q: (B, Hq, 1, D); k_packed, v_packed: (B, T, D); offsets: Hkv + 1 ints; valid_lengths: Hkv ints;
    keep: optional (Hq, T) bool. Returns (B, Hq, 1, D) in q's dtype.
    """
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
