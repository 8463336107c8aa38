#!/usr/bin/env python3
"""The GPU check: the ``gpu`` tests, then prefill, decode and end-to-end benchmarks, one CSV per part in ``$OUT``.

Run through ``scripts/gpu_check.sh`` (``bash scripts/gpu_check.sh``; ``--dry`` or ``GPU_CHECK_DRY=1`` for the CPU
rehearsal). It imports only torch, triton, transformers, the project's ``kernels`` and the Hydra-free parts of
``pipeline`` (``plan``, ``sparse_runtime``), because the GPU machine has no Hydra, MLflow, PuLP, Optuna or psycopg.

Parts, each in its own ``try`` so one failure keeps the others' rows (the exit status is 1 if any part or row
failed):

- ``tests.csv``: ``pytest -m gpu`` on every test file with a ``gpu`` mark (the CUDA kernel, placement and
  HF-integration tests; skipped, and said so, when pytest is absent), with ``TRITON_INTERPRET=0``,
  ``MOA_TRITON_PREFILL_CONFIG`` pinned unless set, and a timeout; a file that cannot be collected there (a missing
  package) is an ``error`` row;
- ``prefill.csv``: Llama-3-8B attention (B=1, 32/8 heads, d128, sink 64, bf16) at 8k, 32k and 128k: cuDNN and
  flash SDPA dense causal, then the Triton kernel (``kernels.moa_attention(backend="triton")``) and compiled Flex
  (``kernels.flex.moa_attention_flex``) on uniform spans N/4 and N/8 and a mixed plan (2 KV heads full, the others
  geometrically down to N/16). ms from CUDA events (warm-up, median), TFLOP/s on kept pairs, speed-up vs cuDNN
  dense, fraction of the ideal speed-up (dense pairs / kept pairs), ratio vs Flex, and the max error against
  float32 on the first and last query rows beside the error of the same reference run in bf16 (``err_ok``:
  ``max_abs_err <= 2 * lowp_ref_err``, the Triton tutorial's idiom);
- ``decode.csv``: one decode step at (32k, batch 1 and 16, KV density 0.25) and (128k, batch 8, 0.125) through
  ``kernels.decode.packed_decode_attention`` over a packed per-head cache, dense SDPA over the contiguous cache and
  compiled Flex decode on the same mask, called eagerly; then dense and ours replayed from a CUDA graph (``*_graph``
  rows, ours also with the two-launch merge and with 4 and 8 programs per SM); ms (L2 flushed before every timed
  call), effective TB/s (K/V bytes the method needs / time), speed-up vs dense (eager vs eager, graph vs graph) and
  the ideal (dense bytes / kept bytes);
- ``e2e.csv``: HF ``generate`` on a random 4-layer Llama-3-8B-shaped model (bf16), prompt 32k, batch 4, 128 new
  tokens: dense (SDPA, dynamic cache) and a uniform plan at KV density 0.125 (``moa`` attention, Triton kernels,
  per-head cache); tokens/s overall and in decode.

``summary.md`` collects every part's status and key columns. Every part has a time budget: rows it cannot start in
time are written with status ``skipped: time budget`` (not a failure, but the summary says the run is incomplete).
In dry mode (CPU, tiny shapes, fp32, Triton under the interpreter; ``mode`` column ``dry``) the code paths and the
columns are the same and every time or speed figure is meaningless.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import math
import os
import statistics
import subprocess
import sys
import time
import traceback
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

TESTS_COLUMNS = ("mode", "test", "outcome", "seconds", "message")
PREFILL_COLUMNS = ("mode", "seq_len", "plan", "backend", "batch", "q_heads", "kv_heads", "head_dim", "sink", "dtype",
                   "kept_pairs", "dense_pairs", "attention_density", "ms_median", "ms_min", "reps", "tflops",
                   "speedup_vs_cudnn", "ideal_speedup", "fraction_of_ideal", "ratio_vs_flex", "max_abs_err",
                   "lowp_ref_err", "err_ok", "err_rows", "status", "note")
DECODE_COLUMNS = ("mode", "seq_len", "batch", "kv_density", "backend", "q_heads", "kv_heads", "head_dim", "sink",
                  "dtype", "kv_bytes", "ms_median", "ms_min", "reps", "tbps", "speedup_vs_dense", "ideal_speedup",
                  "fraction_of_ideal", "max_abs_err", "lowp_ref_err", "err_ok", "status", "note")
E2E_COLUMNS = ("mode", "method", "layers", "prompt_len", "batch", "new_tokens", "kv_density", "prefill_s", "total_s",
               "tokens_per_s", "decode_tokens_per_s", "kv_cache_gib", "peak_mem_gib", "status", "note")
PINNED_PREFILL_CONFIG = "128,64,8,3"  # BM, BN, warps, stages for the tests (MOA_TRITON_PREFILL_CONFIG)
PINNED_DECODE_CONFIG = "64,4,2"  # BLOCK_N, warps, stages for the tests (MOA_TRITON_DECODE_CONFIG)
NAN = float("nan")
ERR_FLOOR = 1e-5  # absolute slack where the low-precision reference is exact (the float32 dry run)


@dataclass(frozen=True)
class Shapes:
    """Everything the check sizes: the GPU run, or the tiny CPU rehearsal."""

    mode: str
    prefill_lengths: tuple[int, ...]
    batch: int
    q_heads: int
    kv_heads: int
    head_dim: int
    sink: int
    error_rows: tuple[int, int]  # first and last query rows checked against float32
    decode_cases: tuple[tuple[int, int, float], ...]  # (N, batch, KV density)
    e2e: dict = field(default_factory=dict)
    warmup: int = 2
    max_reps: int = 10
    seconds_per_fn: float = 1.5  # timed seconds per function, before reps are capped
    decode_warmup: int = 5
    decode_max_reps: int = 50
    budgets: dict = field(default_factory=dict)  # part -> seconds
    test_timeout_s: int = 110


GPU = Shapes(
    mode="gpu", prefill_lengths=(8192, 32768, 131072), batch=1, q_heads=32, kv_heads=8, head_dim=128, sink=64,
    error_rows=(1024, 256), decode_cases=((32768, 1, 0.25), (32768, 16, 0.25), (131072, 8, 0.125)),
    e2e={"layers": 4, "hidden": 4096, "heads": 32, "kv_heads": 8, "intermediate": 14336, "vocab": 128256,
         "prompt": 32768, "batch": 4, "new_tokens": 128, "kv_density": 0.125},
    # Nominal 5 minutes in all (a part may overrun its budget by one row); gpu_check.sh caps the whole at 6.
    budgets={"prefill": 130, "decode": 60, "e2e": 45}, test_timeout_s=150,
)
DRY = Shapes(
    mode="dry", prefill_lengths=(256,), batch=1, q_heads=8, kv_heads=4, head_dim=32, sink=4, error_rows=(64, 32),
    decode_cases=((256, 2, 0.25), (256, 2, 0.125)),
    e2e={"layers": 2, "hidden": 64, "heads": 4, "kv_heads": 2, "intermediate": 128, "vocab": 256, "prompt": 60,
         "batch": 2, "new_tokens": 4, "kv_density": 0.25},
    warmup=0, max_reps=1, seconds_per_fn=0.5, decode_warmup=0, decode_max_reps=2,
    budgets={"prefill": 120, "decode": 120, "e2e": 120}, test_timeout_s=110,
)


def log(message: str) -> None:
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {message}", flush=True)


class Part:
    """One part's rows, written to its CSV after every row (so a kill keeps what was measured), and its status."""

    def __init__(self, out: Path, name: str, columns: tuple[str, ...], budget_s: float | None):
        self.path, self.name, self.columns = out / f"{name}.csv", name, columns
        self.rows: list[dict] = []
        self.started = time.monotonic()
        self.budget_s = budget_s
        self.status, self.seconds, self.error = "running", 0.0, ""
        self.write()

    def out_of_time(self) -> bool:
        return self.budget_s is not None and time.monotonic() - self.started > self.budget_s

    def add(self, row: dict) -> None:
        self.rows.append({c: row.get(c, NAN) for c in self.columns})
        self.write()

    def write(self) -> None:
        with self.path.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=self.columns)
            writer.writeheader()
            writer.writerows(self.rows)

    def failed_rows(self) -> list[dict]:
        return [r for r in self.rows if str(r.get("status", "")).startswith("error")]


# ---- timing ---------------------------------------------------------------------------------------------------


def timed_ms(fn, device, warmup: int, max_reps: int, seconds: float, flush=None) -> list[float]:
    """Milliseconds of ``fn`` per call after ``warmup`` calls: CUDA events on CUDA (``flush()`` runs before each
    call, outside the events), wall time on CPU. Reps are capped so the timed calls take about ``seconds``."""
    import torch

    for _ in range(warmup):
        fn()
    cuda = device.type == "cuda"
    times: list[float] = []
    while len(times) < max_reps:
        if flush is not None:
            flush()
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            started = time.perf_counter()
            fn()
            times.append((time.perf_counter() - started) * 1e3)
        if len(times) >= 3 and sum(times) > seconds * 1e3:
            break
    return times


def l2_flusher(device):
    """A function that evicts the GPU's L2 cache (writes a buffer larger than it); None on CPU."""
    import torch

    if device.type != "cuda":
        return None
    scratch = torch.empty(256 * 2**20, dtype=torch.int8, device=device)
    return scratch.zero_


def synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---- references -----------------------------------------------------------------------------------------------


def errors(out_rows, ref32, ref_lowp) -> dict:
    err = (out_rows.float() - ref32).abs().max().item()
    lowp = (ref_lowp - ref32).abs().max().item()
    return {"max_abs_err": err, "lowp_ref_err": lowp, "err_ok": bool(err <= 2 * lowp + ERR_FLOOR)}


# ---- prefill --------------------------------------------------------------------------------------------------


def prefill_plans(n: int, hq: int, hkv: int) -> dict:
    """Per-query-head spans ``[Hq]`` of the benchmarked plans at length ``n``."""
    import torch

    group = hq // hkv
    rest = max(1, hkv - 3)
    mixed = [n if h < 2 else max(1, round(n / (4 * 4 ** ((h - 2) / rest)))) for h in range(hkv)]  # N, N, N/4 .. N/16
    return {"uniform_n/4": torch.full((hq,), n // 4), "uniform_n/8": torch.full((hq,), n // 8),
            "mixed": torch.tensor(mixed).repeat_interleave(group)}


def sdpa_backends(device) -> dict:
    """Dense causal baselines: name -> SDPA backend (in dry mode on CPU, math stands in for cuDNN)."""
    from torch.nn.attention import SDPBackend

    if device.type == "cuda":
        return {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}
    return {"cudnn": SDPBackend.MATH, "flash": SDPBackend.FLASH_ATTENTION}


def sdpa_fn(q, k, v, backend, *, causal: bool):
    """A call of SDPA pinned to ``backend``; native GQA if it takes it, else K/V expanded beforehand (noted)."""
    import torch.nn.functional as F
    from torch.nn.attention import sdpa_kernel

    def call(kk, vv, gqa):
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(q, kk, vv, is_causal=causal, enable_gqa=gqa)

    try:
        call(k, v, True)
        return (lambda: call(k, v, True)), "gqa native"
    except RuntimeError:
        group = q.shape[1] // k.shape[1]
        ke, ve = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        call(ke, ve, False)
        return (lambda: call(ke, ve, False)), "kv expanded to q heads"


def run_prefill(part: Part, s: Shapes, device, dtype) -> None:
    import torch

    gen = torch.Generator(device=device).manual_seed(0)
    for n in s.prefill_lengths:
        if part.out_of_time():
            part.add({**_prefill_base(s, dtype), "seq_len": n, "plan": "all", "backend": "all",
                      "status": "skipped: time budget"})
            continue
        log(f"prefill N={n}")
        _prefill_length(part, s, n, gen, device, dtype)
        _free(device)


def _prefill_base(s: Shapes, dtype) -> dict:
    return {"mode": s.mode, "batch": s.batch, "q_heads": s.q_heads, "kv_heads": s.kv_heads, "head_dim": s.head_dim,
            "sink": s.sink, "dtype": str(dtype).removeprefix("torch.")}


def _prefill_length(part: Part, s: Shapes, n: int, gen, device, dtype) -> None:
    """The dense baselines at length ``n``, then Flex and Triton on every plan."""
    import torch

    import kernels
    from kernels.flex import moa_attention_flex
    from kernels.pattern import kept_pairs

    q = torch.randn(s.batch, s.q_heads, n, s.head_dim, generator=gen, device=device, dtype=dtype)
    k, v = (torch.randn(s.batch, s.kv_heads, n, s.head_dim, generator=gen, device=device, dtype=dtype)
            for _ in range(2))
    first, last = s.error_rows
    rows = torch.cat([torch.arange(min(first, n)), torch.arange(max(min(first, n), n - last), n)])
    timing = {"warmup": s.warmup, "max_reps": s.max_reps, "seconds": s.seconds_per_fn}
    dense_pairs = s.batch * s.q_heads * n * (n + 1) // 2
    base = {**_prefill_base(s, dtype), "seq_len": n, "dense_pairs": dense_pairs, "err_rows": rows.numel()}

    refs = _references(q, k, v, torch.full((s.q_heads,), n), s.sink, rows, dtype)
    cudnn_ms = NAN
    for name, backend in sdpa_backends(device).items():
        row = {**base, "plan": "dense", "backend": name, "kept_pairs": dense_pairs, "attention_density": 1.0,
               "ideal_speedup": 1.0}
        try:
            fn, row["note"] = sdpa_fn(q, k, v, backend, causal=True)
        except Exception as err:  # noqa: BLE001 - one backend failing must not lose the others
            fn = _raiser(err)
        ms = _measure(row, fn, refs, rows, device, timing)
        cudnn_ms = ms if name == "cudnn" else cudnn_ms
        part.add({**row, **_prefill_speed(ms, dense_pairs, s.head_dim, cudnn_ms), "fraction_of_ideal": cudnn_ms / ms})
        _free(device)

    for plan, spans in prefill_plans(n, s.q_heads, s.kv_heads).items():
        if part.out_of_time():
            part.add({**base, "plan": plan, "backend": "all", "status": "skipped: time budget"})
            continue
        kept = s.batch * sum(kept_pairs(n, int(span), s.sink) for span in spans)
        refs = _references(q, k, v, spans, s.sink, rows, dtype)
        fns = {"flex": partial(moa_attention_flex, q, k, v, spans, s.sink),  # flex first: triton's row needs its time
               "triton": partial(kernels.moa_attention, q, k, v, spans, s.sink, backend="triton")}
        flex_ms = NAN
        for name, fn in fns.items():
            row = {**base, "plan": plan, "backend": name, "kept_pairs": kept, "attention_density": kept / dense_pairs,
                   "ideal_speedup": dense_pairs / kept}
            ms = _measure(row, fn, refs, rows, device, timing)
            flex_ms = ms if name == "flex" else flex_ms
            part.add({**row, **_prefill_speed(ms, kept, s.head_dim, cudnn_ms), "ratio_vs_flex": flex_ms / ms,
                      "fraction_of_ideal": cudnn_ms / ms / (dense_pairs / kept)})
            _free(device)


def _references(q, k, v, spans, sink: int, rows, dtype, q_offset: int = 0) -> tuple:
    """The float32 reference of ``rows`` and the same computed in ``dtype`` (see :func:`errors`)."""
    import torch

    from kernels.bench import masked_rows_reference

    return tuple(masked_rows_reference(q, k, v, spans, sink, rows, t, q_offset) for t in (torch.float32, dtype))


def _measure(row: dict, fn, refs: tuple, rows, device, timing: dict, flush=None) -> float:
    """Fill ``row``'s error, latency and status columns from ``fn``; return its median ms (nan if it failed)."""
    try:
        row.update(errors(fn()[:, :, rows], *refs))
        times = timed_ms(fn, device, flush=flush, **timing)
        row.update(ms_median=statistics.median(times), ms_min=min(times), reps=len(times), status="ok")
    except Exception as err:  # noqa: BLE001 - one backend failing must not lose the others
        row.update(status=f"error: {type(err).__name__}: {err}"[:300])
        log(f"  {row.get('plan', '')} {row['backend']}: {row['status']}")
    return row.get("ms_median", NAN)


def _raiser(err: Exception):
    def fail():
        raise err
    return fail


def _prefill_speed(ms: float, pairs: int, head_dim: int, cudnn_ms: float) -> dict:
    """Useful TFLOP/s (QK^T and PV: 4 * D flops per kept pair) and the speed-up over cuDNN dense."""
    return {"tflops": 4.0 * pairs * head_dim / (ms * 1e-3) / 1e12, "speedup_vs_cudnn": cudnn_ms / ms}


def _free(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---- decode ---------------------------------------------------------------------------------------------------


def packed_cache(k, v, span: int, sink: int):
    """The per-head packed cache of one decode step at position ``N - 1``: every KV head keeps its ``sink`` first
    tokens and its last ``span`` tokens, ``C = min(sink + span, N)`` slots (kernels/kv_cache.py's layout; slot
    order is free). Returns ``k_packed, v_packed`` (B, Hkv * C, D), ``offsets`` (Hkv + 1), ``valid`` (Hkv)."""
    import torch

    b, hkv, n, d = k.shape
    if sink + span >= n:
        keep = torch.arange(n, device=k.device)
    else:
        keep = torch.cat([torch.arange(sink, device=k.device), torch.arange(n - span, n, device=k.device)])
    c = keep.numel()
    packed = [x[:, :, keep].reshape(b, hkv * c, d).contiguous() for x in (k, v)]  # (B, T, D), head-major
    return packed[0], packed[1], [h * c for h in range(hkv + 1)], [c] * hkv


def run_decode(part: Part, s: Shapes, device, dtype) -> None:
    import torch

    gen = torch.Generator(device=device).manual_seed(1)
    flush = l2_flusher(device)
    for n, batch, density in s.decode_cases:
        if part.out_of_time():
            part.add({**_decode_base(s, dtype, n, batch, density), "backend": "all", "status": "skipped: time budget"})
            continue
        log(f"decode N={n} batch={batch} KV density={density}")
        _decode_case(part, s, n, batch, density, gen, flush, device, dtype)
        _free(device)


def _decode_base(s: Shapes, dtype, n: int, batch: int, density: float) -> dict:
    return {"mode": s.mode, "seq_len": n, "batch": batch, "kv_density": density, "q_heads": s.q_heads,
            "kv_heads": s.kv_heads, "head_dim": s.head_dim, "sink": s.sink, "dtype": str(dtype).removeprefix("torch.")}


def _decode_case(part: Part, s: Shapes, n: int, batch: int, density: float, gen, flush, device, dtype) -> None:
    """One decode step of a query at position ``n - 1``: dense SDPA, the packed per-head cache, Flex; called
    eagerly, then (dense and ours) replayed from a CUDA graph, as a decode loop runs it: ours in its default
    schedule (fused merge, two programs per SM), with the two-launch merge, and with 4 and 8 programs per SM."""
    import torch
    import torch.nn.functional as F

    from kernels import triton_decode
    from kernels.decode import packed_decode_attention
    from kernels.flex import moa_decode_flex

    span = max(1, round(density * n) - s.sink)  # KV density (sink + span) / N
    q = torch.randn(batch, s.q_heads, 1, s.head_dim, generator=gen, device=device, dtype=dtype)
    k, v = (torch.randn(batch, s.kv_heads, n, s.head_dim, generator=gen, device=device, dtype=dtype)
            for _ in range(2))
    kp, vp, offsets, valid = packed_cache(k, v, span, s.sink)
    lengths = torch.tensor(valid, dtype=torch.int32, device=device)  # on the device, as the per-head cache holds them
    spans = torch.full((s.q_heads,), span)
    row0 = torch.zeros(1, dtype=torch.int64)
    sparse_refs = _references(q, k, v, spans, s.sink, row0, dtype, q_offset=n - 1)
    dense_refs = _references(q, k, v, torch.full((s.q_heads,), n), s.sink, row0, dtype, q_offset=n - 1)
    per_token = batch * s.head_dim * 2 * torch.empty((), dtype=dtype).element_size()  # K+V of one token, one head
    dense = partial(F.scaled_dot_product_attention, q, k, v, enable_gqa=s.q_heads != s.kv_heads)
    ours = partial(triton_decode.packed_decode_attention_triton, q, kp, vp, offsets, lengths)
    capacities = [hi - lo for lo, hi in zip(offsets, offsets[1:], strict=False)]

    def chunked(per_sm: int, fused: bool = True):
        return partial(ours, fused=fused, chunk=triton_decode.chunk_size(capacities, batch, device, per_sm))

    cases = {  # name: (fn, KV tokens it needs, references, CUDA graph)
        "sdpa_dense": (dense, s.kv_heads * n, dense_refs, False),
        "packed_triton": (partial(packed_decode_attention, q, kp, vp, offsets, lengths, backend="triton"), sum(valid),
                          sparse_refs, False),
        "flex": (partial(moa_decode_flex, q, k, v, spans, s.sink), sum(valid), sparse_refs, False),
        "sdpa_dense_graph": (dense, s.kv_heads * n, dense_refs, True),
        "packed_triton_graph": (chunked(2), sum(valid), sparse_refs, True),
        "packed_triton_graph_separate": (chunked(2, fused=False), sum(valid), sparse_refs, True),
        "packed_triton_graph_4sm": (chunked(4), sum(valid), sparse_refs, True),
        "packed_triton_graph_8sm": (chunked(8), sum(valid), sparse_refs, True),
    }
    timing = {"warmup": s.decode_warmup, "max_reps": s.decode_max_reps, "seconds": s.seconds_per_fn / 2}
    dense_ms = {}
    for name, (fn, tokens, refs, graph) in cases.items():
        row = {**_decode_base(s, dtype, n, batch, density), "backend": name, "kv_bytes": tokens * per_token,
               "ideal_speedup": s.kv_heads * n / tokens,
               "note": "; ".join(x for x in ("L2 flushed before each call" if flush else "",
                                             _graph_note(fn, graph, device)) if x)}
        try:
            fn = graphed(fn, device) if graph else fn
        except Exception as err:  # noqa: BLE001 - a capture failing must not lose the other rows
            fn = _raiser(err)
        ms = _measure(row, fn, refs, row0, device, timing, flush)
        if name.startswith("sdpa_dense"):
            dense_ms[graph] = ms
        reference_ms = dense_ms.get(graph, NAN)
        part.add({**row, "tbps": row["kv_bytes"] / (ms * 1e-3) / 1e12, "speedup_vs_dense": reference_ms / ms,
                  "fraction_of_ideal": reference_ms / ms / row["ideal_speedup"]})


def _graph_note(fn, graph: bool, device) -> str:
    """What a row's schedule was: CUDA graph or eager, the decode chunk and merge where set."""
    kwargs = getattr(fn, "keywords", {}) or {}
    bits = ["CUDA graph replay (vs dense replayed)" if graph and device.type == "cuda" else
            "no CUDA graph on CPU" if graph else "eager"]
    if "chunk" in kwargs:
        bits.append(f"chunk {kwargs['chunk']}, {'fused' if kwargs.get('fused', True) else 'two-launch'} merge")
    return ", ".join(bits)


def graphed(fn, device):
    """``fn`` captured in a CUDA graph after warm-up calls on a side stream (compile, autotune, schedule tables);
    returns a function that replays it and returns its output tensor. On CPU, ``fn`` itself."""
    import torch

    if device.type != "cuda":
        return fn
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()

    def replay():
        graph.replay()
        return out

    return replay


# ---- end to end -----------------------------------------------------------------------------------------------


def random_llama(e: dict, device, dtype):
    """A randomly initialised Llama of the given shape on ``device`` in ``dtype`` (no weights are read)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=e["vocab"], hidden_size=e["hidden"], intermediate_size=e["intermediate"],
        num_hidden_layers=e["layers"], num_attention_heads=e["heads"], num_key_value_heads=e["kv_heads"],
        max_position_embeddings=e["prompt"] + e["new_tokens"] + 64, rope_theta=500000.0, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    with torch.device(device):  # initialised on the device in float32 (about 8 GB at full size), then cast
        model = LlamaForCausalLM(config).to(dtype)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model.eval()


def run_e2e(part: Part, s: Shapes, device, dtype) -> None:
    import torch

    from pipeline.plan import Plan, plan_kv_density
    from pipeline.sparse_runtime import generate, plan_applied

    e = s.e2e
    log(f"e2e: random {e['layers']}-layer model, prompt {e['prompt']}, batch {e['batch']}, {e['new_tokens']} new tokens")
    model = random_llama(e, device, dtype)
    # Token 0 is the pad id: leaving it out keeps generate() from inferring padding (which the moa mask refuses).
    ids = torch.randint(1, e["vocab"], (e["batch"], e["prompt"]), generator=torch.Generator().manual_seed(2)).to(device)
    total = e["prompt"] + e["new_tokens"]
    plan = Plan.uniform(model, e["kv_density"] - s.sink / total, sink=s.sink, min_span=s.sink)
    kv_density = plan_kv_density(plan, total)
    base = {"mode": s.mode, "layers": e["layers"], "prompt_len": e["prompt"], "batch": e["batch"],
            "new_tokens": e["new_tokens"]}
    dense_bytes = 2 * e["layers"] * e["batch"] * e["kv_heads"] * total * (e["hidden"] // e["heads"]) * dtype.itemsize
    methods = {"dense": (partial(_dense_generate, model, ids), 1.0),
               "moa_uniform": (partial(generate, model, ids), kv_density)}  # run(new): generate `new` tokens
    for name, (run, density) in methods.items():
        row = {**base, "method": name, "kv_density": density, "kv_cache_gib": dense_bytes * density / 2**30}
        if part.out_of_time():
            part.add({**row, "status": "skipped: time budget"})
            continue
        try:
            with plan_applied(model, plan, backend="triton") if name != "dense" else _nothing():
                with torch.no_grad():
                    _seconds(run, 2, device)  # warm-up: kernels compiled and tuned at these shapes
                    if device.type == "cuda":
                        torch.cuda.reset_peak_memory_stats(device)
                    prefill_s = _seconds(run, 1, device)
                    total_s = _seconds(run, e["new_tokens"], device)
            tokens = e["batch"] * e["new_tokens"]
            row.update(prefill_s=prefill_s, total_s=total_s, tokens_per_s=tokens / total_s,
                       decode_tokens_per_s=e["batch"] * (e["new_tokens"] - 1) / max(total_s - prefill_s, 1e-9),
                       peak_mem_gib=torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else NAN,
                       status="ok", note="plan: uniform span, Triton prefill and decode" if name != "dense" else "sdpa")
        except Exception as err:  # noqa: BLE001
            row.update(status=f"error: {type(err).__name__}: {err}"[:300])
            log(f"  {name}: {row['status']}")
        part.add(row)
        log(f"  {name}: {row['status']}")


def _dense_generate(model, ids, new_tokens: int, **kwargs):
    return model.generate(ids, max_new_tokens=new_tokens, **kwargs)


def _seconds(run, new_tokens: int, device) -> float:
    """Wall time of generating exactly ``new_tokens`` greedy tokens."""
    synchronize(device)
    started = time.perf_counter()
    run(new_tokens, min_new_tokens=new_tokens, do_sample=False)
    synchronize(device)
    return time.perf_counter() - started


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


# ---- tests ----------------------------------------------------------------------------------------------------


def run_tests(part: Part, s: Shapes, out: Path) -> None:
    """``pytest -m gpu`` on the CUDA test files, in a subprocess with a timeout; one row per test case."""
    if importlib.util.find_spec("pytest") is None:
        part.add({"mode": s.mode, "test": "(all)", "outcome": "skipped", "message": "pytest is not installed here: "
                  "tests not run, the benchmarks still check every kernel against float32"})
        log("tests: pytest is not installed; skipping to the benchmarks")
        return
    junit = out / "tests_junit.xml"
    env = dict(os.environ, TRITON_INTERPRET="1" if s.mode == "dry" else "0", MOA_NO_PROGRESS="1")
    if s.mode != "dry":  # tests never autotune: one compile per shape
        env.setdefault("MOA_TRITON_PREFILL_CONFIG", PINNED_PREFILL_CONFIG)
        env.setdefault("MOA_TRITON_DECODE_CONFIG", PINNED_DECODE_CONFIG)
    files = sorted(str(p.relative_to(REPO)) for p in (REPO / "tests").glob("test_*.py") if "mark.gpu" in p.read_text())
    # -v: one line per finished test, so a timeout still shows how far it got; a test stuck for 45 s dumps stacks.
    command = [sys.executable, "-m", "pytest", "-m", "gpu", "-v", "-p", "no:cacheprovider", "-o",
               "faulthandler_timeout=45",
               "--continue-on-collection-errors", f"--junitxml={junit}", *files]
    log(f"tests: {' '.join(command[1:])} (timeout {s.test_timeout_s} s)")
    try:
        done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=s.test_timeout_s)
        tail = (done.stdout + done.stderr)[-3000:]
    except subprocess.TimeoutExpired as err:
        out_text = err.stdout.decode() if isinstance(err.stdout, bytes) else (err.stdout or "")
        (out / "tests_output.txt").write_text(out_text)
        print(out_text[-3000:], flush=True)
        part.add({"mode": s.mode, "test": "(all)", "outcome": "error", "status": "error",
                  "message": f"pytest timed out after {s.test_timeout_s} s"})
        return
    (out / "tests_output.txt").write_text(done.stdout + done.stderr)
    print(tail, flush=True)
    cases = junit_cases(junit) if junit.is_file() else []
    for case in cases:
        part.add({"mode": s.mode, **case})
    if done.returncode not in (0, 5) or not cases:  # 5: nothing collected (every test deselected)
        part.add({"mode": s.mode, "test": "(pytest)", "outcome": "error",
                  "message": f"pytest exited {done.returncode}: {tail.strip().splitlines()[-1] if tail.strip() else ''}"})


def junit_cases(path: Path) -> list[dict]:
    """``test, outcome, seconds, message`` of every test case (and collection error) in a JUnit XML file."""
    cases = []
    for case in ET.parse(path).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            child = case.find(tag)
            if child is not None:
                outcome = {"failure": "failed"}.get(tag, tag)
                message = (child.get("message") or "")[:300]
                break
        name = f"{case.get('classname', '')}::{case.get('name', '')}".strip(":")
        cases.append({"test": name, "outcome": outcome, "seconds": float(case.get("time") or 0.0), "message": message})
    return cases


# ---- summary and main -----------------------------------------------------------------------------------------


def summary(out: Path, s: Shapes, parts: list[Part], device_name: str) -> str:
    failed = [p.name for p in parts if p.status != "ok" or p.failed_rows() or _failed_tests(p)]
    skipped = [p.name for p in parts if any(str(r.get("status", "")).startswith("skipped") for r in p.rows)]
    lines = ["# GPU check", ""]
    if s.mode == "dry":
        lines += ["**DRY RUN (mode `dry`): CPU, tiny shapes, fp32, Triton under the interpreter. Every time and speed "
                  "figure below is meaningless; only the code paths, columns and errors are checked.**", ""]
    lines += [f"- device: {device_name}", f"- parts failed: {', '.join(failed) or 'none'}",
              f"- parts incomplete (time budget): {', '.join(skipped) or 'none'}", ""]
    for p in parts:
        lines += [f"## {p.name} ({p.status}, {p.seconds:.0f} s): `{p.path.name}`", ""]
        keys = {"tests": ("test", "outcome", "seconds", "message"),
                "prefill": ("seq_len", "plan", "backend", "ms_median", "tflops", "speedup_vs_cudnn", "ideal_speedup",
                            "fraction_of_ideal", "ratio_vs_flex", "max_abs_err", "err_ok", "status"),
                "decode": ("seq_len", "batch", "kv_density", "backend", "ms_median", "tbps", "speedup_vs_dense",
                           "ideal_speedup", "max_abs_err", "err_ok", "status"),
                "e2e": ("method", "kv_density", "prefill_s", "total_s", "tokens_per_s", "decode_tokens_per_s",
                        "peak_mem_gib", "status")}[p.name]
        rows = p.rows
        if p.name == "tests":  # a tally, then the cases that did not pass
            tally = {o: sum(r["outcome"] == o for r in p.rows) for o in sorted({r["outcome"] for r in p.rows})}
            lines += [f"outcomes: {tally or 'none'}", ""]
            rows = [r for r in p.rows if r["outcome"] != "passed"]
        if rows:
            lines += ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
            lines += ["| " + " | ".join(_cell(r.get(k)) for k in keys) + " |" for r in rows]
            lines.append("")
        if p.error:
            lines += ["```", p.error.strip()[-2000:], "```", ""]
    text = "\n".join(lines)
    (out / "summary.md").write_text(text)
    return text


def _failed_tests(part: Part) -> bool:
    return part.name == "tests" and any(r["outcome"] in ("failed", "error") for r in part.rows)


def _cell(value) -> str:
    if isinstance(value, float):
        return "-" if math.isnan(value) else f"{value:.4g}"
    return str(value).replace("|", "/")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry", action="store_true", help="tiny shapes on CPU (also GPU_CHECK_DRY=1)")
    parser.add_argument("--out", default=os.environ.get("OUT"), help="output folder (default $OUT)")
    parser.add_argument("--parts", default="tests,prefill,decode,e2e", help="comma-separated subset of the parts")
    args = parser.parse_args(argv)
    dry = args.dry or os.environ.get("GPU_CHECK_DRY", "0") == "1"
    if not args.out:
        parser.error("no output folder: set $OUT or pass --out")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # Triton reads TRITON_INTERPRET when the kernel modules are imported: set it before any import of them.
    os.environ["TRITON_INTERPRET"] = "1" if dry else "0"
    sys.path.insert(0, str(REPO))
    import torch

    s = DRY if dry else GPU
    if dry:
        device, dtype, device_name = torch.device("cpu"), torch.float32, "cpu (dry)"
    elif torch.cuda.is_available():
        device, dtype, device_name = torch.device("cuda"), torch.bfloat16, torch.cuda.get_device_name()
    else:
        (out / "summary.md").write_text("# GPU check\n\nNo CUDA device: nothing ran (use --dry on a CPU machine).\n")
        log("no CUDA device; use --dry on a CPU machine")
        return 1
    _raise_recompile_limit(torch)
    log(f"mode {s.mode} on {device_name}; torch {torch.__version__}; writing to {out}")
    runners = {"tests": (TESTS_COLUMNS, lambda p: run_tests(p, s, out)),
               "prefill": (PREFILL_COLUMNS, lambda p: run_prefill(p, s, device, dtype)),
               "decode": (DECODE_COLUMNS, lambda p: run_decode(p, s, device, dtype)),
               "e2e": (E2E_COLUMNS, lambda p: (run_e2e(p, s, device, dtype), _free(device)))}
    parts = []
    for name in args.parts.split(","):
        columns, runner = runners[name]
        part = Part(out, name, columns, s.budgets.get(name))
        try:
            runner(part)
            part.status = "ok"
        except Exception:  # noqa: BLE001 - a failed part must not lose the others
            part.status, part.error = "failed", traceback.format_exc()
            log(f"{name} failed:\n{part.error}")
        part.seconds = time.monotonic() - part.started
        log(f"{name}: {part.status} in {part.seconds:.0f} s, {len(part.rows)} rows")
        parts.append(part)
        summary(out, s, parts, device_name)
    text = summary(out, s, parts, device_name)
    print(text, flush=True)
    bad = any(p.status != "ok" or p.failed_rows() or _failed_tests(p) for p in parts)
    return 1 if bad else 0


def _raise_recompile_limit(torch) -> None:
    """Flex is compiled per shape (3 prefill lengths, 3 decode shapes); keep it compiled past dynamo's default."""
    import torch._dynamo

    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(32, getattr(torch._dynamo.config, name)))
            return


if __name__ == "__main__":
    sys.exit(main())
