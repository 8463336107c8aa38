"""Run a Hugging Face model under a sparse-attention plan: attach, detach, and generate with the per-head cache.

:func:`apply_plan` checks the plan against the model, gives every attention module its rules
(``module.moa_rules``, see :mod:`kernels.hf_attention`), remembers the model's attention implementation and
switches it to ``moa``; :func:`remove_plan` undoes all of it, and :func:`plan_applied` does both around a block.
Attention modules are found model-agnostically: the modules carrying ``layer_idx`` and ``num_key_value_groups``
(every Llama, Mistral and Qwen2/3 attention layer). Errors are ``ValueError`` s: this is library code.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from functools import partial

import torch

import kernels
from kernels.hf_attention import ATTENTION_NAME, LayerRules, attach, detach
from kernels.kv_cache import PerHeadKVCache
from pipeline.plan import Plan, kv_spans_for, spans_for, validate_plan

_PREVIOUS = "moa_previous_attn_implementation"


def attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's attention modules, in layer order."""
    found = [m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "num_key_value_groups")]
    return sorted(found, key=lambda m: m.layer_idx)


def apply_plan(model: torch.nn.Module, plan: Plan, *, backend: str = "auto", info=None) -> Plan:
    """Check ``plan`` against ``model`` (and against ``info``, a ModelInfo, for the fingerprint), then route the
    model's attention through it. Applying a second plan replaces the first. Returns the plan as attached."""
    if backend not in kernels.PREFILL_BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; expected one of {', '.join(kernels.PREFILL_BACKENDS)}")
    plan = validate_plan(plan, model)
    if info is not None:
        plan = validate_plan(plan, info)
    modules = attention_modules(model)
    if [m.layer_idx for m in modules] != list(range(plan.num_layers)):
        raise ValueError(f"found attention layers {[m.layer_idx for m in modules]}, expected 0..{plan.num_layers - 1}")
    for module in modules:
        attach(module, LayerRules(spans=partial(spans_for, plan, module.layer_idx), sink=plan.sink, backend=backend))
    if not hasattr(model, _PREVIOUS):
        setattr(model, _PREVIOUS, model.config._attn_implementation)
    model.moa_plan = plan
    model.set_attn_implementation(ATTENTION_NAME)
    return plan


def remove_plan(model: torch.nn.Module) -> None:
    """Restore the attention implementation the model had before :func:`apply_plan` and drop the plan."""
    if not hasattr(model, _PREVIOUS):
        raise ValueError("no sparse plan is applied to this model")
    model.set_attn_implementation(getattr(model, _PREVIOUS))
    for module in attention_modules(model):
        detach(module)
    del model.moa_plan
    delattr(model, _PREVIOUS)


@contextmanager
def plan_applied(model: torch.nn.Module, plan: Plan, **kwargs) -> Iterator[Plan]:
    """Run a block with ``plan`` applied (``kwargs`` go to :func:`apply_plan`); yields the plan as attached.

    The plan is removed on exit, also when the block raises, so the model is back to its own attention. A model
    that already has a plan is refused: leaving the block would remove that one too.
    """
    if hasattr(model, _PREVIOUS):
        raise ValueError("a sparse plan is already applied to this model; remove_plan(model) first")
    try:
        yield apply_plan(model, plan, **kwargs)
    finally:
        if hasattr(model, _PREVIOUS):  # apply_plan may have failed before attaching anything
            remove_plan(model)


def plan_applied_if(model: torch.nn.Module, plan: Plan | None, **kwargs):
    """:func:`plan_applied` for the block, or nothing (the model's own attention) when ``plan`` is ``None``."""
    return nullcontext() if plan is None else plan_applied(model, plan, **kwargs)


def make_cache(model: torch.nn.Module, prompt_length: int, max_new_tokens: int, *, batch_size: int = 1) -> PerHeadKVCache:
    """The per-head cache for generating ``max_new_tokens`` after a ``prompt_length`` prompt with the applied plan.

    Spans are fixed at the planned total length ``prompt_length + max_new_tokens`` (see :mod:`kernels.kv_cache`).
    """
    plan = getattr(model, "moa_plan", None)
    if plan is None:
        raise ValueError("apply a plan first: pipeline.sparse_runtime.apply_plan(model, plan)")
    total = int(prompt_length) + int(max_new_tokens)
    layers = range(plan.num_layers)
    return PerHeadKVCache(
        [spans_for(plan, layer, total) for layer in layers],
        [kv_spans_for(plan, layer, total) for layer in layers],
        plan.sink, total, batch_size=batch_size, head_dim=int(plan.model["head_dim"]), dtype=model.dtype,
        device=model.device,
    )


def generate(model: torch.nn.Module, input_ids: torch.Tensor, max_new_tokens: int, **generate_kwargs) -> torch.Tensor:
    """``model.generate`` with a fresh per-head cache sized for this prompt; ``input_ids`` is ``[B, n]``."""
    batch, n = input_ids.shape
    cache = make_cache(model, n, max_new_tokens, batch_size=batch)
    generate_kwargs[cache_argument()] = cache
    return model.generate(input_ids, max_new_tokens=max_new_tokens, **generate_kwargs)


def cache_argument() -> str:
    """The name ``generate`` takes a cache under: ``past_key_values`` (transformers 5.17), or ``cache`` where the
    installed version has renamed it (there ``past_key_values`` still works, with a deprecation warning)."""
    try:
        from transformers.generation.utils import ALL_CACHE_NAMES
    except ImportError:
        return "past_key_values"
    return "cache" if "cache" in ALL_CACHE_NAMES else "past_key_values"
