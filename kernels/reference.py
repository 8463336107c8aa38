"""Dense masked attention under the elastic pattern: the oracle every other backend is tested against."""

from __future__ import annotations

import torch

from kernels.pattern import head_masks


def moa_attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spans: torch.Tensor, sink: int, scale: float | None = None
) -> torch.Tensor:
    """Softmax attention with each query head's sink-plus-band mask, computed densely.

    q: (B, Hq, N, D); k, v: (B, Hkv, N, D) with Hq a multiple of Hkv; spans: (Hq,) ints at this N.
    Returns (B, Hq, N, D) in q's dtype. Rows are never empty (the diagonal is always kept when span >= 1);
    a head with span 0 and no sink key gets zeros.
    """
    b, hq, n, d = q.shape
    hkv = k.shape[1]
    if hq % hkv:
        raise ValueError(f"query heads {hq} are not a multiple of kv heads {hkv}")
    group = hq // hkv
    scale = d**-0.5 if scale is None else scale
    k = k.repeat_interleave(group, dim=1)  # (B, Hq, N, D)
    v = v.repeat_interleave(group, dim=1)
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale  # (B, Hq, N, N)
    keep = head_masks(n, spans, sink, device=q.device)  # (Hq, N, N)
    scores = scores.masked_fill(~keep, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    return torch.matmul(probs, v.float()).to(q.dtype)  # (B, Hq, N, D)
