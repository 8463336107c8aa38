"""The ``moa`` attention implementation for transformers: any Llama/Mistral/Qwen2/Qwen3 model runs its attention
through :func:`kernels.moa_attention` (prefill) and the packed per-head cache (decode), without per-model code.

Importing this module registers two functions under the name ``moa``:

- in ``AttentionInterface``: :func:`moa_attention_forward`, called by every attention layer with its
  post-RoPE ``query [B, Hq, n, D]`` and un-repeated ``key``/``value [B, Hkv, n, D]``;
- in ``AttentionMaskInterface``: :func:`moa_mask`, which builds no mask (the kernels apply the pattern
  themselves) and only refuses padding, which is out of scope: batches must hold equal-length prompts.

Each attention module carries its rules as ``module.moa_rules`` (a :class:`LayerRules`, attached with
:func:`attach` by :func:`pipeline.sparse_runtime.apply_plan`). How the attention function finds the KV cache
differs across transformers versions (5.17 consumes ``past_key_values`` in the attention module and passes the
function nothing; later versions call it ``cache``), so :func:`attach` also registers a forward pre-hook that
records whichever :class:`~transformers.cache_utils.Cache` the module is called with (``module.moa_cache``,
cleared after the call). Three cases:

- no cache, or a transformers cache during prefill: spans are evaluated at the query length ``n``;
- prefill into a :class:`kernels.kv_cache.PerHeadKVCache`: the cache's fixed spans (planned total length);
- decode with that cache: one token attends to its head's cached sink and band tokens.

Decoding through any other cache (``DynamicCache``, ``StaticCache``) raises: it would keep every token. The
plan's pattern replaces the model's own attention pattern, native sliding windows included.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import AttentionInterface
from transformers.cache_utils import Cache
from transformers.masking_utils import AttentionMaskInterface

import kernels
from kernels.decode import layer_decode_attention
from kernels.kv_cache import PerHeadLayer

ATTENTION_NAME = "moa"
CACHE_ARGUMENTS = ("cache", "past_key_values", "past_key_value")
"""Names decoder layers pass the KV cache under: ``cache`` (after 5.17), ``past_key_values`` (5.17), ``past_key_value`` (4.x)."""
_DECODE_BACKEND = {"cpu": "torch"}  # prefill backend name -> decode backend name, where they differ


@dataclass(frozen=True)
class LayerRules:
    """One layer's sparse pattern as the attention function needs it."""

    spans: Callable[[int], torch.Tensor]
    """Sequence length ``n`` -> per-query-head spans ``[Hq]`` (int64) at ``n``."""
    sink: int
    backend: str = "auto"
    """A :data:`kernels.PREFILL_BACKENDS` name; decode uses the same name, ``cpu`` meaning its ``torch`` path."""


def moa_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                          **kwargs) -> tuple[torch.Tensor, None]:
    """Sparse attention for one layer; returns ``([B, n, Hq, D], None)`` like transformers' SDPA function."""
    rules = getattr(module, "moa_rules", None)
    layer_idx = getattr(module, "layer_idx", "?")
    if rules is None:
        raise RuntimeError(
            f"attention layer {layer_idx} uses the 'moa' implementation but has no plan attached: "
            "use pipeline.sparse_runtime.apply_plan(model, plan)"
        )
    if attention_mask is not None:
        raise ValueError("'moa' attention applies its own sparse causal pattern; custom attention masks are not supported")
    if dropout:
        raise ValueError("'moa' attention is for inference: attention dropout must be 0 (call model.eval())")
    cache_layer = per_head_layer(module)
    n = query.shape[2]
    if cache_layer is None:
        if key.shape[2] != n:
            raise ValueError(
                f"attention layer {layer_idx}: decoding with 'moa' needs the per-head cache; pass "
                "past_key_values=pipeline.sparse_runtime.make_cache(...) to generate() (or use sparse_runtime.generate)"
            )
        # Spans stay on the host: the kernels move them, and their argument checks then never sync the GPU.
        out = kernels.moa_attention(query, key, value, rules.spans(n), rules.sink, backend=rules.backend, scale=scaling)
    elif cache_layer.seen < n:
        raise ValueError(
            f"attention layer {layer_idx} got a per-head cache that the model did not fill: pass it under the "
            "cache argument of this transformers version (past_key_values=, see sparse_runtime.cache_argument())"
        )
    elif cache_layer.seen == n:  # prefill: the cache returned the prompt's own states
        out = kernels.moa_attention(query, key, value, cache_layer.query_spans, cache_layer.sink,
                                    backend=rules.backend, scale=scaling)
    else:
        out = layer_decode_attention(query, cache_layer, scale=scaling,
                                     backend=_DECODE_BACKEND.get(rules.backend, rules.backend))
    return out.transpose(1, 2).contiguous(), None  # (B, n, Hq, D)


def attach(module: torch.nn.Module, rules: LayerRules) -> None:
    """Give an attention module its rules and the hooks that record its KV cache; replaces earlier ones."""
    detach(module)
    module.moa_rules = rules
    module.moa_cache = None
    module.moa_hooks = (
        module.register_forward_pre_hook(_record_cache, with_kwargs=True),
        module.register_forward_hook(_release_cache, always_call=True),
    )


def detach(module: torch.nn.Module) -> None:
    """Undo :func:`attach` (a no-op on a module that was never attached)."""
    for handle in getattr(module, "moa_hooks", ()):
        handle.remove()
    for name in ("moa_rules", "moa_cache", "moa_hooks"):
        if hasattr(module, name):
            delattr(module, name)


def find_cache(args: tuple, kwargs: dict) -> Cache | None:
    """The KV cache among an attention module's call arguments: a known argument name first, else any Cache."""
    for name in CACHE_ARGUMENTS:
        if isinstance(kwargs.get(name), Cache):
            return kwargs[name]
    return next((x for x in (*args, *kwargs.values()) if isinstance(x, Cache)), None)


def per_head_layer(module: torch.nn.Module) -> PerHeadLayer | None:
    """The module's layer of the per-head cache it was called with, or None (no cache, or another kind)."""
    layers = getattr(getattr(module, "moa_cache", None), "layers", None)
    idx = getattr(module, "layer_idx", None)
    if layers is None or idx is None or idx >= len(layers):
        return None
    return layers[idx] if isinstance(layers[idx], PerHeadLayer) else None


def _record_cache(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
    module.moa_cache = find_cache(args, kwargs)


def _release_cache(module: torch.nn.Module, args: tuple, output) -> None:
    module.moa_cache = None  # do not keep the cache's buffers alive after the call


def moa_mask(*, attention_mask: torch.Tensor | None = None, **_) -> None:
    """Build no mask; refuse a 2-D padding mask that hides any token."""
    if attention_mask is not None and not bool(attention_mask.all()):
        raise ValueError(
            "'moa' attention does not support padding: batch prompts of equal length (the attention mask has zeros)"
        )
    return None


AttentionInterface.register(ATTENTION_NAME, moa_attention_forward)
AttentionMaskInterface.register(ATTENTION_NAME, moa_mask)
