"""The plan cost the MILP minimises: the influence loss of the loss table, plus what cutting a gated head costs.

``stage=profile`` trains one gate per KV head (:mod:`pipeline.profile.gates`): near 1 where the model's output needs
the head's whole context with every other head streaming at once, near 0 where the sink and a local window do. The
influence loss measures one head at a time and misses that joint need (docs/evaluation-notes.md), so the cost of
giving head ``(l, h)`` rule ``r`` at length ``t`` becomes

    loss[l, h, r, t] + weight * gate[l, h] * (1 - kv_density[l, h, r, t]),

the share of the head's context the rule drops, weighted by its gate: zero for the full rule, nearly
``weight * gate`` for the narrowest. The front and the binary split are both solved on it, so the two methods see
the same heads' needs and differ only in their rules.
"""

from __future__ import annotations

import numpy as np


def planning_loss(loss: np.ndarray, kv_density: np.ndarray, gates: np.ndarray | None, weight: float) -> np.ndarray:
    """``loss`` ``(L, H, R, T)`` plus the gates' term (module docstring). ``gates`` is ``(L, Hkv)``; with ``H`` a
    multiple of ``Hkv`` (rules per query head) every query head takes its KV head's gate. None or ``weight == 0``:
    ``loss`` as is."""
    if gates is None or weight == 0:
        return loss
    layers, heads = loss.shape[:2]
    gates = np.asarray(gates, dtype=np.float64)
    if gates.shape[0] != layers or heads % gates.shape[1]:
        raise ValueError(f"head gates of shape {gates.shape} do not fit a loss table of {layers} x {heads} heads")
    per_head = np.repeat(gates, heads // gates.shape[1], axis=1)  # (L, H)
    return loss + weight * per_head[:, :, None, None] * (1.0 - kv_density)
