"""Kernel benchmark harness: sparse prefill and decode against dense attention and compiled FlexAttention.

Every measured row is a plain dict (one CSV row / one MLflow run). Prefill rows compare, at each sequence length
and span fraction, dense causal SDPA, ``torch.compile``'d FlexAttention on the same mask, the ``cpu`` backend,
(on CUDA) the Triton kernel, and ``auto`` (the sparse kernel or dense masked attention, per the crossover measured
by :mod:`kernels.crossover`; its speed-up vs dense is the "never slower than dense" check). Decode rows time one
decode step at each density against a dense cache, with the KV-cache bytes each needs. Errors are measured
against dense masked attention evaluated in float32 on a sample of query rows (exact for those rows, and
affordable at any length).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import kernels
from kernels.decode import layer_decode_attention, packed_decode_attention
from kernels.flex import moa_attention_flex
from kernels.kv_cache import PerHeadLayer
from kernels.pattern import kept_pairs, kv_density

BENCH_PREFILL_BACKENDS = ("dense", "flex", "cpu", "triton", "auto")  # contenders timed by the benchmark
BENCH_DECODE_BACKENDS = ("torch", "triton")


@dataclass(frozen=True)
class BenchSettings:
    """What to sweep and how to time it (see ``pipeline/conf/benchmark/default.yaml``)."""

    seq_lens: tuple[int, ...]
    densities: tuple[float, ...]
    backends: tuple[str, ...]
    decode_seq_lens: tuple[int, ...]
    decode_backends: tuple[str, ...]
    batch: int
    heads: int
    kv_heads: int
    head_dim: int
    sink: int
    dtype: torch.dtype
    device: torch.device
    warmup: int
    repeats: int
    decode_repeats: int
    error_rows: int
    seed: int


def time_ms(fn: Callable[[], object], warmup: int, repeats: int, device: torch.device) -> dict[str, float]:
    """Median, 20th and 80th percentile wall time of ``fn`` in milliseconds, after ``warmup`` calls."""
    return percentiles(interleaved_ms({"fn": fn}, warmup, repeats, device)["fn"])


def interleaved_ms(fns: dict[str, Callable[[], object]], warmup: int, repeats: int,
                   device: torch.device) -> dict[str, list[float]]:
    """Wall times in milliseconds of ``repeats`` rounds, each calling every function once in order (round-robin,
    so load on a shared machine hits all of them alike), after ``warmup`` untimed rounds."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    sync()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            sync()
            times[name].append((time.perf_counter() - start) * 1e3)
    return times


def percentiles(times: list[float]) -> dict[str, float]:
    """The latency columns: median, 20th and 80th percentile of ``times``."""
    cuts = statistics.quantiles(times, n=10, method="inclusive") if len(times) > 1 else times * 9
    return {"latency_ms_p50": statistics.median(times), "latency_ms_p20": cuts[1], "latency_ms_p80": cuts[7]}


def median_ratio(baseline: list[float], times: list[float]) -> float:
    """Speed-up from side-by-side rounds: the median over rounds of ``baseline[r] / times[r]``."""
    return statistics.median(b / t for b, t in zip(baseline, times, strict=True))


def uniform_spans(n: int, fraction: float, heads: int) -> torch.Tensor:
    """Every head at span ``fraction * n`` (at least 1): the density axis of the sweep."""
    return torch.full((heads,), max(1, min(n, round(fraction * n))), dtype=torch.int64)


def spans_kv_density(query_spans: torch.Tensor, kv_heads: int, sink: int, n: int) -> float:
    """DESIGN's KV density from query-head spans ``[Hq]`` alone: the mean over KV heads of
    ``min(sink + S_kv, n) / n``, ``S_kv`` the largest span of the KV head's query-head group."""
    group_max = query_spans.view(kv_heads, -1).amax(dim=1)  # (Hkv,)
    return sum(kv_density(n, int(s), sink) for s in group_max) / kv_heads


def masked_rows_reference(q, k, v, spans, sink, rows: torch.Tensor, dtype: torch.dtype = torch.float32,
                          q_offset: int = 0) -> torch.Tensor:
    """Dense masked attention for query ``rows`` only (at positions ``rows + q_offset``): the error oracle.

    The matmuls run in ``dtype`` and the softmax in float32, one KV head at a time over keys ``0 .. the last
    position``, so nothing is copied per query head. q: (B, Hq, M, D); k, v: (B, Hkv, N, D); spans: (Hq,).
    Returns (B, Hq, R, D) float32."""
    hq, hkv, d = q.shape[1], k.shape[1], q.shape[-1]
    group = hq // hkv
    positions = rows.to(q.device) + q_offset
    stop = int(positions.max()) + 1
    i = positions.view(1, -1, 1)
    j = torch.arange(stop, device=q.device).view(1, 1, -1)
    spans = spans.to(q.device)
    out = torch.empty(q.shape[0], hq, rows.numel(), d, dtype=torch.float32, device=q.device)
    for h in range(hkv):
        heads = slice(h * group, (h + 1) * group)
        keys = k[:, h:h + 1, :stop].to(dtype)  # (B, 1, stop, D)
        scores = q[:, heads][:, :, rows.to(q.device)].to(dtype) @ keys.transpose(-1, -2)  # (B, G, R, stop)
        keep = (j <= i) & ((j < sink) | (i - j < spans[heads].view(-1, 1, 1)))  # (G, R, stop)
        probs = torch.softmax(scores.float().mul_(d**-0.5).masked_fill_(~keep, float("-inf")), dim=-1)
        out[:, heads] = (probs.to(dtype) @ v[:, h:h + 1, :stop].to(dtype)).float()
    return out


def _prefill_fn(backend: str, q, k, v, spans, sink) -> Callable[[], torch.Tensor]:
    group = q.shape[1] // k.shape[1]
    if backend == "dense":
        return lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=group > 1)
    if backend == "flex":
        return lambda: moa_attention_flex(q, k, v, spans, sink)
    return lambda: kernels.moa_attention(q, k, v, spans, sink, backend=backend)


def _flops(pairs: int, s: BenchSettings) -> float:
    """Useful floating-point operations: QK^T and PV, 2 * D each per kept pair, over batch and heads."""
    return 4.0 * pairs * s.head_dim * s.batch * s.heads


def prefill_rows(s: BenchSettings, progress: Callable[[Iterable], Iterable] = iter) -> list[dict]:
    """Benchmark rows of the prefill sweep: one dense row per length, then one row per (density, backend).

    At each (length, density) dense SDPA and the sparse backends are timed round-robin, and every speed-up is the
    median of per-round ratios, so load drifting between rounds hits numerator and denominator alike. The dense
    row pools its times over the densities of its length."""
    gen = torch.Generator().manual_seed(s.seed)
    dense_times = {n: [] for n in s.seq_lens}
    sparse_rows = {n: [] for n in s.seq_lens}
    n_inputs = None
    for n, fraction in progress([(n, f) for n in s.seq_lens for f in s.densities]):
        if n != n_inputs:  # new length: fresh inputs
            q = torch.randn(s.batch, s.heads, n, s.head_dim, generator=gen).to(s.device, s.dtype)
            k, v = (torch.randn(s.batch, s.kv_heads, n, s.head_dim, generator=gen).to(s.device, s.dtype)
                    for _ in range(2))
            err_rows = torch.linspace(0, n - 1, min(n, s.error_rows)).round().long().unique()
            n_inputs = n
        spans = uniform_spans(n, fraction, s.heads)
        span = int(spans[0])
        pairs = kept_pairs(n, span, s.sink)
        expected = masked_rows_reference(q, k, v, spans, s.sink, err_rows)
        fns = {"dense": _prefill_fn("dense", q, k, v, None, 0)}
        errors = {}
        for backend in s.backends:
            if backend != "dense":
                fns[backend] = _prefill_fn(backend, q, k, v, spans, s.sink)
                errors[backend] = (fns[backend]()[:, :, err_rows].float() - expected).abs().max().item()
        times = interleaved_ms(fns, s.warmup, s.repeats, s.device)
        dense_times[n] += times["dense"]
        for backend, err in errors.items():
            vs_flex = median_ratio(times["flex"], times[backend]) if "flex" in times else float("nan")
            sparse_rows[n].append(_prefill_row(s, backend, n, fraction, span, times[backend],
                                               median_ratio(times["dense"], times[backend]), vs_flex, pairs, err))
    rows = []
    for n in s.seq_lens:
        rows.append(_prefill_row(s, "dense", n, 1.0, n, dense_times[n], 1.0, float("nan"), n * (n + 1) // 2,
                                 float("nan")))
        rows += sparse_rows[n]
    return rows


def _prefill_row(s, backend, n, fraction, span, times, speedup, vs_flex, pairs, err) -> dict:
    """One prefill row from a backend's round times and its speed-ups (medians of per-round ratios)."""
    causal = n * (n + 1) // 2
    ideal = causal / pairs
    lat = percentiles(times)
    return {
        "section": "prefill", "backend": backend, "device": s.device.type, "dtype": str(s.dtype).replace("torch.", ""),
        "seq_len": n, "density": fraction, "span": span, "sink": s.sink, "batch": s.batch, "heads": s.heads,
        "kv_heads": s.kv_heads, "head_dim": s.head_dim,
        "attention_density": pairs / causal if backend != "dense" else 1.0,
        **lat,
        "speedup_vs_dense": speedup,
        "speedup_vs_flex": vs_flex,
        "ideal_speedup": ideal,
        "fraction_of_ideal": speedup / ideal,
        "max_abs_err": err,
        "gflops": _flops(pairs, s) / lat["latency_ms_p50"] / 1e6,
        "kv_cache_mb": float("nan"),
        "kv_bytes_vs_density": float("nan"),
    }


def decode_rows(s: BenchSettings, progress: Callable[[Iterable], Iterable] = iter) -> list[dict]:
    """One decode step per (length, density, backend) through the real per-head cache
    (:class:`kernels.kv_cache.PerHeadLayer`, one layer), against the same cache holding every token (dense).

    The cache is filled by a prefill of ``N`` random tokens; every timed step writes one more token and runs
    :func:`kernels.decode.packed_decode_attention`. KV bytes are the cache's allocated buffers, compared with the
    KV density formula (:func:`spans_kv_density`, from the spans alone) times the dense bytes."""
    gen = torch.Generator().manual_seed(s.seed + 1)
    itemsize = torch.empty((), dtype=s.dtype).element_size()
    group = s.heads // s.kv_heads
    rows = []
    grid = [(n, b) for n in s.decode_seq_lens for b in s.decode_backends]
    for n, backend in progress(grid):
        total = n + s.warmup + s.decode_repeats + 2  # room for every timed step
        q = torch.randn(s.batch, s.heads, 1, s.head_dim, generator=gen).to(s.device, s.dtype)
        token = torch.randn(2, s.batch, s.kv_heads, 1, s.head_dim, generator=gen).to(s.device, s.dtype)
        prompt = torch.randn(2, s.batch, s.kv_heads, n, s.head_dim, generator=gen).to(s.device, s.dtype)
        cases = {}
        for fraction in (1.0, *s.densities):  # dense (a cache holding every token) first
            kv_spans = uniform_spans(n, fraction, s.kv_heads) if fraction < 1.0 else torch.full((s.kv_heads,), total)
            layer = PerHeadLayer(kv_spans.repeat_interleave(group), kv_spans, s.sink, total, batch_size=s.batch,
                                 head_dim=s.head_dim, dtype=s.dtype, device=s.device)
            layer.update(prompt[0], prompt[1])  # prefill: (B, Hkv, N, D) into each head's sink + ring
            cases[fraction] = (layer, kv_spans, _decode_step(backend, layer, q, token))
        errors = {f: _decode_error(layer, q, step) for f, (layer, _, step) in cases.items()}
        # Dense and sparse caches step round-robin, so load drifting between rounds hits both alike.
        times = interleaved_ms({f: step for f, (_, _, step) in cases.items()}, s.warmup, s.decode_repeats, s.device)
        for fraction, (layer, kv_spans, _) in cases.items():
            rows.append(_decode_row(s, backend, n, fraction, total, layer, kv_spans, times[fraction], times[1.0],
                                    errors[fraction], group, itemsize))
    return rows


def _decode_step(backend: str, layer, q, token) -> Callable[[], torch.Tensor]:
    def step():
        layer.update(token[0], token[1])  # into the packed (B, T, D) buffers
        return layer_decode_attention(q, layer, backend=backend)  # as the runtime decodes
    return step


def _decode_error(layer, q, step) -> float:
    """Max error of one step against the float32 reference over the same cache contents."""
    out = step()
    expected = packed_decode_attention(q.float(), layer.keys.float(), layer.values.float(), layer.offsets,
                                       layer.valid_lengths(), keep=layer.decode_keep(), backend="reference")
    return (out.float() - expected).abs().max().item()


def _decode_row(s: BenchSettings, backend: str, n: int, fraction: float, total: int, layer, kv_spans,
                times: list[float], dense_times: list[float], err: float, group: int, itemsize: int) -> dict:
    lat = percentiles(times)
    speedup = median_ratio(dense_times, times)
    kept = sum(layer.capacities)
    ideal = total * s.kv_heads / kept
    dense_bytes = s.batch * s.kv_heads * total * s.head_dim * 2 * itemsize
    expected_bytes = dense_bytes * spans_kv_density(kv_spans.repeat_interleave(group), s.kv_heads, s.sink, total)
    return {
        "section": "decode", "backend": f"decode-{backend}" if fraction < 1.0 else f"decode-{backend}-dense",
        "device": s.device.type, "dtype": str(s.dtype).replace("torch.", ""), "seq_len": n,
        "density": fraction, "span": int(kv_spans[0]), "sink": s.sink, "batch": s.batch,
        "heads": s.heads, "kv_heads": s.kv_heads, "head_dim": s.head_dim,
        "attention_density": kept / (total * s.kv_heads),  # one query row: kept keys / all keys
        **lat,
        "speedup_vs_dense": speedup,
        "speedup_vs_flex": float("nan"),
        "ideal_speedup": ideal,
        "fraction_of_ideal": speedup / ideal,
        "max_abs_err": err,
        "gflops": 4.0 * kept * group * s.head_dim * s.batch / lat["latency_ms_p50"] / 1e6,
        "kv_cache_mb": layer.nbytes_allocated / 2**20,
        "kv_bytes_vs_density": layer.nbytes_allocated / expected_bytes,  # not from the cache
    }


def available_backends(requested: Iterable[str], device: torch.device, choices: tuple[str, ...]) -> tuple[str, ...]:
    """The requested backends that can run on ``device`` (``triton`` needs CUDA; ``cpu`` needs a CPU)."""
    unknown = sorted(set(requested) - set(choices))
    if unknown:
        raise ValueError(f"unknown backends {unknown}; expected a subset of {list(choices)}")
    skip = {"triton"} if device.type != "cuda" else {"cpu"}
    return tuple(b for b in requested if b not in skip)


def format_table(rows: list[dict]) -> str:
    """A readable fixed-width table of the rows' key columns."""
    cols = ["section", "backend", "seq_len", "density", "latency_ms_p50", "speedup_vs_dense", "speedup_vs_flex",
            "ideal_speedup", "fraction_of_ideal", "gflops", "max_abs_err", "kv_cache_mb"]
    head = ["sect", "backend", "N", "dens", "p50 ms", "x dense", "x flex", "ideal", "of ideal", "GFLOP/s", "max err",
            "KV MiB"]
    widths = [7, 18, 7, 6, 10, 8, 7, 6, 8, 8, 9, 8]

    def cell(value, width):
        if isinstance(value, float):
            text = f"{value:.3g}" if value == value else "-"
        else:
            text = str(value)
        return text.rjust(width)

    lines = [" ".join(h.rjust(w) for h, w in zip(head, widths, strict=True))]
    lines += [" ".join(cell(r[c], w) for c, w in zip(cols, widths, strict=True)) for r in rows]
    return "\n".join(lines)
