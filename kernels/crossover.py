"""The ``auto`` prefill backend: the sparse kernel or dense masked attention, from a crossover measured here.

At short lengths the sparse kernel (``cpu`` on CPU, ``triton`` on CUDA) can be slower than dense attention: it
skips masked pairs but pays for more, smaller kernel calls. ``auto`` therefore picks, per call, whichever of the
two exact implementations measured faster on this machine at that length ``N`` and attention density (kept pairs
over causal pairs, the mean over query heads):

- **sparse**: the ``cpu`` / ``triton`` backend;
- **dense masked**: :func:`moa_attention_dense_masked`, dense attention under the same token-level mask. On CPU it
  is one call of PyTorch's fused causal flash-attention op (which skips the blocks above the diagonal) with an
  additive mask of the pairs beyond the band: dense causal attention's work plus reading the mask (measured on a
  2-core CPU: within about 10% of it up to 2k tokens, 25% more at 4k); on CUDA it is SDPA with a boolean mask.
  Masks are built once per ``(N, span, sink)`` and cached.

**Measuring.** The first ``auto`` call for a new :func:`cache_key` (device, torch version, dtype, head_dim, heads,
sink, thread count) times both implementations on random tensors of the caller's shape (:func:`measure_points`)
for each *unit*: a density of :data:`GRID_DENSITIES` in a layout of :data:`LAYOUTS` (one span for all heads, or
spans that differ per KV head as in a ``kv_head`` plan: the sparse kernel runs one batch per distinct span, so the
two cost differently). Over the lengths of :data:`GRID_LENGTHS` it searches each unit's crossover: the middle
length first, then downwards while the sparse kernel wins, upwards while it loses, then the midpoint where the
result flips. Each length runs interleaved rounds (dense masked, then the sparse kernel at each unit), and a
point's ratio ``dense_ms / sparse_ms`` is the median over rounds (load drifting between rounds hits both alike),
or the ratio of the fastest rounds where that is smaller (one slow dense round cannot fake a win). No measurement
starts that is predicted to take the sweep past :data:`BUDGET_S`. It prints one line and takes a few seconds;
the points go to ``${MOA_CACHE_DIR:-~/.cache/moa-autotune}/crossover.json`` (written atomically), so later
processes only read them. A corrupt or unreadable cache is measured again; delete the file to measure again on
purpose (a measurement made while the machine was busy stays until then).

**Choosing** (:meth:`Crossover.choose`): dense unless the sparse kernel wins (``ratio >= WIN_MARGIN``) at both
grid densities just above and below the call's density, for the call's layout. At each of them the ratio at ``N``
is interpolated, linearly in ``log N``, between the measured lengths just below and above it (the search measures
the midpoint where the result flips, so these are close): a prompt of 496 tokens is judged mostly by the 512-token
point, not by the 384-token one. Below the first grid length, or above the densest grid density, dense is chosen
without measuring; above the last measured length the last one stands; below the first measured length of a
density, and where nothing was measured (out of budget), the sparse kernel loses.

**Forcing.** ``MOA_CROSSOVER`` overrides the choice: ``sparse`` (always the sparse kernel), ``dense`` (always dense
masked), ``off`` (no crossover: ``auto`` as before it existed, the sparse kernel, or ``reference`` where the
sparse kernel cannot run), unset or ``auto`` (the measured crossover).
"""

from __future__ import annotations

import bisect
import contextlib
import functools
import itertools
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from kernels.pattern import kept_pairs
from kernels.tensor_cache import cached

ENV_MODE = "MOA_CROSSOVER"
MODES = ("auto", "sparse", "dense", "off")
CACHE_FILE = "crossover.json"
CACHE_VERSION = 6
"""Bumped when measuring, the grid or either implementation changes; entries of another version are measured again
(version 3: every length has a warm-up round, and a loss settles only after two rounds, like a win; 4: lengths
from 256, density 0.875; 5: dense masked runs one call per KV-head span with shared per-span masks; 6: the sparse
kernel keeps its masks across layers, slices instead of gathering heads, and runs the causal prefix in one call)."""
GRID_LENGTHS = (256, 512, 1024, 2048, 4096, 8192)
"""Lengths searched for each density's crossover (then the midpoint where it flips); dense below the first."""
GRID_DENSITIES = (0.25, 0.5, 0.75, 0.875)
"""Attention densities measured; a call denser than the last is dense without measuring."""
LAYOUTS = ("mixed", "uniform")
"""How a call's spans vary: ``uniform``, one span for every head; ``mixed``, anything else (as in a plan, where each
KV head has its own rule). The sparse kernel runs one batch of heads per distinct span, so they cost differently
and are measured apart."""
WIN_MARGIN = 1.05
"""The sparse kernel wins a point when its :attr:`Point.ratio` is at least this."""
BUDGET_S = 15.0
"""No measurement starts that is predicted to take the sweep past this many seconds."""


# --------------------------------------------------------------------------------------------------------------
# Dense masked attention


def moa_attention_dense_masked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spans: torch.Tensor, sink: int,
                               scale: float | None = None) -> torch.Tensor:
    """Exact dense attention under the sink-plus-band mask, differentiable.

    q: (B, Hq, N, D); k, v: (B, Hkv, N, D); spans: (Hq,) ints at this N. On CPU: the fused causal flash op with an
    additive mask of the pairs beyond the band (no mask where band and sink cover every causal pair). When the
    query heads of each KV head share a span (every ``kv_head`` plan), one call per run of KV heads with the same
    span, each with that span's ``(N, N)`` mask; otherwise one call with a mask per query head. Elsewhere, SDPA
    with a boolean mask. Masks are cached per ``(N, span, sink)``, so a model's layers share them: a plan has a
    dozen distinct spans at a length, where per-layer masks (one per KV head) would not fit the cache and be
    rebuilt at every layer. No gathers: on a busy machine every extra parallel op costs a scheduler wake-up. A
    head with span 0 and no sink gets zeros.
    """
    b, hq, n, d = q.shape
    hkv = k.shape[1]
    group = hq // hkv
    scale = d**-0.5 if scale is None else float(scale)
    span_list = tuple(min(int(s), n) for s in spans.tolist())
    if sink == 0 and not any(span_list):
        return q * 0  # no key kept anywhere: zeros, still connected to the graph
    if not (q.device.type == "cpu" and fused_causal_masked_ok()):
        return _sdpa_masked(q, k, v, span_list, sink, scale)
    if not any(_needs_mask(n, s, sink) for s in span_list):
        return _FusedCausalMasked.apply(q, k, v, None, scale)
    kv_spans = span_list[::group]
    if span_list == tuple(s for s in kv_spans for _ in range(group)):
        outs, h0 = [], 0  # one call per run of KV heads sharing a span (all heads when spans are uniform)
        for span, run in itertools.groupby(kv_spans):
            h1 = h0 + len(list(run))
            mask = masks("far", n, (span,), sink, q.dtype, q.device)[0] if _needs_mask(n, span, sink) else None
            outs.append(_FusedCausalMasked.apply(q[:, h0 * group:h1 * group], k[:, h0:h1], v[:, h0:h1], mask,
                                                 scale))  # (B, (h1 - h0) * group, N, D)
            h0 = h1
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)  # (B, Hq, N, D)
    return _FusedCausalMasked.apply(q, k, v, masks("far", n, span_list, sink, q.dtype, q.device).unsqueeze(0), scale)


def _sdpa_masked(q, k, v, span_list: tuple[int, ...], sink: int, scale: float) -> torch.Tensor:
    """SDPA under the pattern: causal where nothing else is dropped, else a boolean keep mask (one per head)."""
    n = q.shape[2]
    gqa = q.shape[1] != k.shape[1]
    if not any(_needs_mask(n, s, sink) for s in span_list):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    uniform = len(set(span_list)) == 1
    keep = masks("keep", n, span_list[:1] if uniform else span_list, sink, torch.bool, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=keep[0] if uniform else keep.unsqueeze(0), scale=scale,
                                          enable_gqa=gqa)


def _needs_mask(n: int, span: int, sink: int) -> bool:
    """Whether the pattern drops any causal pair: some ``j >= sink`` with ``i - j >= span``."""
    return span + sink < n


def masks(kind: str, n: int, spans: tuple[int, ...], sink: int, dtype: torch.dtype, device) -> torch.Tensor:
    """``(len(spans), n, n)`` masks, one per span, cached.

    ``far``: additive, for a causal flag: ``-inf`` where ``j >= sink`` and ``i - j >= span``, else 0 (above the
    diagonal too: the flag masks it). ``keep``: boolean, the kept pairs, causality included."""
    device = torch.device(device)

    def build_far():
        base = cached(("far_base", n, sink, dtype, str(device)), lambda: _far_base(n, sink, dtype, device))
        out = torch.empty(len(spans), n, n, dtype=dtype, device=device)
        first: dict[int, int] = {}
        for h, s in enumerate(spans):
            if s in first:
                out[h].copy_(out[first[s]])
            else:
                first[s] = h
                torch.tril(base, -s, out=out[h])  # keeps base (-inf but the sink) where j <= i - s, 0 elsewhere
        return out

    def build_keep():
        i = torch.arange(n, device=device).view(1, -1, 1)
        j = torch.arange(n, device=device).view(1, 1, -1)
        s = torch.tensor(spans, device=device).view(-1, 1, 1)
        return (j <= i) & ((j < sink) | (i - j < s))

    return cached((kind, n, spans, sink, dtype, str(device)), build_far if kind == "far" else build_keep)


def _far_base(n: int, sink: int, dtype: torch.dtype, device) -> torch.Tensor:
    base = torch.full((n, n), float("-inf"), dtype=dtype, device=device)
    base[:, :sink] = 0
    return base


class _FusedCausalMasked(torch.autograd.Function):
    """PyTorch's fused CPU flash attention with the causal flag and an additive mask; GQA by head count."""

    @staticmethod
    def forward(ctx, q, k, v, mask, scale):
        from kernels.cpu import fused_ops

        out, lse = fused_ops()[0](q, k, v, 0.0, True, attn_mask=mask, scale=scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.mask, ctx.scale = mask, scale
        return out

    @staticmethod
    def backward(ctx, dout):
        from kernels.cpu import fused_ops

        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = fused_ops()[1](dout.contiguous(), q, k, v, out, lse, 0.0, True, attn_mask=ctx.mask,
                                    scale=ctx.scale)
        return dq, dk, dv, None, None


@functools.cache
def fused_causal_masked_ok() -> bool:
    """Whether the fused CPU flash op, with a causal flag, an additive mask and fewer KV heads than query heads,
    matches a float64 dense computation in output and gradients (checked once, on a tiny problem)."""
    from kernels import cpu

    if cpu._ops()[0] is cpu.portable_flash_forward:  # the CPU kernel already found the fused ops unusable
        return False
    try:
        with torch.inference_mode(False), torch.enable_grad():
            gen = torch.Generator().manual_seed(0)
            q = torch.randn(1, 4, 11, 8, generator=gen, requires_grad=True)
            k, v = (torch.randn(1, 2, 11, 8, generator=gen, requires_grad=True) for _ in range(2))
            dout = torch.randn(1, 4, 11, 8, generator=gen)
            spans = (3, 5, 3, 0)  # one mask per query head
            out = _FusedCausalMasked.apply(q, k, v, masks("far", 11, spans, 2, q.dtype, "cpu").unsqueeze(0), 0.5)
            grads = torch.autograd.grad(out, (q, k, v), dout)
            q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
            keep = masks("keep", 11, spans, 2, torch.bool, "cpu")
            scores = (q64 @ k64.repeat_interleave(2, 1).transpose(-1, -2) * 0.5).masked_fill(~keep, float("-inf"))
            ref = torch.softmax(scores, dim=-1) @ v64.repeat_interleave(2, 1)
            refs = torch.autograd.grad(ref, (q64, k64, v64), dout.double())
            return all(torch.allclose(a.double(), b, atol=1e-4) for a, b in zip((out, *grads), (ref, *refs),
                                                                                strict=True))
    except Exception:  # noqa: BLE001 - a private op failing in any way means: use SDPA
        return False


# --------------------------------------------------------------------------------------------------------------
# The crossover table


@dataclass(frozen=True)
class Shape:
    """What a measurement is made for: the caller's attention shape, dtype, device and sink."""

    heads: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype
    device: torch.device
    sink: int

    @classmethod
    def of(cls, q: torch.Tensor, k: torch.Tensor, sink: int) -> Shape:
        return cls(q.shape[1], k.shape[1], q.shape[3], q.dtype, q.device, int(sink))


@functools.cache
def device_name(device: torch.device) -> str:
    """The accelerator's name on CUDA; the CPU model otherwise."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or device.type


def cache_key(shape: Shape) -> str:
    """The cache entry's name: everything a measured crossover depends on."""
    return "|".join([
        f"{shape.device.type}:{device_name(shape.device)}", f"torch={torch.__version__}",
        f"dtype={str(shape.dtype).replace('torch.', '')}", f"head_dim={shape.head_dim}",
        f"heads={shape.heads}/{shape.kv_heads}", f"sink={shape.sink}", f"threads={torch.get_num_threads()}",
    ])


def cache_path() -> Path:
    """``${MOA_CACHE_DIR:-~/.cache/moa-autotune}/crossover.json``."""
    root = os.environ.get("MOA_CACHE_DIR") or Path.home() / ".cache" / "moa-autotune"
    return Path(root) / CACHE_FILE


@dataclass(frozen=True)
class Point:
    """One measured point: length, grid density, the density actually measured, and the speed-up of sparse."""

    n: int
    target: float
    density: float
    ratio: float
    """``dense_ms / sparse_ms``, the smaller of its median over rounds and the ratio of the fastest rounds (a
    busy machine's spikes then cannot fake a win): above 1, the sparse kernel is faster."""
    sparse_ms: float
    dense_ms: float
    layout: str = "mixed"
    """One of :data:`LAYOUTS`."""

    @property
    def unit(self) -> tuple[float, str]:
        return self.target, self.layout


def layout_of(spans) -> str:
    """The :data:`LAYOUTS` name of a call's spans."""
    return "uniform" if len({int(s) for s in spans}) <= 1 else "mixed"


class Crossover:
    """Measured points and the conservative choice between them."""

    def __init__(self, points: list[Point], margin: float = WIN_MARGIN):
        self.points = sorted(points, key=lambda p: (p.layout, p.target, p.n))
        self.margin = margin
        self.by_unit: dict[tuple[float, str], list[Point]] = {}
        for p in self.points:
            self.by_unit.setdefault(p.unit, []).append(p)

    def choose(self, n: int, density: float, layout: str = "mixed") -> str:
        """``"sparse"`` if the sparse kernel wins at ``n`` at both neighbouring densities measured for ``layout``,
        else ``"dense"``."""
        targets = sorted(t for t, lay in self.by_unit if lay == layout)
        if not targets or density > targets[-1]:
            return "dense"
        hi = bisect.bisect_left(targets, density)
        neighbours = {targets[hi]} | ({targets[hi - 1]} if hi > 0 else set())
        return "sparse" if all(self._wins(self.by_unit[t, layout], n) for t in neighbours) else "dense"

    def _wins(self, points: list[Point], n: int) -> bool:
        """Whether the sparse kernel wins at ``n`` by the ratio interpolated (in log length) between the measured
        lengths around it; the last one stands beyond them, and below the first it loses."""
        lengths = [p.n for p in points]
        if n < lengths[0]:
            return False
        lo = bisect.bisect_right(lengths, n) - 1
        if lengths[lo] == n or lo + 1 == len(points):
            return points[lo].ratio >= self.margin
        below, above = points[lo], points[lo + 1]
        weight = math.log(n / below.n) / math.log(above.n / below.n)
        return below.ratio + weight * (above.ratio - below.ratio) >= self.margin

    def to_json(self) -> list[dict]:
        return [p.__dict__ for p in self.points]

    @classmethod
    def from_json(cls, rows) -> Crossover:
        """From stored points; ValueError (or TypeError/KeyError) on anything malformed."""
        if not isinstance(rows, list) or not rows:
            raise ValueError("no measured points")
        points = [Point(int(r["n"]), float(r["target"]), float(r["density"]), float(r["ratio"]),
                        float(r["sparse_ms"]), float(r["dense_ms"]), str(r["layout"])) for r in rows]
        if any(p.n <= 0 or not p.ratio > 0 or p.layout not in LAYOUTS for p in points):
            raise ValueError("bad measured point")
        return cls(points)


def spans_density(n: int, spans, sink: int) -> float:
    """Attention density of a call: kept pairs over causal pairs, averaged over query heads."""
    values = [min(int(s), n) for s in spans]
    return sum(_kept(n, s, int(sink)) for s in values) / (len(values) * n * (n + 1) / 2)


@functools.lru_cache(maxsize=4096)
def _kept(n: int, span: int, sink: int) -> int:
    return kept_pairs(n, span, sink)


def span_for_density(n: int, target: float, sink: int) -> int:
    """The smallest span (at least 1) whose density at ``n`` is at least ``target``."""
    lo, hi = 1, n
    while lo < hi:
        mid = (lo + hi) // 2
        if _kept(n, mid, sink) / (n * (n + 1) / 2) >= target:
            hi = mid
        else:
            lo = mid + 1
    return lo


def _sparse_fn(device: torch.device) -> Callable:
    if device.type == "cuda":
        from kernels.triton_prefill import moa_attention_triton

        return moa_attention_triton
    from kernels.cpu import moa_attention_cpu

    return moa_attention_cpu


def measure_points(shape: Shape, lengths=GRID_LENGTHS, densities=GRID_DENSITIES, layouts=LAYOUTS, *,
                   timer: Callable[[], float] = time.perf_counter, budget_s: float = BUDGET_S) -> list[Point]:
    """Time sparse vs dense masked on random tensors of ``shape`` (batch 1): the crossover's points.

    Relies on the sparse kernel's advantage growing with ``N`` (at a fixed density) to find, per density and
    layout (a *unit*), the first length of ``lengths`` where it wins, with few measurements and the long, costly
    lengths last:

    1. every unit at the middle length;
    2. downwards, each unit that won there, until it loses (cheap);
    3. upwards, each unit that lost, until it wins;
    4. the midpoint of the two lengths where a unit's result flips.

    A length measures all the units that need it together (dense masked timed once per round and layout), but only
    those predicted to fit in ``budget_s`` (sparsest, then cheapest first); an unmeasured point counts as a loss.
    ``mixed`` is measured only where heads can differ (more than one head).
    """
    sync = torch.cuda.synchronize if shape.device.type == "cuda" else (lambda: None)
    sparse = _sparse_fn(shape.device)
    gen = torch.Generator().manual_seed(0)
    lengths = sorted(lengths)
    layouts = [lay for lay in layouts if lay == "uniform" or shape.heads > 1]
    units = [(d, lay) for d in sorted(densities) for lay in layouts]
    points: list[Point] = []
    start = timer()

    def predicted(n: int, todo: list[tuple[float, str]]) -> float:
        """Seconds to measure ``todo`` at ``n``, from the per-call times at the nearest measured length, scaled
        by ``(n / m)^2`` upwards and ``n / m`` downwards (a unit not measured there: the slowest one's)."""
        if not points:
            return 0.0
        m = min({p.n for p in points}, key=lambda m: abs(math.log(n / m)))
        at = {p.unit: p for p in points if p.n == m}
        sparse_worst = max(p.sparse_ms for p in at.values())
        dense = {p.layout: p.dense_ms for p in at.values()}
        per_round = sum(dense.get(lay, max(dense.values())) for lay in {lay for _, lay in todo})
        per_round += sum(at[u].sparse_ms if u in at else sparse_worst for u in todo)
        return sum(_schedule(n)) * per_round / 1e3 * (n / m) ** (2 if n > m else 1)

    def run(n: int, todo: list[tuple[float, str]]) -> dict[tuple[float, str], bool]:
        """Measure at ``n`` the units of ``todo`` that fit in the budget, taken sparsest (the likeliest to win)
        and then cheapest first; whether the sparse kernel won, per unit measured."""
        left = budget_s - (timer() - start)
        chosen: list[tuple[float, str]] = []
        for u in sorted(todo, key=lambda u: (u[0], predicted(n, [u]))):
            if predicted(n, [*chosen, u]) <= left:
                chosen.append(u)
        if not chosen:
            return {}
        todo = sorted(chosen)
        new = _measure_length(shape, n, todo, sparse, gen, sync, timer)
        points.extend(new)
        return {p.unit: p.ratio >= WIN_MARGIN for p in new}

    with torch.no_grad():
        mid = (len(lengths) - 1) // 2
        first = run(lengths[mid], units)
        down = [u for u in units if first.get(u)]
        for n in reversed(lengths[:mid]):
            down = [u for u, won in run(n, down).items() if won]
        up = [u for u in units if first.get(u) is False]
        for n in lengths[mid + 1:]:
            up = [u for u, won in run(n, up).items() if not won]
        refine: dict[int, list[tuple[float, str]]] = {}
        for u in units:
            mine = sorted((p for p in points if p.unit == u), key=lambda p: p.n)
            flip = next((i for i in range(1, len(mine)) if mine[i].ratio >= WIN_MARGIN > mine[i - 1].ratio), None)
            if flip is not None and mine[flip].n - mine[flip - 1].n > 1:
                refine.setdefault((mine[flip - 1].n + mine[flip].n) // 2, []).append(u)
        for n in sorted(refine):
            run(n, refine[n])
    return points


def plan_spans(shape: Shape, n: int, density: float, layout: str = "mixed") -> torch.Tensor:
    """Query-head spans ``[Hq]`` of mean attention density at least ``density``. ``uniform``: one span. ``mixed``:
    like a ``kv_head`` plan's, each KV head its own span (each query head where there is one KV head), their
    densities spread evenly over ``density * (1 -+ delta)`` (``delta`` up to 1/2)."""
    if layout == "uniform":
        return torch.full((shape.heads,), span_for_density(n, density, shape.sink))
    units = shape.kv_heads if shape.kv_heads > 1 else shape.heads
    delta = min(0.5, (1 - density) / density) if units > 1 else 0.0
    targets = [density * (1 - delta + 2 * delta * i / max(1, units - 1)) for i in range(units)]
    return torch.tensor([span_for_density(n, t, shape.sink) for t in targets]).repeat_interleave(
        shape.heads // units)


def _measure_length(shape: Shape, n: int, units, sparse: Callable, gen, sync, timer) -> list[Point]:
    """The points of one length: the sparse kernel at each unit (density, layout) against dense masked with the
    same layout (its masks: the middle density's), interleaved.

    One untimed round (first-call costs), then up to 5 timed rounds up to 1024 tokens and 3 beyond; a unit whose
    result is already decisive (:data:`DECISIVE`) is not timed again."""
    q = torch.randn(1, shape.heads, n, shape.head_dim, generator=gen).to(shape.device, shape.dtype)
    k, v = (torch.randn(1, shape.kv_heads, n, shape.head_dim, generator=gen).to(shape.device, shape.dtype)
            for _ in range(2))
    spans = {u: plan_spans(shape, n, *u) for u in units}
    fns = {}
    for lay in dict.fromkeys(lay for _, lay in units):
        mine = [u for u in units if u[1] == lay]
        middle = spans[mine[len(mine) // 2]]
        fns[lay] = lambda s=middle: moa_attention_dense_masked(q, k, v, s, shape.sink)
    fns |= {u: (lambda s=spans[u]: sparse(q, k, v, s, shape.sink)) for u in units}
    times = _interleaved(fns, *_schedule(n), sync, timer)
    points = []
    for u in units:
        dense = times[u[1]]
        ratio = min(statistics.median(a / b for a, b in zip(dense, times[u], strict=False)),
                    min(dense) / min(times[u]))
        points.append(Point(n, u[0], spans_density(n, spans[u].tolist(), shape.sink), ratio,
                            statistics.median(times[u]) * 1e3, statistics.median(dense) * 1e3, u[1]))
    return points


def _schedule(n: int) -> tuple[int, int]:
    """(untimed rounds, timed rounds) at length ``n``: one untimed round everywhere, since a first call pays for
    one-time work (the fused op's check, chunk plans and masks for new spans) that a run pays only once."""
    return 1, (5 if n <= 1024 else 3)


DECISIVE = 2.5
"""A point is settled early, and not timed again, once the sparse kernel has been this many times slower (lost) or
faster (won) than dense in each of at least two rounds: one round, on a busy machine, can mislead either way."""


def _interleaved(fns: dict, warmup: int, rounds: int, sync, timer) -> dict[object, list[float]]:
    """Seconds per call of each function over up to ``rounds`` interleaved rounds, after ``warmup`` untimed ones.

    The dense functions (named by a layout) are timed every round; a unit ``(density, layout)`` stops being timed
    once its ratios to its layout's dense are decisive (:data:`DECISIVE`)."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    sync()
    times = {name: [] for name in fns}
    active = list(fns)
    for _ in range(rounds):
        for name in active:
            t = timer()
            fns[name]()
            sync()
            times[name].append(max(timer() - t, 1e-9))
        active = [name for name in active if isinstance(name, str) or not _settled(times[name[1]], times[name])]
    return times


def _settled(dense: list[float], other: list[float]) -> bool:
    ratios = [a / b for a, b in zip(dense, other, strict=False)]
    return len(ratios) >= 2 and (all(r < 1 / DECISIVE for r in ratios) or all(r > DECISIVE for r in ratios))


# --------------------------------------------------------------------------------------------------------------
# The cache file


def _read_entries(path: Path) -> dict:
    """The cache's entries; {} when the file is missing, and (saying so) when it is unreadable or corrupt."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as err:
        print(f"kernels.crossover: ignoring unreadable {path} ({type(err).__name__}); measuring again",
              file=sys.stderr, flush=True)
        return {}
    if not isinstance(data, dict) or data.get("version") != CACHE_VERSION or not isinstance(data.get("entries"), dict):
        return {}
    return data["entries"]


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path``, then rename it over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


_memo: dict[tuple[str, str], Crossover] = {}


def crossover_for(shape: Shape, *, measure: Callable[[Shape], list[Point]] | None = None,
                  path: Path | None = None) -> Crossover:
    """The crossover of ``shape``: from memory, else from the cache file, else measured now and stored."""
    path = cache_path() if path is None else Path(path)
    key = cache_key(shape)
    if (str(path), key) in _memo:
        return _memo[(str(path), key)]
    entry = _read_entries(path).get(key)
    try:
        table = Crossover.from_json(entry["points"])
    except (TypeError, KeyError, ValueError):
        print(f"kernels.crossover: measuring sparse vs dense attention once for {key} (cached in {path})",
              file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        table = Crossover((measure or measure_points)(shape))
        entries = _read_entries(path)  # again: another process may have added entries meanwhile
        entries[key] = {"points": table.to_json(), "seconds": round(time.perf_counter() - t0, 2),
                        "measured": time.strftime("%Y-%m-%dT%H:%M:%S")}
        try:
            write_atomic(path, json.dumps({"version": CACHE_VERSION, "entries": entries}, indent=1) + "\n")
        except OSError as err:  # an unwritable cache costs a measurement per process, nothing more
            print(f"kernels.crossover: cannot write {path} ({err})", file=sys.stderr, flush=True)
    _memo[(str(path), key)] = table
    return table


def clear_memo() -> None:
    """Forget the crossovers read in this process (the cache file is kept)."""
    _memo.clear()


# --------------------------------------------------------------------------------------------------------------
# The choice


def mode() -> str:
    """``MOA_CROSSOVER``, checked: one of :data:`MODES` (unset means ``auto``)."""
    value = os.environ.get(ENV_MODE, "").strip().lower() or "auto"
    if value not in MODES:
        raise ValueError(f"{ENV_MODE}={value!r}: expected one of {', '.join(MODES)}")
    return value


def auto_backend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spans: torch.Tensor, sink: int) -> str:
    """The backend ``auto`` runs for this call: ``cpu``/``triton`` (the sparse kernel), ``dense`` (dense masked,
    :func:`moa_attention_dense_masked`) or ``reference`` (devices with neither)."""
    grad = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v))
    if q.device.type == "cpu":
        sparse = "cpu"
    elif q.is_cuda:
        sparse = "triton" if not grad else None  # the Triton kernel has no backward
    else:
        return "reference"
    choice = mode()
    if choice == "off":
        return sparse or "reference"
    if sparse is None or choice == "dense":
        return "dense"
    if choice == "sparse":
        return sparse
    n = q.shape[2]
    density = spans_density(n, spans.tolist(), sink)
    if n < GRID_LENGTHS[0] or density > GRID_DENSITIES[-1]:
        return "dense"  # never measured there: short, or nearly every causal pair kept
    table = crossover_for(Shape.of(q, k, sink))
    return sparse if table.choose(n, density, layout_of(spans.tolist())) == "sparse" else "dense"
