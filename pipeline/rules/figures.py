"""Figures of the per-head span scaling, logged to MLflow by stage=rules."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402


def span_vs_length(scaling: pd.DataFrame, lengths, coverage: float):
    """Needed span against N, one line per head, coloured by its fitted beta."""
    rows = scaling[scaling["coverage"] == coverage]
    spans = rows[[f"span_{n}" for n in lengths]].to_numpy()  # (heads, T)
    betas = rows["beta"].to_numpy()
    norm = plt.Normalize(vmin=min(0.0, betas.min()), vmax=max(1.0, betas.max()))
    cmap = plt.get_cmap("viridis")
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for spans_h, beta in zip(spans, betas, strict=True):
        ax.plot(lengths, spans_h, color=cmap(norm(beta)), alpha=0.6, linewidth=1, marker="o", markersize=2)
    ax.plot(lengths, lengths, color="black", linestyle="--", linewidth=1, label="span = N")
    ax.set(xlabel="sequence length N", ylabel=f"span keeping {coverage:.0%} of influence",
           title="Needed span per head")
    fig.colorbar(plt.cm.ScalarMappable(norm=norm, cmap=cmap), ax=ax, label="fitted beta")
    ax.legend(loc="upper left")
    fig.tight_layout()
    return fig


def beta_histogram(scaling: pd.DataFrame):
    """Histogram of fitted beta per coverage level."""
    fig, ax = plt.subplots(figsize=(6, 4))
    bins = np.linspace(min(0.0, scaling["beta"].min()), max(1.0, scaling["beta"].max()), 41)
    for coverage, rows in scaling.groupby("coverage"):
        ax.hist(rows["beta"], bins=bins, alpha=0.5, label=f"{coverage:.0%} coverage")
    ax.set(xlabel="fitted beta (span growth per token of N)", ylabel="heads", title="Elasticity of heads")
    ax.legend()
    fig.tight_layout()
    return fig
