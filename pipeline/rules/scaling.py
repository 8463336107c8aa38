"""Per-head span scaling: the span each head needs at each length, and a least-squares fit ``alpha + beta * N``.

This is the evidence for which heads widen with the sequence length (elastic heads, ``beta > 0``) and which stay
local (``beta ~ 0``).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch


def fit_span_scaling(lengths, spans: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Least-squares ``span ~ alpha + beta * N`` per head; ``spans`` is ``[..., T]`` over ``lengths`` ``[T]``.

    Returns ``(alpha, beta, r2)`` of shape ``[...]``. With a single length the fit is the constant span
    (``beta = 0``). ``r2`` is 1 when every span is equal (nothing left to explain).
    """
    x = np.asarray(lengths, dtype=np.float64)
    y = np.asarray(spans, dtype=np.float64)
    x_mean, y_mean = x.mean(), y.mean(-1, keepdims=True)
    var_x = ((x - x_mean) ** 2).sum()
    beta = ((x - x_mean) * (y - y_mean)).sum(-1) / var_x if var_x > 0 else np.zeros(y.shape[:-1])
    alpha = y_mean[..., 0] - beta * x_mean
    residual = ((y - (alpha[..., None] + beta[..., None] * x)) ** 2).sum(-1)
    total = ((y - y_mean) ** 2).sum(-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        r2 = np.where(total > 0, 1.0 - residual / np.where(total > 0, total, 1.0), 1.0)
    return alpha, beta, r2


def head_scaling_table(needed: dict[float, dict[int, torch.Tensor]]) -> pd.DataFrame:
    """One row per (layer, head, coverage): ``span_<N>`` per length, and the fit's ``alpha, beta, r2``.

    ``needed[coverage][N]`` is the ``(L, H)`` span keeping that coverage at length ``N``.
    """
    frames = []
    for coverage, by_length in needed.items():
        lengths = sorted(by_length)
        spans = np.stack([by_length[n].numpy() for n in lengths], axis=-1)  # (L, H, T)
        alpha, beta, r2 = fit_span_scaling(lengths, spans)
        layers, heads = spans.shape[:2]
        layer, head = np.meshgrid(np.arange(layers), np.arange(heads), indexing="ij")
        frame = {"layer": layer.ravel(), "head": head.ravel(), "coverage": coverage}
        frame.update({f"span_{n}": spans[..., t].ravel() for t, n in enumerate(lengths)})
        frame.update({"alpha": alpha.ravel(), "beta": beta.ravel(), "r2": r2.ravel()})
        frames.append(pd.DataFrame(frame))
    return pd.concat(frames, ignore_index=True)
