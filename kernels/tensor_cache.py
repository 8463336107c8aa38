"""One process-wide LRU cache of small constant tensors (attention masks), bounded in bytes, shared by the kernels.

A plan's layers share a few dozen distinct spans at each length, so masks built once per ``(kind, length, span,
...)`` are reused by every layer and every later call. A count-bounded cache thrashes there (30 layers cycle
through more keys than it holds); a byte bound keeps all of them at short lengths and drops the oldest at long
ones, where one mask can be tens of MiB.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import torch

MAX_BYTES = 1 << 30
"""Bytes kept, least recently used dropped first; a tensor bigger than this is rebuilt on every call. At 4k tokens
one ``(N, N)`` float32 mask is 64 MiB."""

_entries: OrderedDict[tuple, torch.Tensor | None] = OrderedDict()
_bytes = 0


def cached(key: tuple, build: Callable[[], torch.Tensor | None]) -> torch.Tensor | None:
    """The tensor (or None) stored under ``key``, built by ``build()`` on a miss. Keys must name their kind."""
    global _bytes
    if key in _entries:
        _entries.move_to_end(key)
        return _entries[key]
    value = build()
    size = 0 if value is None else value.numel() * value.element_size()
    if size <= MAX_BYTES:
        _entries[key] = value
        _bytes += size
        while _bytes > MAX_BYTES:
            _, dropped = _entries.popitem(last=False)
            _bytes -= 0 if dropped is None else dropped.numel() * dropped.element_size()
    return value


def clear() -> None:
    """Drop every cached tensor."""
    global _bytes
    _entries.clear()
    _bytes = 0
