"""The Pareto front figure logged by stage=optimize."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def front_figure(front, lengths, budgets):
    """Influence loss against KV density at each profile length, one marker per plan, budget as a line."""
    fig, axes = plt.subplots(1, len(lengths), figsize=(4 * len(lengths), 3.6), squeeze=False)
    for t, (ax, n) in enumerate(zip(axes[0], lengths, strict=True)):
        for i, c in enumerate(front):
            ax.scatter(c.densities[t], c.objectives[t], color="tab:red" if c.flagged else "tab:blue", s=18)
            ax.annotate(str(i), (c.densities[t], c.objectives[t]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.axvline(budgets[t], color="gray", linestyle="--", linewidth=1, label="budget")
        ax.set(xlabel=f"KV density @ {n}", ylabel=f"influence loss @ {n}", title=f"N = {n}")
        ax.legend(loc="upper right", fontsize=7)
    fig.suptitle("Pareto front of plans (red: time-limited incumbent)")
    fig.tight_layout()
    return fig
