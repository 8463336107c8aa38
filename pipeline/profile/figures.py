"""Figures for the profile stage."""

from __future__ import annotations

import torch
from matplotlib.figure import Figure


def long_range_heatmap(fractions: torch.Tensor, length: int, min_distance: float) -> Figure:
    """Layers x heads heat-map of each head's influence share farther than ``min_distance`` tokens back."""
    layers, heads = fractions.shape
    fig = Figure(figsize=(max(4.0, 0.45 * heads + 2.0), max(3.0, 0.22 * layers + 1.5)))
    ax = fig.add_subplot()
    image = ax.imshow(fractions.float().numpy(), aspect="auto", cmap="viridis", vmin=0.0,
                      vmax=max(float(fractions.max()), 1e-6), interpolation="nearest")
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_xticks(range(heads))
    ax.set_title(f"N={length}: influence share >= {min_distance:g} tokens back")
    fig.colorbar(image, ax=ax, label="share of |E|")
    fig.tight_layout()
    return fig
