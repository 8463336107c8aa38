"""The ``moa`` attention implementation inside real transformers models, against a dense masked oracle.

The oracle is a second attention implementation registered only here: eager softmax attention with an additive
mask built by :func:`kernels.pattern.head_masks` from spans the test computes itself from the plan's rules. It
shares nothing with the code under test beyond the pattern definition.
"""

import dataclasses
import math

import pytest
import torch
from conftest import TINY_ARCHS, make_tiny_model
from transformers import AttentionInterface

from kernels.pattern import head_masks
from pipeline.plan import Plan
from pipeline.sparse_runtime import apply_plan, generate, make_cache, plan_applied, remove_plan

SINK = 3


def oracle_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """Dense attention under ``module.oracle_spans`` (``[Hq]``), recomputed from scratch for the whole sequence."""
    group = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(group, dim=1), value.repeat_interleave(group, dim=1)  # (B, Hq, N, D)
    n = query.shape[2]
    keep = head_masks(n, module.oracle_spans, SINK, device=query.device)  # (Hq, N, N)
    scores = torch.matmul(query.double(), key.double().transpose(-1, -2)) * scaling
    scores = scores.masked_fill(~keep, float("-inf"))
    out = torch.matmul(torch.softmax(scores, dim=-1), value.double()).to(query.dtype)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register("moa_test_oracle", oracle_attention)


def rule_spans(plan: Plan, layer: int, n: int, group: int) -> torch.Tensor:
    """Per-query-head spans written out from the DESIGN formula ``clamp(alpha + beta * N, min_span, N)``."""
    spans = [max(min(math.floor(a + b * n), n), min(plan.min_span, n))
             for a, b in zip(plan.alphas[layer], plan.betas[layer], strict=True)]
    per_query = [s for s in spans for _ in range(group)] if plan.granularity == "kv_head" else spans
    return torch.tensor(per_query)


def oracle_logits(model, plan: Plan, ids: torch.Tensor, span_length: int) -> torch.Tensor:
    """Logits of ``model`` with every layer under the oracle at spans evaluated at ``span_length``."""
    group = model.config.num_attention_heads // model.config.num_key_value_heads
    previous = model.config._attn_implementation
    for module in model.modules():
        if hasattr(module, "num_key_value_groups"):
            module.oracle_spans = rule_spans(plan, module.layer_idx, span_length, group)
    model.set_attn_implementation("moa_test_oracle")
    try:
        return model(ids, use_cache=False).logits
    finally:
        model.set_attn_implementation(previous)


def random_plan(model, granularity="kv_head", seed=0, scale=1.0) -> Plan:
    """Random rules giving spans from ``min_span`` up to well past the tiny sequences used here."""
    plan = Plan.uniform(model, 0.0, sink=SINK, min_span=2, granularity=granularity)
    g = torch.Generator().manual_seed(seed)
    shape = (len(plan.alphas), len(plan.alphas[0]))
    plan.alphas = (torch.rand(shape, generator=g) * 12 * scale).tolist()
    plan.betas = (torch.rand(shape, generator=g) * 0.4 * scale).tolist()
    return plan


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_plan_matches_oracle_and_removes_cleanly(arch):
    model = make_tiny_model(arch, layers=3)
    ids = torch.randint(0, 128, (2, 37), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        dense = model(ids).logits
        plan = apply_plan(model, random_plan(model))
        sparse = model(ids).logits
        remove_plan(model)
        restored = model(ids).logits
        expected = oracle_logits(model, plan, ids, ids.shape[1])
    torch.testing.assert_close(sparse, expected, atol=1e-4, rtol=1e-4)
    assert (sparse - dense).abs().max() > 1e-3  # the plan really is sparse at this length
    assert torch.equal(restored, dense)
    assert model.config._attn_implementation == "sdpa"
    assert not hasattr(model, "moa_plan")


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_full_spans_equal_dense_sdpa(arch):
    model = make_tiny_model(arch)
    ids = torch.randint(0, 128, (1, 29), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        dense = model(ids).logits
        apply_plan(model, Plan.uniform(model, 1.0, sink=0, min_span=1))
        torch.testing.assert_close(model(ids).logits, dense, atol=1e-5, rtol=1e-5)


def assert_matches_recomputation(model, plan, ids, result, new, *, atol, rtol):
    """Each step's logits and greedy token equal a full recomputation under the mask fixed at prompt + new."""
    seq, total = ids, ids.shape[1] + new
    for step in range(new):
        with torch.no_grad():
            logits = oracle_logits(model, plan, seq, total)[:, -1]
        torch.testing.assert_close(result.logits[step], logits, atol=atol, rtol=rtol)
        seq = torch.cat([seq, logits.argmax(dim=-1, keepdim=True)], dim=1)
    assert torch.equal(result.sequences, seq)


@pytest.mark.parametrize(
    ("arch", "granularity", "heads", "kv_heads", "backend"),
    [("llama", "kv_head", 4, 2, "auto"), ("mistral", "kv_head", 4, 2, "auto"), ("qwen2", "kv_head", 4, 4, "auto"),
     ("qwen3", "kv_head", 4, 2, "auto"), ("llama", "head", 4, 2, "auto"), ("qwen2", "head", 4, 4, "auto"),
     ("qwen3", "kv_head", 4, 2, "triton"),
     pytest.param("llama", "kv_head", 4, 2, "triton", marks=pytest.mark.gpu, id="cuda-triton")],
)
def test_generate_equals_recomputation(request, arch, granularity, heads, kv_heads, backend):
    """Greedy decoding through the per-head cache picks the tokens a full recomputation under the same fixed
    mask picks at every step, with matching logits; spans are small enough that every ring buffer wraps."""
    device = "cuda" if "gpu" in request.keywords else "cpu"
    model = make_tiny_model(arch, heads=heads, kv_heads=kv_heads).to(device)
    model.generation_config.eos_token_id = None
    prompt, new = 21, 17
    plan = apply_plan(model, random_plan(model, granularity, seed=3, scale=0.5), backend=backend)
    ids = torch.randint(0, 128, (2, prompt), generator=torch.Generator().manual_seed(4)).to(device)
    result = generate(model, ids, new, do_sample=False, output_logits=True, return_dict_in_generate=True)
    assert result.sequences.shape == (2, prompt + new)
    assert_matches_recomputation(model, plan, ids, result, new, atol=1e-4, rtol=1e-4)


@pytest.mark.filterwarnings("ignore:.*past_key_values.*:FutureWarning")  # renamed to `cache` after 5.17
def test_generate_accepts_a_prebuilt_cache():
    """``model.generate(ids, past_key_values=make_cache(...))``, the standard argument of every supported version."""
    model = make_tiny_model("llama")
    model.generation_config.eos_token_id = None
    plan = apply_plan(model, random_plan(model, scale=0.5))
    ids = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(5))
    result = model.generate(ids, past_key_values=make_cache(model, 12, 6), max_new_tokens=6, do_sample=False,
                            output_logits=True, return_dict_in_generate=True)
    assert_matches_recomputation(model, plan, ids, result, 6, atol=1e-4, rtol=1e-4)


def test_out_of_scope_inputs_are_refused():
    model = make_tiny_model("llama")
    apply_plan(model, random_plan(model))
    ids = torch.randint(0, 128, (2, 10))
    padding = torch.ones_like(ids)
    padding[0, :3] = 0
    with pytest.raises(ValueError, match="padding"):
        model(ids, attention_mask=padding)
    with pytest.raises(ValueError, match="per-head cache"):
        model.generate(ids, max_new_tokens=2, do_sample=False)


def test_library_errors_are_value_errors():
    model = make_tiny_model("llama")
    with pytest.raises(ValueError, match="unknown attention backend"):
        apply_plan(model, random_plan(model), backend="fast")
    with pytest.raises(ValueError, match="no sparse plan"):
        remove_plan(model)


def test_plan_applied_removes_the_plan_on_error():
    """Leaving the block by an exception restores the model's own attention bit for bit, hooks included."""
    model = make_tiny_model("qwen3", layers=2)
    ids = torch.randint(0, 128, (1, 23), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        dense = model(ids).logits
        with pytest.raises(KeyError, match="inside"), plan_applied(model, random_plan(model), backend="cpu") as plan:
            assert plan.sink == SINK and model.moa_plan is plan
            sparse = model(ids).logits
            with pytest.raises(ValueError, match="already applied"), plan_applied(model, plan):
                pass
            raise KeyError("inside")
        restored = model(ids).logits
    assert (sparse - dense).abs().max() > 1e-3
    assert torch.equal(restored, dense)
    assert model.config._attn_implementation == "sdpa" and not hasattr(model, "moa_plan")
    for module in model.modules():
        assert not module._forward_pre_hooks and not module._forward_hooks
        assert not any(name.startswith("moa_") for name in vars(module))


@pytest.mark.slow
def test_smollm2_generate_equals_recomputation():
    """The embedded SmolLM2 (30 layers, 9 query / 3 KV heads): decoding through the per-head cache matches
    recomputation under the fixed mask, and the ModelInfo fingerprint is checked."""
    from omegaconf import OmegaConf

    from pipeline.models import load_model

    loaded = load_model(OmegaConf.load("pipeline/conf/model/smollm2.yaml"))
    model, info = loaded.model, loaded.info
    model.generation_config.eos_token_id = None
    plan = Plan.uniform(info, 0.0, sink=SINK, min_span=16)
    g = torch.Generator().manual_seed(6)
    shape = (info.num_layers, info.num_kv_heads)
    plan.alphas = (16 + torch.rand(shape, generator=g) * 48).tolist()
    plan.betas = (torch.rand(shape, generator=g) * 0.2).tolist()
    plan = apply_plan(model, plan, info=info)
    text = "Repeat after me: the quick brown fox jumps over the lazy dog. " * 12
    ids = loaded.tokenizer(text, return_tensors="pt").input_ids
    new = 12
    result = generate(model, ids, new, do_sample=False, output_logits=True, return_dict_in_generate=True)
    assert_matches_recomputation(model, plan, ids, result, new, atol=2e-3, rtol=1e-3)
    wrong = dataclasses.replace(info, fingerprint="0" * 16)
    with pytest.raises(ValueError, match="fingerprint"):
        apply_plan(model, plan, info=wrong)
