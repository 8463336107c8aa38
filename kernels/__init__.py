"""Sparse attention under the elastic sink-plus-band pattern: one API over several backends.

``moa_attention`` is prefill (or training) attention; ``moa_decode_attention`` is one decode step against a
per-KV-head cache. Backends: ``reference`` (dense, the oracle), ``cpu`` / ``torch`` (fast PyTorch paths),
``triton`` (GPU; CPU only under ``TRITON_INTERPRET=1``) and ``auto``. Triton is imported only when used.
"""

from __future__ import annotations

import torch

PREFILL_BACKENDS = ("auto", "reference", "cpu", "triton")
DECODE_BACKENDS = ("auto", "reference", "torch", "triton")


def moa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spans, sink: int, *, backend: str = "auto",
                  scale: float | None = None) -> torch.Tensor:
    """Attention where query head ``h`` keeps key ``j <= i`` iff ``j < sink`` or ``i - j < spans[h]``.

    q: (B, Hq, N, D); k, v: (B, Hkv, N, D), Hq a multiple of Hkv; spans: (Hq,) ints already evaluated at N.
    ``auto`` runs, per call, the sparse kernel (``cpu`` on CPU, ``triton`` on CUDA without autograd: it has no
    backward) or dense masked attention, whichever measured faster on this machine at this length and attention
    density (:mod:`kernels.crossover`; ``MOA_CROSSOVER=sparse|dense|off`` forces it), and ``reference`` on other
    devices. Returns (B, Hq, N, D) in q's dtype.
    """
    spans = _check_prefill(q, k, v, spans, sink, backend)
    if backend == "auto":
        from kernels import crossover

        backend = crossover.auto_backend(q, k, v, spans, sink)
        if backend == "dense":
            return crossover.moa_attention_dense_masked(q, k, v, spans, sink, scale=scale)
    if backend == "reference":
        from kernels.reference import moa_attention_reference

        return moa_attention_reference(q, k, v, spans, sink, scale=scale)
    if backend == "cpu":
        if q.device.type != "cpu":
            raise ValueError(f"backend 'cpu' needs CPU tensors, got {q.device}")
        from kernels.cpu import moa_attention_cpu

        return moa_attention_cpu(q, k, v, spans, sink, scale=scale)
    from kernels.triton_prefill import moa_attention_triton

    return moa_attention_triton(q, k, v, spans, sink, scale=scale)


def moa_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, valid_lengths, *,
                         backend: str = "auto", scale: float | None = None) -> torch.Tensor:
    """One decode step: query head ``h`` attends to slots ``[0, valid_lengths[h // group])`` of its KV head.

    q: (B, Hq, 1, D); k_cache, v_cache: (B, Hkv, C, D); valid_lengths: (Hkv,) ints. Returns (B, Hq, 1, D).
    ``auto`` picks ``triton`` on CUDA and ``torch`` otherwise. A head with no valid slot gets zeros.
    """
    valid_lengths = _check_decode(q, k_cache, v_cache, valid_lengths, backend)
    if backend == "auto":
        backend = "triton" if q.is_cuda else "torch"
    if backend == "reference":
        return decode_reference(q, k_cache, v_cache, valid_lengths, scale=scale)
    if backend == "torch":
        from kernels.cpu import moa_decode_attention_torch

        return moa_decode_attention_torch(q, k_cache, v_cache, valid_lengths, scale=scale)
    from kernels.triton_decode import moa_decode_attention_triton

    return moa_decode_attention_triton(q, k_cache, v_cache, valid_lengths, scale=scale)


def decode_reference(q, k_cache, v_cache, valid_lengths, scale=None) -> torch.Tensor:
    """Straightforward decode: for each query head, softmax over its KV head's valid slots, in float64."""
    b, hq, _, d = q.shape
    group = hq // k_cache.shape[1]
    scale = d**-0.5 if scale is None else scale
    out = torch.zeros(b, hq, 1, d, dtype=torch.float64, device=q.device)
    for h in range(hq):
        n = int(valid_lengths[h // group])
        if n == 0:
            continue
        keys = k_cache[:, h // group, :n].double()  # (B, n, D)
        vals = v_cache[:, h // group, :n].double()
        probs = torch.softmax(q[:, h].double() @ keys.transpose(1, 2) * scale, dim=-1)  # (B, 1, n)
        out[:, h] = probs @ vals
    return out.to(q.dtype)


def _check_prefill(q, k, v, spans, sink, backend) -> torch.Tensor:
    if backend not in PREFILL_BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {PREFILL_BACKENDS}")
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be (B, H, N, D); got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} differ in shape")
    b, hq, n, d = q.shape
    if (k.shape[0], k.shape[2], k.shape[3]) != (b, n, d):
        raise ValueError(f"k/v {tuple(k.shape)} do not match q {tuple(q.shape)} in batch, length or head_dim")
    _check_groups(hq, k.shape[1])
    _check_dtypes(q, k, v)
    spans = torch.as_tensor(spans)
    if spans.shape != (hq,) or spans.is_floating_point():
        raise ValueError(f"spans must be an int tensor of shape ({hq},), got {spans.dtype} {tuple(spans.shape)}")
    if (spans < 0).any():
        raise ValueError("spans must be >= 0")
    if int(sink) < 0:
        raise ValueError(f"sink must be >= 0, got {sink}")
    return spans


def _check_decode(q, k_cache, v_cache, valid_lengths, backend) -> torch.Tensor:
    if backend not in DECODE_BACKENDS:
        raise ValueError(f"unknown decode backend {backend!r}; expected one of {DECODE_BACKENDS}")
    if q.dim() != 4 or q.shape[2] != 1:
        raise ValueError(f"q must be (B, Hq, 1, D), got {tuple(q.shape)}")
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} must be equal (B, Hkv, C, D)")
    if (k_cache.shape[0], k_cache.shape[3]) != (q.shape[0], q.shape[3]):
        raise ValueError(f"cache {tuple(k_cache.shape)} does not match q {tuple(q.shape)} in batch or head_dim")
    _check_groups(q.shape[1], k_cache.shape[1])
    _check_dtypes(q, k_cache, v_cache)
    valid_lengths = torch.as_tensor(valid_lengths)
    if valid_lengths.shape != (k_cache.shape[1],) or valid_lengths.is_floating_point():
        raise ValueError(f"valid_lengths must be an int tensor of shape ({k_cache.shape[1]},)")
    if (valid_lengths < 0).any() or (valid_lengths > k_cache.shape[2]).any():
        raise ValueError(f"valid_lengths must lie in [0, {k_cache.shape[2]}] (the cache capacity)")
    return valid_lengths


def _check_groups(hq: int, hkv: int) -> None:
    if hkv == 0 or hq % hkv:
        raise ValueError(f"query heads {hq} must be a multiple of kv heads {hkv}")


def _check_dtypes(*xs: torch.Tensor) -> None:
    if len({x.dtype for x in xs}) != 1 or len({x.device for x in xs}) != 1:
        raise ValueError("q, k and v must share one dtype and one device")
