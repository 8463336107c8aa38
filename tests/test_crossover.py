"""The ``auto`` prefill backend's crossover: its cache file, its conservative choice, and exactness either way.

The choice logic is tested on synthetic measurements (injected), never on this machine's timings.
"""

from __future__ import annotations

import json
import statistics

import pytest
import torch

import kernels
import kernels.cpu
from kernels import crossover
from kernels.crossover import Crossover, Point, Shape
from kernels.reference import moa_attention_reference

CPU = torch.device("cpu")
SHAPE = Shape(heads=4, kv_heads=2, head_dim=16, dtype=torch.float32, device=CPU, sink=8)
GOOD_POINT = {"n": 512, "target": 0.5, "density": 0.5, "ratio": 1.5, "sparse_ms": 1.0, "dense_ms": 1.0,
              "layout": "mixed"}


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """Every test gets its own cache directory, no forced mode, and forgets crossovers read by earlier tests."""
    monkeypatch.setenv("MOA_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv(crossover.ENV_MODE, raising=False)
    crossover.clear_memo()
    yield
    crossover.clear_memo()


def synthetic(first_win: dict[float, int | None], lengths=(512, 1024, 2048, 4096, 8192),
              layouts=crossover.LAYOUTS) -> list[Point]:
    """Points where the sparse kernel wins (ratio 1.5) from ``first_win[d]`` on and loses (0.5) below it."""
    return [Point(n, d, d, 1.5 if first and n >= first else 0.5, 1.0, 1.0, layout)
            for d, first in first_win.items() for n in lengths for layout in layouts]


class CountingMeasure:
    """A measure function that records the shapes it was asked for and returns synthetic points."""

    def __init__(self):
        self.calls: list[Shape] = []

    def __call__(self, shape: Shape) -> list[Point]:
        self.calls.append(shape)
        return synthetic({0.25: 1024, 0.5: 2048, 0.75: None})


# ------------------------------------------------------------------------------------------------- cache file


def test_a_valid_entry_is_read_not_measured(tmp_path):
    """The counterpart of the corrupt cases below: the same file with a well-formed entry is used as it is."""
    path = tmp_path / "crossover.json"
    path.write_text(json.dumps({"version": crossover.CACHE_VERSION,
                                "entries": {crossover.cache_key(SHAPE): {"points": [GOOD_POINT]}}}))
    measure = CountingMeasure()
    table = crossover.crossover_for(SHAPE, measure=measure, path=path)
    assert measure.calls == [] and table.choose(512, 0.5) == "sparse"


def test_cache_round_trips_and_a_new_key_is_measured_again(tmp_path):
    path = tmp_path / "crossover.json"
    measure = CountingMeasure()
    first = crossover.crossover_for(SHAPE, measure=measure, path=path)
    assert len(measure.calls) == 1

    crossover.clear_memo()  # a new process: reads the file, measures nothing
    again = crossover.crossover_for(SHAPE, measure=measure, path=path)
    assert len(measure.calls) == 1
    assert again.points == first.points

    other = Shape(heads=4, kv_heads=2, head_dim=32, dtype=torch.float32, device=CPU, sink=8)
    crossover.crossover_for(other, measure=measure, path=path)
    assert measure.calls == [SHAPE, other]
    entries = json.loads(path.read_text())["entries"]
    assert set(entries) == {crossover.cache_key(SHAPE), crossover.cache_key(other)}


@pytest.mark.parametrize("change", ["dtype", "head_dim", "heads", "sink", "threads", "torch", "device"])
def test_every_part_of_the_key_matters(change, monkeypatch):
    before = crossover.cache_key(SHAPE)
    shape = SHAPE
    if change == "dtype":
        shape = Shape(4, 2, 16, torch.bfloat16, CPU, 8)
    elif change == "head_dim":
        shape = Shape(4, 2, 64, torch.float32, CPU, 8)
    elif change == "heads":
        shape = Shape(4, 4, 16, torch.float32, CPU, 8)
    elif change == "sink":
        shape = Shape(4, 2, 16, torch.float32, CPU, 64)
    elif change == "threads":
        threads = torch.get_num_threads()
        monkeypatch.setattr(torch, "get_num_threads", lambda: threads + 1)
    elif change == "torch":
        monkeypatch.setattr(torch, "__version__", "0.0.1")
    else:
        monkeypatch.setattr(crossover, "device_name", lambda device: "another CPU")
    assert crossover.cache_key(shape) != before


def test_cache_location_follows_moa_cache_dir(tmp_path):
    measure = CountingMeasure()
    crossover.crossover_for(SHAPE, measure=measure)
    assert crossover.cache_path() == tmp_path / "cache" / "crossover.json"
    assert crossover.cache_path().is_file()


def test_atomic_write_leaves_no_temporary_file(tmp_path, monkeypatch):
    path = tmp_path / "cache" / "crossover.json"
    crossover.crossover_for(SHAPE, measure=CountingMeasure(), path=path)
    assert [p.name for p in path.parent.iterdir()] == ["crossover.json"]

    def fail(*args):
        raise OSError("disk full")

    monkeypatch.setattr(crossover.os, "replace", fail)  # a write that fails after the temporary file exists
    other = Shape(4, 2, 32, torch.float32, CPU, 8)
    table = crossover.crossover_for(other, measure=CountingMeasure(), path=path)
    assert table.points  # the measurement is still used, in this process
    assert [p.name for p in path.parent.iterdir()] == ["crossover.json"]
    assert crossover.cache_key(other) not in json.loads(path.read_text())["entries"]


@pytest.mark.parametrize("content", [
    b"{not json", b"", b"\xff\xfe\x00", b"[]", b'{"version": VERSION, "entries": []}',
    b'{"version": VERSION, "entries": {"KEY": {"points": "nonsense"}}}',
    b'{"version": VERSION, "entries": {"KEY": {"points": [{"n": 512}]}}}',
    b'{"version": VERSION, "entries": {"KEY": {"points": []}}}',
    b'{"version": VERSION, "entries": {"KEY": {"points": [GOOD | {"layout": "diagonal"}]}}}',
    b'{"version": 0, "entries": {"KEY": {"points": [GOOD]}}}',  # an older format
])
def test_a_corrupt_cache_is_measured_again(content, tmp_path):
    path = tmp_path / "crossover.json"
    good = json.dumps(GOOD_POINT).encode()
    content = content.replace(b"GOOD | {\"layout\": \"diagonal\"}", good.replace(b'"mixed"', b'"diagonal"'))
    path.write_bytes(content.replace(b"KEY", json.dumps(crossover.cache_key(SHAPE))[1:-1].encode())
                     .replace(b"VERSION", str(crossover.CACHE_VERSION).encode()).replace(b"GOOD", good))
    measure = CountingMeasure()
    table = crossover.crossover_for(SHAPE, measure=measure, path=path)
    assert len(measure.calls) == 1 and table.choose(4096, 0.25) == "sparse"
    stored = json.loads(path.read_text())  # rewritten whole
    assert crossover.cache_key(SHAPE) in stored["entries"]


# ------------------------------------------------------------------------------------------------- the choice


@pytest.mark.parametrize("n,density,expected", [
    (512, 0.25, "dense"),      # below the crossover of 0.25 (1024)
    (700, 0.25, "dense"),      # between a losing and a winning length: conservative
    (1024, 0.25, "sparse"),    # at it
    (1500, 0.25, "sparse"),    # between two winning lengths
    (1200, 0.3, "dense"),      # 0.5 loses at 1024 and wins at 2048: interpolated at 1200, 0.73
    (1900, 0.3, "sparse"),     # interpolated at 1900, 1.39
    (3000, 0.4, "sparse"),     # both neighbouring densities win at both neighbouring lengths
    (1024, 0.1, "sparse"),     # sparser than the grid: the sparsest density decides
    (100_000, 0.5, "sparse"),  # beyond the last length: the last one stands
    (8192, 0.6, "dense"),      # 0.75 never wins
    (8192, 0.9, "dense"),      # denser than the grid
    (256, 0.01, "dense"),      # shorter than the grid
])
def test_choice_is_dense_below_the_crossover_and_sparse_above(n, density, expected):
    table = Crossover(synthetic({0.25: 1024, 0.5: 2048, 0.75: None}))
    assert table.choose(n, density) == expected


def test_every_neighbouring_density_must_win():
    """Noisy points where the denser neighbour won and the sparser lost: conservative, dense."""
    table = Crossover([Point(n, d, d, r, 1.0, 1.0) for n, d, r in
                       ((1024, 0.25, 0.9), (2048, 0.25, 1.5), (1024, 0.5, 1.5), (2048, 0.5, 1.5))])
    assert table.choose(1024, 0.4) == "dense"
    assert table.choose(2048, 0.4) == "sparse"


def test_each_layout_has_its_own_crossover():
    table = Crossover(synthetic({0.5: 1024}, layouts=("uniform",)) + synthetic({0.5: 4096}, layouts=("mixed",)))
    assert table.choose(2048, 0.5, "uniform") == "sparse"
    assert table.choose(2048, 0.5, "mixed") == "dense"
    assert Crossover(synthetic({0.5: 1024}, layouts=("uniform",))).choose(2048, 0.5, "mixed") == "dense"
    assert crossover.layout_of([7, 7, 7]) == "uniform" and crossover.layout_of([7, 7, 8]) == "mixed"


@pytest.mark.parametrize("n,expected", [(384, "dense"), (400, "dense"), (480, "sparse"), (496, "sparse"),
                                        (512, "sparse")])
def test_a_length_between_two_measured_ones_is_judged_by_the_nearer(n, expected):
    """A loss at 384 (0.98) and a win at 512 (1.20): the ratio, linear in log N, passes the margin 1.05 at about
    421 tokens, so a 496-token prompt is not held back by the 384-token point."""
    table = Crossover([Point(n_, 0.5, 0.5, r, 1.0, 1.0) for n_, r in ((384, 0.98), (512, 1.20))])
    assert table.choose(n, 0.5) == expected


def test_a_win_within_the_margin_is_not_a_win():
    table = Crossover([Point(n, 0.5, 0.5, r, 1.0, 1.0) for n, r in ((1024, 1.02), (2048, 1.2))])
    assert table.choose(1024, 0.5) == "dense"
    assert table.choose(2048, 0.5) == "sparse"


def test_auto_uses_the_measured_crossover(monkeypatch):
    """``auto`` on real tensors asks the (injected) measurement once, then runs dense masked below the crossover
    and the cpu kernel above it."""
    calls = []
    monkeypatch.setattr(crossover, "measure_points", lambda shape: calls.append(shape) or
                        synthetic({0.25: 1024, 0.5: 1024, 0.75: None}, layouts=("mixed",))
                        + synthetic({0.25: 512, 0.5: 512, 0.75: None}, layouts=("uniform",)))
    ran = []
    monkeypatch.setattr(kernels.cpu, "moa_attention_cpu",
                        lambda *a, **kw: ran.append("cpu") or moa_attention_reference(*a[:5]))
    dense = crossover.moa_attention_dense_masked
    monkeypatch.setattr(crossover, "moa_attention_dense_masked",
                        lambda *a, **kw: ran.append("dense") or dense(*a, **kw))
    for n, uniform, expected in ((512, False, "dense"), (512, True, "cpu"), (1024, False, "cpu"),
                                 (300, True, "dense")):
        q, k, v = torch.randn(1, 4, n, 16), torch.randn(1, 2, n, 16), torch.randn(1, 2, n, 16)
        spans = torch.tensor([n // 4] * 4 if uniform else [n // 4, n // 4, n // 8, n // 8])
        kernels.moa_attention(q, k, v, spans, 8, backend="auto")
        assert ran[-1] == expected, (n, uniform)
    assert len(calls) == 1 and calls[0] == SHAPE


def test_unknown_mode_is_refused(monkeypatch):
    monkeypatch.setenv(crossover.ENV_MODE, "fastest")
    q = torch.randn(1, 4, 600, 16)
    with pytest.raises(ValueError, match="MOA_CROSSOVER"):
        kernels.moa_attention(q, torch.randn(1, 2, 600, 16), torch.randn(1, 2, 600, 16), torch.full((4,), 50), 8)


# ------------------------------------------------------------------------------------------------- exactness


needs_fused = pytest.mark.skipif(kernels.cpu.fused_ops_problem() is not None,
                                 reason="this torch lacks a working fused CPU flash-attention op")


@needs_fused
def test_the_fused_dense_path_passes_its_check():
    """Where the CPU kernel uses PyTorch's fused flash op, dense masked uses it too (causal flag plus mask)."""
    assert crossover.fused_causal_masked_ok()


def force_dense_path(monkeypatch, path: str) -> None:
    """Run dense masked through the fused CPU op (``fused``) or through SDPA (``sdpa``, the fallback)."""
    if path == "fused" and kernels.cpu.fused_ops_problem() is not None:
        pytest.skip("this torch lacks a working fused CPU flash-attention op")
    monkeypatch.setattr(crossover, "fused_causal_masked_ok", lambda: path == "fused")


LAYOUTS = {  # (batch, spans [6]) at N = 320, sink 8, 3 KV heads: every mask layout of dense masked
    "per-head": (2, [40, 40, 320, 0, 200, 130]),  # spans differ inside a GQA group, one full, one empty band
    "per-kv-head": (1, [40, 40, 200, 200, 130, 130]),  # a kv_head plan at batch 1: the KV heads become the batch
    "shared": (2, [100] * 6),
    "causal": (1, [320, 320, 312, 312, 400, 400]),  # band and sink cover every causal pair: no mask
}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("mode", ["sparse", "dense", "dense-sdpa", "off"])
def test_auto_equals_the_reference_in_both_regimes_with_gradients(mode, layout, monkeypatch):
    monkeypatch.setenv(crossover.ENV_MODE, mode.removesuffix("-sdpa"))
    force_dense_path(monkeypatch, "sdpa" if mode == "dense-sdpa" else "fused")
    ran = []
    cpu_kernel = kernels.cpu.moa_attention_cpu
    monkeypatch.setattr(kernels.cpu, "moa_attention_cpu", lambda *a, **kw: ran.append("cpu") or cpu_kernel(*a, **kw))
    (batch, spans), n, sink = LAYOUTS[layout], 320, 8
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(batch, n, 6, 16, generator=gen).transpose(1, 2).requires_grad_()  # (B, Hq, N, D), strided
    k, v = (torch.randn(batch, 3, n, 16, generator=gen).requires_grad_() for _ in range(2))
    spans = torch.tensor(spans)
    out = kernels.moa_attention(q, k, v, spans, sink, backend="auto", scale=0.3)
    ref = moa_attention_reference(q, k, v, spans, sink, scale=0.3)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    dout = torch.randn(out.shape, generator=gen)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    refs = torch.autograd.grad(ref, (q, k, v), dout)
    for g, r in zip(grads, refs, strict=True):
        torch.testing.assert_close(g, r, atol=1e-4, rtol=1e-4)
    assert bool(ran) == (mode in ("sparse", "off"))


@pytest.mark.parametrize("path", ["fused", "sdpa"])
@pytest.mark.parametrize("spans,sink", [([0, 0, 0, 0], 0), ([0, 3, 3, 9], 0), ([0, 3, 3, 9], 4), ([5, 5, 5, 5], 100)])
def test_dense_masked_edge_cases(spans, sink, path, monkeypatch):
    force_dense_path(monkeypatch, path)
    gen = torch.Generator().manual_seed(1)
    q, k, v = torch.randn(1, 4, 40, 8, generator=gen), torch.randn(1, 2, 40, 8, generator=gen), \
        torch.randn(1, 2, 40, 8, generator=gen)
    q.requires_grad_()
    spans = torch.tensor(spans)
    out = crossover.moa_attention_dense_masked(q, k, v, spans, sink)
    ref = moa_attention_reference(q, k, v, spans, sink)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    dout = torch.randn(out.shape, generator=gen)
    torch.testing.assert_close(torch.autograd.grad(out, q, dout)[0], torch.autograd.grad(ref, q, dout)[0],
                               atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------- measuring


LENGTHS = (512, 1024, 2048, 4096, 8192)
DENSITIES = (0.25, 0.5, 0.75)
"""The grid of the search tests below (the search itself does not depend on which grid)."""


class FakeLengths:
    """Stands in for ``_measure_length``: the sparse kernel wins from ``first_win[d]`` on; measuring a length
    takes one second per 1024 tokens of a fake clock, spread evenly over its calls."""

    def __init__(self, first_win: dict[float, int]):
        self.first_win, self.clock, self.measured = first_win, 0.0, []

    def __call__(self, shape, n, units, sparse, gen, sync, timer):
        self.measured.append((n, tuple(d for d, _ in units)))
        self.clock += n / 1024
        per_call_ms = n / 1024 * 1e3 / (sum(crossover._schedule(n)) * (1 + len(units)))
        return [Point(n, d, d, 1.5 if n >= self.first_win[d] else 0.5, per_call_ms, per_call_ms, layout)
                for d, layout in units]


def test_measuring_searches_each_crossover(monkeypatch):
    """The middle length first, downwards while the sparse kernel wins, upwards while it loses, then the
    midpoints of the flips."""
    fake = FakeLengths({0.25: 1024, 0.5: 2048, 0.75: 10**9})
    monkeypatch.setattr(crossover, "_measure_length", fake)
    table = Crossover(crossover.measure_points(SHAPE, LENGTHS, DENSITIES, layouts=("mixed",), timer=lambda: fake.clock,
                                               budget_s=100.0))
    assert fake.measured == [(2048, (0.25, 0.5, 0.75)), (1024, (0.25, 0.5)), (512, (0.25,)), (4096, (0.75,)),
                             (8192, (0.75,)), (768, (0.25,)), (1536, (0.5,))]
    assert [table.choose(n, 0.5) for n in (1024, 1536, 2048, 16384)] == ["dense", "dense", "sparse", "sparse"]
    assert [table.choose(n, 0.25) for n in (512, 768, 1024, 16384)] == ["dense", "dense", "sparse", "sparse"]
    assert table.choose(16384, 0.75) == "dense"


def test_measuring_keeps_to_its_budget(monkeypatch):
    """Nothing starts that is predicted to overrun the budget: at 4096 only the sparser of the two densities
    that need it fits, and neither midpoint does."""
    fake = FakeLengths({0.25: 1024, 0.5: 4096, 0.75: 10**9})
    monkeypatch.setattr(crossover, "_measure_length", fake)
    table = Crossover(crossover.measure_points(SHAPE, LENGTHS, DENSITIES, layouts=("mixed",), timer=lambda: fake.clock,
                                               budget_s=8.0))
    assert fake.measured == [(2048, (0.25, 0.5, 0.75)), (1024, (0.25,)), (512, (0.25,)), (4096, (0.5,))]
    assert fake.clock <= 8.0
    assert table.choose(8192, 0.5) == "sparse" and table.choose(8192, 0.75) == "dense"


def test_both_layouts_are_measured_side_by_side(monkeypatch):
    fake = FakeLengths({0.25: 1024, 0.5: 2048, 0.75: 10**9})
    monkeypatch.setattr(crossover, "_measure_length", fake)
    points = crossover.measure_points(SHAPE, LENGTHS, DENSITIES, timer=lambda: fake.clock, budget_s=100.0)
    assert {p.layout for p in points} == {"mixed", "uniform"}
    assert fake.measured[0] == (2048, (0.25, 0.25, 0.5, 0.5, 0.75, 0.75))
    one_head = Shape(1, 1, 16, torch.float32, CPU, 8)  # one head: its spans cannot differ
    one_head_points = crossover.measure_points(one_head, LENGTHS, DENSITIES, timer=lambda: fake.clock)
    assert {p.layout for p in one_head_points} == {"uniform"}


def test_the_budget_goes_to_the_sparsest_cheapest_units(monkeypatch):
    """Mixed spans cost the sparse kernel 10 times more here: at 4096 the cheap uniform units still fit, the
    expensive mixed ones do not."""
    clock, measured = [0.0], []

    def fake_length(shape, n, units, sparse, gen, sync, timer):
        measured.append((n, tuple(units)))
        base = n / 1024 * 50  # ms per dense call
        cost = {lay: base * (10 if lay == "mixed" else 1) for lay in crossover.LAYOUTS}
        layouts = {lay for _, lay in units}
        clock[0] += sum(crossover._schedule(n)) * (base * len(layouts) + sum(cost[lay] for _, lay in units)) / 1e3
        return [Point(n, d, d, 1.5 if n >= 4096 and d < 0.75 else 0.5, cost[lay], base, lay) for d, lay in units]

    monkeypatch.setattr(crossover, "_measure_length", fake_length)
    table = Crossover(crossover.measure_points(SHAPE, LENGTHS, DENSITIES, timer=lambda: clock[0], budget_s=20.0))
    cheap = ((0.25, "uniform"), (0.5, "uniform"))
    assert [n for n, _ in measured] == [2048, 4096, 3072] and measured[1][1] == measured[2][1] == cheap
    assert clock[0] <= 20.0
    assert table.choose(4096, 0.5, "uniform") == "sparse" and table.choose(4096, 0.25, "mixed") == "dense"


def test_a_slow_dense_round_cannot_fake_a_win():
    """Dense slow in three rounds of five (a busy machine), the sparse kernel steady: the median of per-round
    ratios says 1.5, the fastest rounds say 0.5, and the point keeps the smaller."""
    durations = iter([3, 2, 3, 2, 3, 2, 1, 2, 1, 2])  # seconds per timed call: (dense, sparse) per round
    stamps = iter(t for d in durations for t in (0.0, float(d)))
    shape = Shape(2, 1, 8, torch.float32, CPU, 4)
    (point,) = crossover._measure_length(shape, 512, [(0.5, "uniform")], kernels.cpu.moa_attention_cpu,
                                         torch.Generator().manual_seed(0), lambda: None, lambda: next(stamps))
    assert point.ratio == pytest.approx(0.5)


def test_a_decisive_point_is_not_timed_again():
    """A clear loss or a clear win settles after two rounds, not one."""
    durations = {"mixed": 1.0, (0.25, "mixed"): 10.0, (0.5, "mixed"): 1.1, (0.75, "mixed"): 0.1}
    calls = dict.fromkeys(durations, 0)  # dense, then units of its layout
    clock = [0.0]

    def fn(name):
        def call():
            calls[name] += 1
            clock[0] += durations[name]
        return call

    times = crossover._interleaved({name: fn(name) for name in calls}, 1, 5, lambda: None, lambda: clock[0])
    assert [len(times[name]) for name in calls] == [5, 2, 5, 2]
    assert list(calls.values()) == [6, 3, 6, 3]


@pytest.mark.parametrize("n", crossover.GRID_LENGTHS)
def test_a_slow_first_call_does_not_decide_the_point(n):
    """The sparse kernel's first call pays one-time costs (op check, chunk plans), here 20 times its steady cost of
    0.5 s against dense's 1 s: at every grid length the point still comes out as the win it is."""
    cost = {"uniform": [1.0], (0.5, "uniform"): [10.0]}  # first-call costs; later calls cost the last entry
    steady = {"uniform": 1.0, (0.5, "uniform"): 0.5}
    clock = [0.0]

    def fn(name):
        def call():
            clock[0] += cost[name].pop() if cost[name] else steady[name]
        return call

    times = crossover._interleaved({name: fn(name) for name in cost}, *crossover._schedule(n), lambda: None,
                                   lambda: clock[0])
    ratios = [a / b for a, b in zip(times["uniform"], times[0.5, "uniform"], strict=False)]
    assert statistics.median(ratios) == pytest.approx(2.0)


def test_measuring_runs_the_real_kernels():
    shape = Shape(heads=2, kv_heads=1, head_dim=8, dtype=torch.float32, device=CPU, sink=4)
    points = crossover.measure_points(shape, lengths=(512,), densities=(0.25, 0.5))
    assert sorted((p.n, p.target, p.layout) for p in points) == [(512, 0.25, "mixed"), (512, 0.25, "uniform"),
                                                                 (512, 0.5, "mixed"), (512, 0.5, "uniform")]
    assert all(p.ratio > 0 and p.sparse_ms > 0 and p.dense_ms > 0 and p.density >= p.target for p in points)
