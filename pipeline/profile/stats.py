"""Summaries of an influence tensor ``[L, H, nb, nb]``: per-head mass and long-range share."""

from __future__ import annotations

import torch


def block_distance(nb: int, block_size: int) -> torch.Tensor:
    """``[nb, nb]`` token distance between query block ``I`` and key block ``J``: ``(I - J) * block_size``."""
    idx = torch.arange(nb)
    return (idx.view(nb, 1) - idx.view(1, nb)) * block_size


def long_range_fraction(influence: torch.Tensor, block_size: int, min_distance: float) -> torch.Tensor:
    """``[L, H]`` share of each head's influence in blocks at least ``min_distance`` tokens below the diagonal.

    Distances are measured between block starts, so this is exact to within one block. Heads with no
    influence at all get 0.
    """
    far = (block_distance(influence.shape[-1], block_size) >= min_distance).to(influence.device)
    total = influence.sum((-1, -2))
    share = (influence * far).sum((-1, -2)) / total.clamp_min(torch.finfo(total.dtype).tiny)
    return torch.where(total > 0, share, torch.zeros_like(share))


def layer_summaries(influence: torch.Tensor, block_size: int, min_distance: float) -> list[dict[str, float]]:
    """One dict per layer: total influence mass and the mass-weighted long-range share over its heads."""
    mass = influence.sum((-1, -2))  # (L, H)
    far = long_range_fraction(influence, block_size, min_distance) * mass
    rows = []
    for layer_mass, layer_far in zip(mass.sum(-1).tolist(), far.sum(-1).tolist(), strict=True):
        rows.append({"influence_mass": layer_mass, "long_range_share": layer_far / layer_mass if layer_mass else 0.0})
    return rows
