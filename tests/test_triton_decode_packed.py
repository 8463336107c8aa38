"""Split-KV Triton decode over the packed per-head cache, against a float64 softmax over exactly the kept slots.

On CPU the kernels run under ``TRITON_INTERPRET=1`` (conftest) in fp32 and fp16 with a chunk of 32 slots, so every
head longer than that spans several chunks and the merge kernel does real work. CUDA-graph capture and bf16 run
only on a GPU (``gpu`` mark).
"""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_model
from test_hf_integration import random_plan

triton = pytest.importorskip("triton")

from kernels import triton_decode  # noqa: E402
from kernels.decode import packed_decode_attention  # noqa: E402
from kernels.kv_cache import PerHeadLayer  # noqa: E402
from pipeline.sparse_runtime import apply_plan, generate  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def oracle(q, k_packed, v_packed, offsets, lengths, keep=None, dtype=torch.float64):
    """From the definition: query head ``h`` softmaxes over slots ``offsets[kv] .. + lengths[kv]`` of its KV head
    ``kv = h // group`` (those ``keep[h]`` allows), computed in ``dtype``; zeros when it keeps none."""
    b, hq, _, d = q.shape
    group = hq // len(lengths)
    q, k_packed, v_packed = (x.cpu().to(dtype) for x in (q, k_packed, v_packed))
    out = torch.zeros(b, hq, 1, d, dtype=dtype)
    for h in range(hq):
        lo = offsets[h // group]
        slots = torch.arange(lo, lo + int(lengths[h // group]))
        if keep is not None:
            slots = slots[keep[h].cpu()[slots]]
        if len(slots):
            scores = torch.einsum("bd,bnd->bn", q[:, h, 0], k_packed[:, slots]) * d**-0.5  # (B, n)
            out[:, h, 0] = torch.einsum("bn,bnd->bd", torch.softmax(scores, dim=-1), v_packed[:, slots])
    return out


def assert_matches_oracle(out, q, k, v, offsets, lengths, keep=None, eps=1e-5):
    """``max|out - ref64| <= 2 * max|ref_lowp - ref64| + eps``, the low-precision reference in q's dtype."""
    ref = oracle(q, k, v, offsets, lengths, keep)
    lowp = oracle(q, k, v, offsets, lengths, keep, dtype=q.dtype)
    bound = 2 * (lowp.double() - ref).abs().max().item() + eps
    err = (out.cpu().double() - ref).abs().max().item()
    assert err <= bound, f"max error {err:.3g} > bound {bound:.3g}"


def packed_case(b, hkv, group, d, capacities, dtype, seed, keep=None, spare=3):
    """Random q and packed K/V (with large garbage in every slot, so a read past a valid length shows), offsets,
    and a ``keep`` mask: None, ``"random"`` (one query head keeping nothing) or ``"bands"`` (query head ``g`` of a
    group keeps a different prefix of its head's slots, as mixed spans do)."""
    gen = torch.Generator().manual_seed(seed)
    offsets = [0]
    for c in capacities:
        offsets.append(offsets[-1] + c)
    t = offsets[-1] + spare  # a few unowned slots at the end
    q = torch.randn(b, hkv * group, 1, d, generator=gen).to(dtype)
    k = (torch.randn(b, t, d, generator=gen) * 3).to(dtype)
    v = (torch.randn(b, t, d, generator=gen) * 3).to(dtype)
    mask = None
    if keep == "random":
        mask = torch.rand(hkv * group, t, generator=gen) < 0.6
        mask[1] = False
    elif keep == "bands":
        local = torch.cat([torch.arange(c) for c in capacities] + [torch.arange(spare)])  # (T,)
        mask = local.view(1, -1) < torch.tensor([1 + 13 * (h % group) for h in range(hkv * group)]).view(-1, 1)
    return q, k, v, offsets, mask


# (B, Hkv, group, D, capacities, valid lengths, keep): ragged capacities not multiples of the 16-slot tile,
# a head with 0 and one with 1 valid slot, GQA groups 1 / 4 / 7, D 64 and 80 (padded to 128), 1-5 chunks per head.
CASES = [
    (1, 3, 1, 64, [37, 100, 5], [37, 0, 1], None),
    (3, 2, 4, 80, [70, 33], [70, 20], "random"),
    (1, 1, 7, 64, [90], [85], "bands"),
    (3, 2, 7, 80, [45, 129], [45, 129], None),
    (2, 3, 2, 64, [0, 70, 0], [0, 70, 0], None),  # heads of capacity 0: no slot at all, zeros out
]


@pytest.mark.parametrize("merge", ["fused", "separate"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("b,hkv,group,d,capacities,lengths,keep", CASES)
def test_packed_decode_matches_oracle(b, hkv, group, d, capacities, lengths, keep, dtype, merge, monkeypatch):
    monkeypatch.setenv(triton_decode.MERGE_ENV, merge)
    q, k, v, offsets, mask = packed_case(b, hkv, group, d, capacities, dtype, seed=b + d + group, keep=keep)
    device_lengths = torch.tensor(lengths, device=DEVICE)  # int64 on the device: converted there, no host copy
    args = [x.to(DEVICE) for x in (q, k, v)]
    out = packed_decode_attention(*args, offsets, device_lengths, keep=None if mask is None else mask.to(DEVICE),
                                  backend="triton")
    assert out.dtype == dtype and out.shape == q.shape
    assert_matches_oracle(out, q, k, v, offsets, lengths, mask)
    for h, n in enumerate(lengths):
        if n == 0:
            assert (out[:, h * group:(h + 1) * group] == 0).all()
    if keep == "random":
        assert (out[:, 1] == 0).all()  # a query head whose mask keeps nothing
    if merge == "fused":  # every done-counter is back at zero for the next call (or graph replay)
        assert not triton_decode._counters(torch.device(DEVICE), triton.next_power_of_2(b * hkv)).any()


def test_fused_merge_is_repeatable_and_equals_the_separate_merge():
    """Three fused calls in a row (the counters reset themselves) give the two-launch result bit for bit."""
    q, k, v, offsets, mask = packed_case(2, 2, 4, 64, [100, 77], torch.float32, seed=11, keep="bands")
    args = [x.to(DEVICE) for x in (q, k, v)]
    lengths = torch.tensor([90, 77], device=DEVICE)
    keep = mask.to(DEVICE)
    separate = triton_decode.packed_decode_attention_triton(*args, offsets, lengths, keep=keep, fused=False)
    for _ in range(3):
        fused = triton_decode.packed_decode_attention_triton(*args, offsets, lengths, keep=keep, fused=True)
        assert torch.equal(fused, separate)


@pytest.mark.parametrize(("env", "value", "match"), [
    ("MOA_TRITON_DECODE_MERGE", "both", "expected 'fused' or 'separate'"),
    ("MOA_TRITON_DECODE_CONFIG", "64,4", "expected three ints"),
    ("MOA_TRITON_DECODE_CONFIG", "48,4,2", "power of two"),
])
def test_bad_decode_settings_are_refused(env, value, match, monkeypatch):
    monkeypatch.setenv(env, value)
    q, k, v, offsets, _ = packed_case(1, 1, 2, 16, [20], torch.float32, seed=1)
    with pytest.raises(ValueError, match=match):
        triton_decode.packed_decode_attention_triton(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), offsets, [20])


def test_host_lengths_and_explicit_chunks_agree():
    """Lengths as a host list, and any chunk size (one chunk per head up to one tile per chunk), give one result."""
    q, k, v, offsets, _ = packed_case(2, 2, 3, 64, [50, 77], torch.float32, seed=3)
    args = [x.to(DEVICE) for x in (q, k, v)]
    outs = [triton_decode.packed_decode_attention_triton(*args, offsets, [49, 77], chunk=c) for c in (16, 48, 128)]
    for out in outs:
        assert_matches_oracle(out, q, k, v, offsets, [49, 77])
    with pytest.raises(ValueError, match="within each head's capacity"):
        triton_decode.packed_decode_attention_triton(*args, offsets, [51, 77])


@pytest.mark.parametrize("capacities,batch,sms", [
    ([4096] * 8, 1, 132), ([4096] * 8, 64, 132), ([300, 40, 2000], 3, 132), ([10], 1, 132), ([70, 33], 2, 4),
])
def test_chunk_rule_fills_the_gpu_with_the_largest_chunk(capacities, batch, sms):
    chunk = triton_decode.chunk_rule(capacities, batch, 2 * sms)

    def programs(c):
        return batch * sum(-(-cap // c) for cap in capacities)

    assert chunk >= triton_decode.MIN_CHUNK and chunk & (chunk - 1) == 0
    assert programs(chunk) >= 2 * sms or chunk == triton_decode.MIN_CHUNK
    largest = max(triton_decode.MIN_CHUNK, triton.next_power_of_2(max(capacities)))
    assert programs(2 * chunk) < 2 * sms or chunk == largest  # no larger chunk would still fill the GPU


def test_generate_triton_equals_torch():
    """Greedy ``generate`` through the per-head cache: the Triton backend (prefill and packed decode, mixed spans
    within each GQA group so the ``keep`` path runs) gives the torch backend's tokens and scores."""
    model = make_tiny_model("llama", layers=2, heads=6, kv_heads=2, head_dim=16)
    model.generation_config.eos_token_id = None
    plan = random_plan(model, "head", seed=4, scale=0.5)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(12))
    runs = {}
    for backend in ("cpu", "triton"):
        apply_plan(model, plan, backend=backend)
        with torch.no_grad():
            runs[backend] = generate(model, ids, 5, do_sample=False, output_scores=True, return_dict_in_generate=True)
    assert torch.equal(runs["triton"].sequences, runs["cpu"].sequences)
    torch.testing.assert_close(torch.stack(runs["triton"].scores), torch.stack(runs["cpu"].scores), atol=1e-4,
                               rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_packed_decode_large_on_gpu(dtype):
    q, k, v, offsets, mask = packed_case(2, 8, 4, 128, [64, 4200, 300, 1, 2048, 777, 4096, 65], dtype, seed=7,
                                         keep="bands")
    lengths = [64, 4000, 300, 0, 2048, 500, 4096, 1]
    for keep in (None, mask):
        out = packed_decode_attention(q.cuda(), k.cuda(), v.cuda(), offsets, torch.tensor(lengths).cuda(),
                                      keep=None if keep is None else keep.cuda(), backend="triton")
        assert_matches_oracle(out, q, k, v, offsets, lengths, keep, eps=1e-4)


@pytest.mark.gpu
def test_decode_step_replays_in_a_cuda_graph():
    """Capture one decode step over a real per-head cache (mixed spans, so with ``keep``), then write new tokens
    eagerly and replay: the graph reads the new K/V, the device lengths and the new mask, and matches the oracle."""
    torch.manual_seed(0)
    b, hkv, group, d, prompt, steps = 2, 4, 2, 128, 100, 40
    query_spans = torch.tensor([30, 90, 500, 200, 7, 7, 64, 1000])
    kv_spans = query_spans.view(hkv, group).amax(1)
    layer = PerHeadLayer(query_spans, kv_spans, 4, prompt + steps, batch_size=b, head_dim=d, dtype=torch.float16,
                         device="cuda")
    kv = torch.randn(2, b, hkv, prompt + steps, d, device="cuda", dtype=torch.float16)
    layer.update(kv[0, :, :, :prompt], kv[1, :, :, :prompt])
    layer.update(kv[0, :, :, prompt:prompt + 1], kv[1, :, :, prompt:prompt + 1])
    q = torch.randn(b, hkv * group, 1, d, device="cuda", dtype=torch.float16)
    keep = layer.decode_keep().clone()

    def step():
        return packed_decode_attention(q, layer.keys, layer.values, layer.offsets, layer.lengths, keep=keep,
                                       backend="triton")

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: compile, autotune, cache the schedule tables
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    for i in range(prompt + 1, prompt + steps):
        layer.update(kv[0, :, :, i:i + 1], kv[1, :, :, i:i + 1])
        keep.copy_(layer.decode_keep())
        q.copy_(torch.randn_like(q))
        graph.replay()
        torch.cuda.synchronize()
        assert_matches_oracle(out, q, layer.keys, layer.values, layer.offsets, layer.valid_lengths(), keep, eps=1e-4)
    assert layer.lengths.tolist() == layer.valid_lengths()
