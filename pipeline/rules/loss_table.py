"""Influence mass outside a rule's token-level mask, from block influence, via sums over block diagonals.

Apportioning rule: the profile stores one influence value per (query block, key block), the sum over that
block's causal token pairs (``j <= i``; entries above the block diagonal are ignored). Each value is spread
uniformly over the block's causal pairs, so a block that a rule keeps in part loses the fraction of its causal
pairs the token mask of :mod:`kernels.pattern` drops. Blocks are ``block_size`` square except the last row and
column when ``N`` is not a multiple of it.

Speed: a full block at block-diagonal offset ``d`` (``d = query block - key block``) that holds no sink key
loses a fraction that depends only on ``(d, span)``. Those blocks are summed per diagonal once per length
(``[L, H, nb]``), so scoring ``R`` spans costs ``O(L H nb R)`` instead of a mask per rule. The few remaining
blocks (sink key columns, the ragged last row) are scored one by one with the same closed form.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from kernels.pattern import attention_density, kv_density, spans_at


def band_pairs(delta, rows, cols, span) -> torch.Tensor:
    """``#{(a, c) : 0 <= a < rows, 0 <= c < cols, 0 <= delta + a - c < span}`` (int64 tensors, broadcast).

    Counts the kept band pairs of a block whose first query is ``delta`` tokens after its first key.
    """
    return _at_most(delta, rows, cols, span - 1) - _at_most(delta, rows, cols, -1)


def _at_most(delta, rows, cols, t):
    """``#{(a, c) : delta + a - c <= t}``: for each row ``a`` that is ``clamp(cols + t - delta - a, 0, cols)``."""
    u = cols + t - delta
    return _tri(u) - _tri(u - rows) - _tri(u - cols) + _tri(u - cols - rows)


def _tri(x):
    x = x.clamp(min=0)
    return x * (x + 1) // 2


@dataclass
class BlockInfluence:
    """One length's block influence, reduced to per-diagonal sums plus the irregular blocks."""

    n: int
    block: int
    sink: int
    diagonals: torch.Tensor  # (L, H, nb) float64: mass of regular blocks at each offset d
    irregular: torch.Tensor  # (L, H, K) float64: mass of each irregular block
    irr_q: torch.Tensor  # (K,) query block index of each irregular block
    irr_k: torch.Tensor  # (K,) key block index

    @classmethod
    def from_blocks(cls, influence: torch.Tensor, n: int, block: int, sink: int) -> BlockInfluence:
        """``influence`` is ``[L, H, nb, nb]`` with ``nb = ceil(n / block)``."""
        layers, heads, nb, nb_k = influence.shape
        if nb != math.ceil(n / block) or nb_k != nb:
            raise ValueError(f"influence blocks {nb}x{nb_k} do not match N={n}, block={block}")
        q = torch.arange(nb).view(nb, 1)
        k = torch.arange(nb).view(1, nb)
        sink_cols = min(math.ceil(sink / block), nb)
        ragged = n % block != 0
        irregular = (k <= q) & ((k < sink_cols) | ((q == nb - 1) & ragged))  # (nb, nb)
        irr_q, irr_k = irregular.nonzero(as_tuple=True)
        regular = (k <= q) & ~irregular
        gather = (q - k).clamp(min=0)  # (nb, nb): row q, column d -> key block q - d
        diag_valid = q >= k  # (nb, nb): offset d exists in row q
        diagonals = torch.empty(layers, heads, nb, dtype=torch.float64)
        irr = torch.empty(layers, heads, irr_q.numel(), dtype=torch.float64)
        for layer in range(layers):  # one layer at a time keeps the working set at (H, nb, nb)
            blocks = influence[layer].to(torch.float32)  # (H, nb, nb)
            irr[layer] = blocks[:, irr_q, irr_k].double()
            kept = blocks * regular
            by_diag = kept.gather(-1, gather.expand(heads, nb, nb)) * diag_valid  # (H, nb rows, nb offsets)
            diagonals[layer] = by_diag.sum(dim=1, dtype=torch.float64)
        return cls(n, block, sink, diagonals, irr, irr_q, irr_k)

    @property
    def total(self) -> torch.Tensor:
        """Total causal influence per head, ``(L, H)``."""
        return self.diagonals.sum(-1) + self.irregular.sum(-1)

    def outside_fractions(self, spans: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Dropped fraction of each diagonal's and each irregular block's causal pairs at ``spans``.

        ``spans`` has any shape ``S``; returns ``(S + (nb,), S + (K,))`` float64.
        """
        spans = spans.to(torch.int64).unsqueeze(-1)
        b, n = self.block, self.n
        offsets = torch.arange(self.diagonals.shape[-1]) * b
        causal_reg = band_pairs(offsets, b, b, n)  # (nb,) causal pairs of a full block at offset d
        reg = (causal_reg - band_pairs(offsets, b, b, spans)).double() / causal_reg
        starts_q, starts_k = self.irr_q * b, self.irr_k * b
        rows = (n - starts_q).clamp(max=b)
        cols = (n - starts_k).clamp(max=b)
        sink_cols = torch.minimum((self.sink - starts_k).clamp(min=0), cols)
        delta = starts_q - starts_k
        causal = band_pairs(delta, rows, cols, n)
        kept = band_pairs(delta, rows, cols, spans) + band_pairs(delta, rows, sink_cols, n) \
            - band_pairs(delta, rows, sink_cols, spans)
        irr = (causal - kept).double() / causal
        return reg, irr

    def loss_per_rule(self, spans: torch.Tensor) -> torch.Tensor:
        """Outside mass for every head under each of ``spans`` ``[R]``: ``(L, H, R)`` float64."""
        reg, irr = self.outside_fractions(spans)  # (R, nb), (R, K)
        return torch.einsum("lhd,rd->lhr", self.diagonals, reg) + torch.einsum("lhk,rk->lhr", self.irregular, irr)

    def loss_per_head(self, spans: torch.Tensor) -> torch.Tensor:
        """Outside mass of each head under its own span ``spans`` ``[L, H]``: ``(L, H)`` float64."""
        reg, irr = self.outside_fractions(spans)  # (L, H, nb), (L, H, K)
        return (self.diagonals * reg).sum(-1) + (self.irregular * irr).sum(-1)

    def needed_span(self, coverage: float) -> torch.Tensor:
        """Smallest span in ``[1, N]`` keeping ``coverage`` of each head's influence (sink included): ``(L, H)``."""
        allowed = (1.0 - coverage) * self.total * (1 + 1e-9)
        lo = torch.ones(self.total.shape, dtype=torch.int64)
        hi = torch.full_like(lo, self.n)  # span N keeps everything
        while bool((lo < hi).any()):  # outside mass is non-increasing in the span: bisect per head
            mid = (lo + hi) // 2
            enough = self.loss_per_head(mid) <= allowed
            hi = torch.where(enough, mid, hi)
            lo = torch.where(enough, lo, mid + 1)
        return lo


def rule_table(blocks: BlockInfluence, alphas: np.ndarray, betas: np.ndarray, min_span: int) -> pd.DataFrame:
    """Loss-table rows for one length: every (layer, head, rule) with its loss and the rule's densities."""
    n, sink = blocks.n, blocks.sink
    spans = spans_at(alphas, betas, n, min_span)  # (R,)
    loss = blocks.loss_per_rule(spans).numpy()  # (L, H, R)
    kv = np.array([kv_density(n, int(s), sink) for s in spans])
    attn = np.array([attention_density(n, int(s), sink) for s in spans])
    layers, heads, rules = loss.shape
    layer, head, rule = np.meshgrid(np.arange(layers), np.arange(heads), np.arange(rules), indexing="ij")
    rule = rule.ravel()
    return pd.DataFrame({
        "layer": layer.ravel(), "head": head.ravel(), "rule": rule, "alpha": alphas[rule], "beta": betas[rule],
        "length": n, "loss": loss.ravel(), "kv_density": kv[rule], "attention_density": attn[rule],
    })
