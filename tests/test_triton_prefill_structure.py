"""Structure of the Triton prefill kernel: its three block loops, its program order, its config pin and its two
load paths (pointers and tensor descriptors), under ``TRITON_INTERPRET=1`` in fp32 and fp16.

The block schedule is checked by brute force against the token mask: every key block holding a kept pair is
visited exactly once, no other block is visited, a block is visited without the mask iff it is wholly kept
(blocks straddling the sink boundary excepted: they take the mask). The host twin ``block_ranges`` is checked
over many shapes; the kernel's own visit record is checked against the twin.
"""

from __future__ import annotations

import pytest
import torch
from kernel_oracles import assert_lowp_close, make_qkv

pytest.importorskip("triton")

from kernels import triton_prefill as tp  # noqa: E402
from kernels.pattern import token_mask  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
MASKED = ("sink_edge", "band_edge", "diagonal")
NO_TMA = DEVICE == "cuda" and torch.cuda.get_device_capability()[0] < 9


@pytest.fixture(autouse=True)
def small_pinned_config():
    """The interpreter's small config on every device: nothing autotunes, and tiles span several blocks."""
    tp.pin_config(tp.INTERPRET_CONFIG)
    yield
    tp.pin_config(None)

# (B, Hq, Hkv, N, D, spans, sink): ragged N, groups 1 / 4 / 7, span 0 and >= N, sink 0 / 20 / 64, rows < sink,
# mixed spans within a group, D = 80 (not a power of two).
CASES = [
    (1, 4, 4, 77, 16, [0, 5, 77, 100], 20),
    (2, 8, 2, 130, 64, [3, 40, 130, 0, 17, 17, 64, 200], 64),
    (1, 7, 1, 130, 80, [1, 16, 33, 64, 100, 130, 0], 0),
    (2, 2, 1, 50, 16, [0, 0], 20),  # sink only
    (1, 2, 2, 9, 16, [2, 0], 64),  # every row < sink, one ragged tile
]


@pytest.mark.parametrize("tma", [False, True], ids=["pointers", "descriptors"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("b,hq,hkv,n,d,spans,sink", CASES)
def test_prefill_matches_reference(b, hq, hkv, n, d, spans, sink, dtype, tma):
    if tma and NO_TMA:
        pytest.skip("tensor descriptors need sm_90+")
    q, k, v = make_qkv(dict(b=b, hq=hq, hkv=hkv, n=n, d=d, seed=n + d), dtype)
    spans = torch.tensor(spans)
    out = tp.moa_attention_triton(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), spans, sink, tma=tma).cpu()
    assert out.dtype == dtype and out.shape == q.shape
    assert_lowp_close(out, q, k, v, spans, sink)


@pytest.mark.parametrize("config", [(16, 16, 4, 1), (64, 16, 4, 1)])
def test_prefill_other_block_shapes(config):
    """BM == BN and BM = 4 BN: the loop bounds hold for any BM >= BN."""
    q, k, v = make_qkv(dict(b=1, hq=4, hkv=2, n=100, d=16, seed=1), torch.float32)
    spans = torch.tensor([0, 21, 100, 7])
    tp.pin_config(config)
    out = tp.moa_attention_triton(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), spans, 20).cpu()
    assert_lowp_close(out, q, k, v, spans, 20)


def _expected(n, span, sink, bm, bn):
    """Per (tile, block): does the block hold a kept pair, is it wholly kept (for every padded row of the tile,
    keys below N), does it straddle the sink boundary. From the token mask alone."""
    tiles, blocks = -(-n // bm), -(-n // bn)
    pad = max(tiles * bm, blocks * bn)
    keep = token_mask(pad, span, sink)
    real = keep.clone()
    real[n:], real[:, n:] = False, False
    any_kept = real[: tiles * bm, : blocks * bn].reshape(tiles, bm, blocks, bn).any(3).any(1)
    whole = keep[: tiles * bm, : blocks * bn].reshape(tiles, bm, blocks, bn).all(3).all(1)
    whole &= (torch.arange(blocks) * bn + bn <= n)[None, :]
    starts = torch.arange(blocks) * bn
    straddle = ((starts < sink) & (starts + bn > sink))[None, :].expand(tiles, blocks)
    return any_kept, whole, straddle


def _twin_visits(n, span, sink, bm, bn):
    """(tiles, blocks) visit counts from ``block_ranges``: 1 per masked visit, 1 << 16 per mask-free one."""
    tiles, blocks = -(-n // bm), -(-n // bn)
    visits = torch.zeros(tiles, blocks, dtype=torch.int32)
    for t in range(tiles):
        for name, (start, stop) in tp.block_ranges(t * bm, n, span, sink, bm, bn).items():
            assert start % bn == 0 and start <= stop, (name, start, stop)
            for n0 in range(start, stop, bn):
                visits[t, n0 // bn] += 1 if name in MASKED else 1 << 16
    return visits


def _check_visits(visits, n, span, sink, bm, bn):
    any_kept, whole, straddle = _expected(n, span, sink, bm, bn)
    masked, free = visits & 0xFFFF, visits >> 16
    where = f"n={n} span={span} sink={sink} BM={bm} BN={bn}"
    assert torch.equal(masked + free, any_kept.int()), f"{where}: a block is skipped, doubled or wasted"
    assert not (free.bool() & ~whole).any(), f"{where}: a block visited without the mask is not wholly kept"
    assert not (masked.bool() & whole & ~straddle).any(), f"{where}: a wholly kept block is masked"


@pytest.mark.parametrize("bm,bn", [(32, 16), (16, 16), (64, 16), (128, 32)])
def test_block_ranges_exact_by_brute_force(bm, bn):
    for n in (1, 5, 16, 33, 77, 130):
        for sink in (0, 1, 16, 20, 64):
            for span in sorted({0, 1, 5, 16, 17, 31, 40, n - 1, n, n + 5}):
                _check_visits(_twin_visits(n, span, sink, bm, bn), n, span, sink, bm, bn)


@pytest.mark.parametrize("n,sink", [(77, 20), (130, 0), (40, 64)])
def test_kernel_visits_match_twin(n, sink):
    """The kernel's own visit record (``RECORD``), one head per span, equals the host twin and the oracle."""
    spans = [0, 1, 5, 16, 17, 40, n - 1, n, n + 5]
    bm, bn = tp.INTERPRET_CONFIG[:2]
    visits, _ = tp.trace_visits(n, spans, sink, config=(bm, bn, 4, 1))
    for h, span in enumerate(spans):
        assert torch.equal(visits[0, h], _twin_visits(n, span, sink, bm, bn)), f"head {h} span {span}"
        _check_visits(visits[0, h], n, span, sink, bm, bn)


@pytest.mark.skipif(NO_TMA, reason="tensor descriptors need sm_90+")
def test_visit_record_is_the_same_with_descriptors():
    spans = [0, 7, 33, 90]
    assert torch.equal(tp.trace_visits(90, spans, 20, group=2, tma=False)[0],
                       tp.trace_visits(90, spans, 20, group=2, tma=True)[0])


def test_program_order_is_heavy_first_with_groups_adjacent():
    """pid order: KV groups by their largest span (descending), then batch, then tiles last first, then the
    group's query heads side by side."""
    spans = [5, 3, 0, 80, 40, 40, 1, 2, 1]  # group maxima 5, 80, 2
    group, batch, n = 3, 2, 70
    _, pids = tp.trace_visits(n, spans, 4, group=group, batch=batch)  # (B, Hq, tiles)
    tiles = pids.shape[-1]
    assert sorted(pids.flatten().tolist()) == list(range(batch * len(spans) * tiles))
    order = [1, 0, 2]  # KV heads by group max span
    expected = [(b, kv * group + g, tiles - 1 - t) for kv in order for b in range(batch) for t in range(tiles)
                for g in range(group)]
    assert [pids[e].item() for e in expected] == list(range(len(expected)))


def test_config_pin(monkeypatch):
    tp.pin_config(None)
    monkeypatch.delenv(tp.CONFIG_ENV, raising=False)
    assert tp.pinned_config() == (tp.INTERPRET_CONFIG if tp.INTERPRET else None)
    monkeypatch.setenv(tp.CONFIG_ENV, "64,32,4,2")
    assert tp.pinned_config() == (64, 32, 4, 2)
    tp.pin_config((128, 64, 4, 3))
    assert tp.pinned_config() == (128, 64, 4, 3)  # the function wins over the environment
    tp.pin_config(None)
    for bad in ("32,64,4,3", "48,16,4,3", "64,32,4", "a,b,c,d"):
        monkeypatch.setenv(tp.CONFIG_ENV, bad)
        with pytest.raises(ValueError, match=tp.CONFIG_ENV):
            tp.pinned_config()
