"""Plan file: round trip, the original MoA format, refusal of the wrong model, spans and densities vs brute force."""

import json
import math
from dataclasses import dataclass, replace

import numpy as np
import pytest
import torch
from conftest import make_tiny_model
from hypothesis import given, settings
from hypothesis import strategies as st

from kernels.pattern import head_masks, token_mask
from pipeline.errors import UserError
from pipeline.plan import (
    Plan,
    kv_spans_for,
    load_plan,
    plan_attention_density,
    plan_kv_density,
    save_plan,
    spans_for,
    validate_plan,
)


@dataclass(frozen=True)
class Info:
    name: str = "tiny"
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 16
    fingerprint: str = "abc123"


def random_plan(info=Info(), granularity="kv_head", seed=0, sink=4, min_span=3) -> Plan:
    g = torch.Generator().manual_seed(seed)
    heads = info.num_kv_heads if granularity == "kv_head" else info.num_heads
    alphas = (torch.rand(info.num_layers, heads, generator=g) * 40 - 10).tolist()
    betas = torch.rand(info.num_layers, heads, generator=g).tolist()
    plan = Plan.uniform(info, 0.5, sink=sink, min_span=min_span, granularity=granularity)
    plan.alphas, plan.betas = alphas, betas
    return plan


def brute_span(alpha, beta, n, min_span):
    """The DESIGN formula ``clamp(alpha + beta * N, min_span, N)``, in plain Python."""
    return max(min(math.floor(alpha + beta * n), n), min(min_span, n))


def test_round_trip(tmp_path):
    plan = random_plan()
    plan.profile_lengths = [64, 128]
    plan.density_budget = {64: 0.5, 128: 0.25}
    plan.expected = {64: {"kv_density": 0.6, "attention_density": 0.5, "influence_loss": 0.01}}
    plan.solver = {"name": "highs", "status": "Optimal", "objective": 1.5, "seconds": 0.2}
    plan.created_with = {"config_hash": "deadbeef", "version": "0.1.0"}
    save_plan(plan, tmp_path / "plan.json")
    raw = json.loads((tmp_path / "plan.json").read_text())
    assert raw["format"] == "moa-plan/1"
    assert set(raw["model"]) == {"name", "num_layers", "num_heads", "num_kv_heads", "head_dim", "fingerprint"}
    assert load_plan(tmp_path / "plan.json") == plan
    assert load_plan(tmp_path / "plan.json", Info()) == plan
    assert not list(tmp_path.glob(".*tmp"))  # atomic write left no temporary file


def release_kv_tokens(alpha, beta, n):
    """KV tokens the original MoA release keeps for one head: its span ``int(alpha + beta * N)`` holds the sink,
    is capped at N, rounded up to a multiple of 64 and at least 128, then capped at N."""
    span = min(int(alpha + beta * n), n)
    return min(n, max(128, -(-span // 64) * 64))


def test_original_moa_format(tmp_path):
    model = make_tiny_model("llama", heads=4, kv_heads=2)
    alphas = [[8, 160, 320, 4], [4, 4, 640, 8]]
    betas = [[0.0, 0.25, 0.5, 0.1], [0.1, 0.0, 0.0, 0.5]]
    (tmp_path / "moa.json").write_text(json.dumps({"alphas": alphas, "betas": betas}))
    plan = load_plan(tmp_path / "moa.json", model)
    assert (plan.granularity, plan.sink, plan.block_size) == ("head", 64, 64)
    assert plan.model["num_kv_heads"] == 2
    assert plan.imported_from["format"] == "moa-release"
    for layer in range(2):
        tokens = [release_kv_tokens(a, b, 3000) for a, b in zip(alphas[layer], betas[layer], strict=True)]
        assert (spans_for(plan, layer, 3000) + 64).clamp(max=3000).tolist() == tokens
        assert (kv_spans_for(plan, layer, 3000) + 64).clamp(max=3000).tolist() == [max(tokens[:2]), max(tokens[2:])]
    save_plan(plan, tmp_path / "converted.json")  # the conversion survives a round trip
    assert load_plan(tmp_path / "converted.json") == plan


def near_boundary_rules(rng, n, count):
    """Rules whose ``alpha + beta * n`` lands within a few ulps of ``64 k + 1``, where the release's rounding to 64
    jumps: float rounding there decides between two sizes 64 tokens apart."""
    alphas = rng.uniform(-100, 32, count)
    target = 64 * rng.integers(1, n // 64, count) + 1
    betas = (target - alphas) / n
    steps = rng.integers(-3, 4, count)
    return alphas, np.array([_ulps(b, k) for b, k in zip(betas, steps, strict=True)])


def _ulps(x: float, k: int) -> float:
    for _ in range(abs(k)):
        x = math.nextafter(x, math.inf if k > 0 else -math.inf)
    return x


@pytest.mark.parametrize("n", [2048, 2049, 3000, 4096, 5000, 8191, 8192, 12345, 16384])
def test_release_plan_keeps_the_release_kv_tokens(n):
    """Imported bare plans keep, per head, exactly the KV tokens of the release's runtime at every N: tiny,
    negative, huge and boundary spans, and alpha + beta * N within ulps of a rounding step."""
    rng = np.random.default_rng(n)
    regimes = [rng.uniform(-2000, 0, 64), rng.uniform(0, 200, 64), rng.uniform(0, 40000, 64),
               64.0 * rng.integers(0, 300, 64) + rng.integers(-1, 2, 64), rng.uniform(-1e7, 1e7, 64)]
    alphas = np.concatenate(regimes)
    betas = np.concatenate([rng.choice([0.0, 0.001, 0.5, 1.0, 3.0], 64), rng.uniform(0, 1, 64 * 3),
                            rng.uniform(-0.5, 2, 64)])
    edge_alphas, edge_betas = near_boundary_rules(rng, n, 256)
    alphas, betas = np.concatenate([alphas, edge_alphas]), np.concatenate([betas, edge_betas])
    heads = len(alphas)
    info = Info(num_layers=1, num_heads=heads, num_kv_heads=heads)
    bare = Plan.from_dict({"alphas": [alphas.tolist()], "betas": [betas.tolist()]})
    plan = validate_plan(bare, info)
    ours = (kv_spans_for(plan, 0, n) + plan.sink).clamp(max=n).tolist()
    assert ours == [release_kv_tokens(a, b, n) for a, b in zip(alphas.tolist(), betas.tolist(), strict=True)]
    grouped = validate_plan(bare, replace(info, num_kv_heads=heads // 4))  # GQA: a KV head keeps its group's max
    assert (kv_spans_for(grouped, 0, n) + 64).clamp(max=n).tolist() == [max(ours[i:i + 4]) for i in range(0, heads, 4)]


def test_span_rounding_fields_are_optional_in_the_file(tmp_path):
    plan = random_plan()
    save_plan(plan, tmp_path / "plain.json")
    raw = json.loads((tmp_path / "plain.json").read_text())
    assert not {"span_multiple", "span_offset", "imported_from"} & raw.keys()  # plans made here keep their files
    rounded = replace(plan, span_multiple=8, span_offset=-4, min_span=2)
    save_plan(rounded, tmp_path / "rounded.json")
    loaded = load_plan(tmp_path / "rounded.json")
    assert loaded == rounded
    for layer in range(2):
        expected = [max(min(-(-math.floor(a + b * 100) // 8) * 8 - 4, 100), 2)
                    for a, b in zip(plan.alphas[layer], plan.betas[layer], strict=True)]
        assert spans_for(loaded, layer, 100).tolist() == [s for s in expected for _ in range(2)]


@pytest.mark.parametrize(
    ("model", "message"),
    [
        (Info(num_layers=3), "num_layers=2"),
        (Info(num_kv_heads=1), "num_kv_heads=2"),
        (Info(head_dim=32), "head_dim=16"),
        (Info(fingerprint="ffff"), "fingerprint abc123"),
    ],
)
def test_wrong_model_is_refused(model, message):
    with pytest.raises(ValueError, match=message):
        validate_plan(random_plan(), model)


def test_bare_plan_head_count_is_checked(tmp_path):
    (tmp_path / "moa.json").write_text(json.dumps({"alphas": [[1, 2]] * 2, "betas": [[0, 0]] * 2}))
    with pytest.raises(ValueError, match="2 heads per layer, but model 'tiny' has 4 query heads"):
        load_plan(tmp_path / "moa.json", Info())


def test_hf_model_is_checked_without_fingerprint():
    model = make_tiny_model("qwen2", layers=2, heads=4, kv_heads=2)
    plan = random_plan()
    assert validate_plan(plan, model) is plan  # a bare HF model has no fingerprint attribute: check skipped
    model.fingerprint = "ffff"
    with pytest.raises(ValueError, match="fingerprint"):
        validate_plan(plan, model)
    with pytest.raises(ValueError, match="num_layers"):
        validate_plan(plan, make_tiny_model("qwen2", layers=3))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{not json", "not valid JSON"),
        (json.dumps({"format": "moa-plan/9", "alphas": [[1]], "betas": [[0]]}), "unsupported plan format"),
        (json.dumps({"alphas": [[1, 2], [1]], "betas": [[0, 0], [0]]}), "rows differ"),
        (json.dumps({"alphas": [[1]], "betas": [[0]], "sink": 3}), "no 'format' field"),
    ],
)
def test_malformed_files(tmp_path, text, message):
    (tmp_path / "plan.json").write_text(text)
    with pytest.raises(ValueError, match=message):
        load_plan(tmp_path / "plan.json")
    with pytest.raises(ValueError, match="not found"):
        load_plan(tmp_path / "missing.json")


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 1000), n=st.integers(1, 200), granularity=st.sampled_from(["kv_head", "head"]))
def test_spans_match_brute_force(seed, n, granularity):
    plan = random_plan(granularity=granularity, seed=seed)
    for layer in range(plan.num_layers):
        rules = list(zip(plan.alphas[layer], plan.betas[layer], strict=True))
        own = [brute_span(a, b, n, plan.min_span) for a, b in rules]
        per_query = own if granularity == "head" else [s for s in own for _ in range(2)]
        per_kv = own if granularity == "kv_head" else [max(own[0:2]), max(own[2:4])]
        assert spans_for(plan, layer, n).tolist() == per_query
        assert kv_spans_for(plan, layer, n).tolist() == per_kv


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 1000), n=st.integers(1, 96), sink=st.integers(0, 20),
       granularity=st.sampled_from(["kv_head", "head"]))
def test_densities_match_masks(seed, n, sink, granularity):
    plan = random_plan(granularity=granularity, seed=seed, sink=sink)
    per_kv = 2 if granularity == "head" else 1  # plan heads sharing one KV head
    kv, pairs = [], []
    for layer in range(plan.num_layers):
        spans = torch.tensor([brute_span(a, b, n, plan.min_span)
                              for a, b in zip(plan.alphas[layer], plan.betas[layer], strict=True)])
        masks = head_masks(n, spans, sink)  # (H, n, n)
        pairs += (masks.sum(dim=(1, 2)) / token_mask(n, n, 0).sum()).tolist()
        # Keys some query head of the KV head still sees at the end of a length-n sequence: what its cache holds.
        held = masks[:, -1, :].view(-1, per_kv, n).any(dim=1)  # (Hkv, n)
        kv += (held.sum(dim=1) / n).tolist()
    assert plan_kv_density(plan, n) == pytest.approx(sum(kv) / len(kv))
    assert plan_attention_density(plan, n) == pytest.approx(sum(pairs) / len(pairs))


def test_library_errors_are_value_errors(tmp_path):
    """The stage layer turns these into one-line user errors; the library itself raises ValueError."""
    with pytest.raises(ValueError, match="not found") as err:
        load_plan(tmp_path / "missing.json")
    assert not isinstance(err.value, UserError)
    with pytest.raises(ValueError, match="fingerprint") as err:
        validate_plan(random_plan(), Info(fingerprint="ffff"))
    assert not isinstance(err.value, UserError)


def test_uniform_plan():
    plan = Plan.uniform(Info(), 0.25, sink=8, min_span=16, lengths=[128, 1024])
    assert spans_for(plan, 1, 1024).tolist() == [256] * 4
    assert spans_for(plan, 0, 32).tolist() == [16] * 4
    assert plan.expected[1024]["kv_density"] == pytest.approx((256 + 8) / 1024)
    assert plan.expected[128]["influence_loss"] is None
