"""Blockwise attention influence: the first-order loss change from masking each attention entry.

For query ``i`` and key ``j`` of one head, with ``A`` the attention probabilities and ``G = dL/dA``,

    E_ij = A_ij * (D_i - G_ij) / (1 - A_ij),   D_i = sum_n A_in G_in,

is the first-order change of the loss when ``A_ij`` is set to 0 and the row renormalised. Where ``A_ij == 1``
in working precision (always on row 0, whose only key is itself) masking the entry leaves nothing to
renormalise, so ``E_ij`` is defined as 0.

Nothing ``N x N`` is stored across layers: one forward+backward pass stashes ``q, k, v`` and ``dO`` per layer
(:mod:`pipeline.profile.hooks`); then, per layer and per query block of ``b`` rows, ``A`` is recomputed from
``q k^T`` over the causal keys only, ``G_ij = dO_i . v_j`` and ``D_i = dO_i . O_i``. The largest temporary is
one ``[Hq, b, N]`` block row.

Two block sums come out of the same pass:

- ``influence``, the contract's sum of ``|E_ij|`` over each block: how much attention value moves there at all;
- ``net``, the signed sum of ``E_ij``: to first order, the loss change from masking the whole block at once,
  which is what a rule does. Per-entry changes of opposite sign cancel in it. Summed over the hundreds of context
  rows of a long sample, ``|E|`` is dominated by such cancelling terms (on SmolLM2 the net mass is 30-100x
  smaller), so the net sums are the better estimate of what a rule loses; ``stage=rules`` uses them by default.
"""

from __future__ import annotations

import math

import torch

from pipeline.plan import GRANULARITIES
from pipeline.profile.hooks import LayerStash, capture_attention


def entry_influence(probs: torch.Tensor, grads: torch.Tensor, row_dot: torch.Tensor) -> torch.Tensor:
    """Token-level ``E`` from ``A`` and ``G`` ``(..., m, n)`` and ``D`` ``(..., m)``; 0 where ``A == 1``."""
    return renormalised_change(probs, row_dot.unsqueeze(-1) - grads)


def renormalised_change(probs: torch.Tensor, row_dot_minus_grads: torch.Tensor) -> torch.Tensor:
    """``E = A (D - G) / (1 - A)`` given ``A`` and ``D - G``, overwriting the latter; 0 where ``A == 1``.

    The division yields +-inf or nan exactly where ``1 - A == 0`` (``1 - A >= 2^-24`` elsewhere in float32, so
    finite inputs cannot overflow), and those entries are then set to 0.
    """
    e = row_dot_minus_grads.mul_(probs).div_(1.0 - probs)
    return e.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)


def tile_influence(stash: LayerStash, start: int, stop: int, dtype=torch.float32) -> torch.Tensor:
    """Token-level ``E`` of query rows ``start:stop`` against their causal keys ``0:stop``: ``(Hq, m, stop)``."""
    hq, _, d = stash.q.shape
    hkv = stash.k.shape[0]
    group = hq // hkv  # query head h reads KV head h // group (the HF repeat_kv layout)
    m = stop - start
    q = (stash.q[:, start:stop].to(dtype) * stash.scale).reshape(hkv, group * m, d)  # (Hkv, group*m, D)
    k = stash.k[:, :stop].to(dtype)  # (Hkv, stop, D)
    v = stash.v[:, :stop].to(dtype)
    grad_out = stash.grad_out[:, start:stop].to(dtype).reshape(hkv, group * m, d)
    scores = (q @ k.transpose(1, 2)).view(hq, m, stop)  # (Hq, m, stop)
    # Only the diagonal block reaches past the causal boundary.
    diagonal = torch.ones(m, m, dtype=torch.bool, device=q.device).triu_(1)
    scores[..., start:stop].masked_fill_(diagonal, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    row_dot = stash.row_dot[:, start:stop].to(dtype).reshape(hkv, group * m, 1)
    # D_i - G_ij with G_ij = dO_i . v_j, fused into one batched matmul.
    row_dot_minus_grads = torch.baddbmm(row_dot, grad_out, v.transpose(1, 2), alpha=-1.0).view(hq, m, stop)
    return renormalised_change(probs, row_dot_minus_grads)


def block_sums(values: torch.Tensor, block_size: int) -> torch.Tensor:
    """Sum ``(..., m, n)`` over all rows and over key blocks of ``block_size`` (last one ragged): ``(..., nb)``."""
    return key_block_sums(values.sum(-2), block_size)


def key_block_sums(cols: torch.Tensor, block_size: int) -> torch.Tensor:
    """Sum ``(..., n)`` over key blocks of ``block_size`` (the last one ragged): ``(..., nb)``."""
    n = cols.shape[-1]
    nb = math.ceil(n / block_size)
    cols = torch.nn.functional.pad(cols, (0, nb * block_size - n))
    return cols.unflatten(-1, (nb, block_size)).sum(-1)


def group_heads(per_query_head: torch.Tensor, num_kv_heads: int, granularity: str) -> torch.Tensor:
    """``[L, Hq, ...]`` as is for ``"head"``; summed over each KV group's query heads for ``"kv_head"``."""
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    if granularity == "head":
        return per_query_head
    layers, hq = per_query_head.shape[:2]
    return per_query_head.view(layers, num_kv_heads, hq // num_kv_heads, *per_query_head.shape[2:]).sum(2)


def layer_influences(stash: LayerStash, block_size: int, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Block sums of ``|E|`` and of ``E`` for one layer, per query head: two ``(Hq, nb, nb)``, one block row at a
    time."""
    hq, n, _ = stash.q.shape
    nb = math.ceil(n / block_size)
    absolute = torch.zeros(hq, nb, nb, dtype=dtype, device=stash.q.device)
    net = torch.zeros_like(absolute)
    for row in range(nb):
        start, stop = row * block_size, min(n, (row + 1) * block_size)
        tile = tile_influence(stash, start, stop, dtype)  # (Hq, m, stop)
        cols = torch.linalg.vector_norm(tile, ord=1, dim=-2)  # (Hq, stop): sum_i |E_ij| in one pass
        absolute[:, row, : row + 1] = key_block_sums(cols, block_size)
        net[:, row, : row + 1] = key_block_sums(tile.sum(-2), block_size)
    return absolute, net


def attention_influence(model, input_ids: torch.Tensor, loss_mask: torch.Tensor, block_size: int = 64,
                        granularity: str = "kv_head", dtype=torch.float32, answer_weight: float = 0.0) -> torch.Tensor:
    """Block sums of ``|E_ij|`` for one sample: ``[L, H, nb, nb]``, ``nb = ceil(n / block_size)``.

    ``input_ids`` and ``loss_mask`` are ``[n]`` (one unpadded sequence); the loss is
    :func:`pipeline.profile.loss.response_loss` with ``answer_weight``. Rows are query blocks, columns key blocks (lower triangular).
    ``H`` is the number of KV heads for ``granularity="kv_head"`` (sum over each group's query heads) and of
    query heads for ``"head"``. ``dtype`` is the recomputation precision (float32; float64 in tests).
    """
    return attention_influences(model, input_ids, loss_mask, block_size, granularity, dtype, answer_weight)[0]


def attention_influences(model, input_ids: torch.Tensor, loss_mask: torch.Tensor, block_size: int = 64,
                         granularity: str = "kv_head", dtype=torch.float32,
                         answer_weight: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`attention_influence` and the signed block sums of ``E_ij`` from the same pass: two
    ``[L, H, nb, nb]``."""
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    stashes = capture_attention(model, input_ids, loss_mask, answer_weight)
    num_kv_heads = stashes[0].k.shape[0]
    absolute, net = [], []
    while stashes:
        layer_abs, layer_net = layer_influences(stashes.pop(0), block_size, dtype)  # frees each stash when done
        absolute.append(layer_abs)
        net.append(layer_net)
    return (group_heads(torch.stack(absolute), num_kv_heads, granularity),
            group_heads(torch.stack(net), num_kv_heads, granularity))


def token_influence(model, input_ids: torch.Tensor, loss_mask: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """Signed token-level ``E`` for one sample, ``[L, Hq, n, n]`` (zero above the diagonal). For small ``n`` only."""
    stashes = capture_attention(model, input_ids, loss_mask)
    n = input_ids.numel()
    return torch.stack([tile_influence(stash, 0, n, dtype) for stash in stashes])
