"""Decoding through the per-head cache on every supported transformers version (``make test-compat`` runs this
file on the oldest one, ``make test`` on the newest installed).

Versions differ in how the cache travels: 5.17 takes ``past_key_values=`` in ``generate`` and the model and passes
the attention function nothing; later versions call it ``cache``. The oracle is the dense masked recomputation of
``test_hf_integration`` (eager attention under masks built from the plan's rules).
"""

import warnings

import pytest
import torch
from conftest import make_tiny_model
from test_hf_integration import oracle_logits, random_plan
from transformers.cache_utils import DynamicCache

from kernels.hf_attention import find_cache, moa_attention_forward
from pipeline.sparse_runtime import apply_plan, attention_modules, cache_argument, generate, make_cache


def test_forward_decode_loop_equals_recomputation():
    """Prefill, then one token at a time through ``model(...)`` with the cache under this version's name: each
    step's logits equal the full recomputation under the mask fixed at the planned total length."""
    model = make_tiny_model("qwen2", layers=2, heads=4, kv_heads=2)
    plan = apply_plan(model, random_plan(model, "head", seed=8, scale=0.5))
    prompt, new = 9, 7
    seq = torch.randint(0, 128, (2, prompt + new), generator=torch.Generator().manual_seed(9))
    cache = make_cache(model, prompt, new, batch_size=2)
    with torch.no_grad():
        logits = [model(seq[:, :prompt], **{cache_argument(): cache}).logits[:, -1]]
        for i in range(prompt, prompt + new - 1):
            logits.append(model(seq[:, i:i + 1], **{cache_argument(): cache}).logits[:, -1])
        assert all(m.moa_cache is None for m in attention_modules(model))  # no reference kept after a call
        expected = oracle_logits(model, plan, seq[:, :-1], prompt + new)[:, prompt - 1:]  # (B, new, V)
    torch.testing.assert_close(torch.stack(logits, dim=1), expected, atol=1e-4, rtol=1e-4)
    assert cache.get_seq_length() == prompt + new - 1


def test_generate_uses_this_versions_cache_argument():
    """``generate`` passes the cache under the name the installed version takes: no deprecation warning."""
    model = make_tiny_model("llama")
    model.generation_config.eos_token_id = None
    apply_plan(model, random_plan(model, scale=0.5))
    ids = torch.randint(0, 128, (1, 10), generator=torch.Generator().manual_seed(10))
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        warnings.simplefilter("error", DeprecationWarning)
        out = generate(model, ids, 4, do_sample=False)
    assert out.shape == (1, 14)


@pytest.mark.parametrize("name", ["cache", "past_key_values", "past_key_value", "positional", "other"])
def test_find_cache_under_any_argument_name(name):
    cache = DynamicCache()
    args, kwargs = ((torch.zeros(1), cache), {}) if name == "positional" else ((torch.zeros(1),), {name: cache})
    assert find_cache(args, {**kwargs, "use_cache": True}) is cache
    assert find_cache((), {"past_key_values": None, "use_cache": True}) is None


def test_unfilled_cache_is_refused():
    """A per-head cache the model never wrote to (passed under a name this version ignores) is an error, not a
    silent decode over empty slots."""
    model = make_tiny_model("llama")
    apply_plan(model, random_plan(model))
    module = model.model.layers[0].self_attn
    module.moa_cache = make_cache(model, 5, 3)
    q, kv = torch.randn(1, 4, 5, 16), torch.randn(1, 2, 5, 16)
    with pytest.raises(ValueError, match="did not fill"):
        moa_attention_forward(module, q, kv, kv, None, scaling=0.25)
