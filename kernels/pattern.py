"""The elastic sliding-window-plus-sink pattern: the single source of truth for sparse semantics.

A rule ``(alpha, beta)`` has span ``S(N) = clamp(alpha + beta * N, min_span, N)`` at sequence length ``N``.
Query ``i`` keeps key ``j`` iff ``j <= i`` and (``j < sink`` or ``i - j < S``).

Two optional integers generalise the span, for plans imported from the original MoA release (see
:mod:`pipeline.plan`): ``S(N) = clamp(ceil_m(floor(alpha + beta * N)) + offset, min_span, N)``, where ``ceil_m``
rounds up to a multiple of ``multiple``. The defaults (``multiple=1, offset=0``) give the formula above.
"""

from __future__ import annotations

import math

import torch


def span_at(alpha: float, beta: float, n: int, min_span: int = 1, multiple: int = 1, offset: int = 0) -> int:
    """Span of rule ``(alpha, beta)`` at length ``n``: ``clamp(alpha + beta * n, min_span, n)``, as an int.

    With ``multiple`` or ``offset`` set, ``floor(alpha + beta * n)`` is first rounded up to a multiple of
    ``multiple``, then ``offset`` is added (in integers)."""
    raw = math.floor(alpha + beta * n)
    raw = -(-raw // multiple) * multiple + offset
    return int(max(min(raw, n), min(min_span, n)))


def spans_at(alphas, betas, n: int, min_span: int = 1, multiple: int = 1, offset: int = 0) -> torch.Tensor:
    """Vectorised :func:`span_at` for per-head ``alphas``/``betas`` (any shape); returns int64 of that shape."""
    a = torch.as_tensor(alphas, dtype=torch.float64)
    b = torch.as_tensor(betas, dtype=torch.float64)
    raw = torch.floor(a + b * n)
    if multiple != 1 or offset:  # in exact integers; values beyond +-2^52 end at the final clamp anyway
        raw = raw.clamp(min=-(2.0**52), max=2.0**52).to(torch.int64)
        raw = (raw + multiple - 1).div(multiple, rounding_mode="floor") * multiple + offset
    return raw.clamp(min=min(min_span, n), max=n).to(torch.int64)


def token_mask(n: int, span: int, sink: int, *, device=None) -> torch.Tensor:
    """Boolean ``[n, n]`` mask (query rows, key columns) of the pairs one head keeps."""
    i = torch.arange(n, device=device).unsqueeze(1)
    j = torch.arange(n, device=device).unsqueeze(0)
    return (j <= i) & ((j < sink) | (i - j < span))


def head_masks(n: int, spans: torch.Tensor, sink: int, *, device=None) -> torch.Tensor:
    """Boolean ``[H, n, n]`` masks for per-head ``spans`` ``[H]``."""
    i = torch.arange(n, device=device).view(1, n, 1)
    j = torch.arange(n, device=device).view(1, 1, n)
    s = spans.to(device=device, dtype=torch.int64).view(-1, 1, 1)
    return (j <= i) & ((j < sink) | (i - j < s))


def kept_pairs(n: int, span: int, sink: int) -> int:
    """Number of (query, key) pairs one head keeps at length ``n``, in closed form."""
    span = max(0, min(span, n))
    sink = max(0, min(sink, n))
    total = 0
    # Band: for query i the band covers keys max(0, i-span+1)..i, i.e. min(i+1, span) keys.
    # Sum_{i<n} min(i+1, span) = span*(span+1)/2 + (n-span)*span.
    total += span * (span + 1) // 2 + (n - span) * span
    # Sink keys outside the band: key j < sink and i - j >= span, j <= i.
    # For each sink key j, queries i in [j+span, n-1] add one pair.
    for_sink = sum(max(0, n - (j + span)) for j in range(sink)) if span < n else 0
    return total + for_sink


def kv_density(n: int, span: int, sink: int) -> float:
    """Fraction of the ``n`` cached tokens one head keeps: ``min(sink + span, n) / n``."""
    return min(sink + span, n) / n


def attention_density(n: int, span: int, sink: int) -> float:
    """Kept pairs over causal pairs ``n (n + 1) / 2`` for one head."""
    return kept_pairs(n, span, sink) / (n * (n + 1) / 2)
