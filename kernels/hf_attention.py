"""The ``moa`` attention implementation for transformers: any Llama/Mistral/Qwen2/Qwen3 model runs its attention
through :func:`kernels.moa_attention` (prefill) and the packed per-head cache (decode), without per-model code.

Importing this module registers two functions under the name ``moa``:

- in ``AttentionInterface``: :func:`moa_attention_forward`, called by every attention layer with its
  post-RoPE ``query [B, Hq, n, D]`` and un-repeated ``key``/``value [B, Hkv, n, D]``;
- in ``AttentionMaskInterface``: :func:`moa_mask`, which builds no mask (the kernels apply the pattern
  themselves) and only refuses padding, which is out of scope: batches must hold equal-length prompts.

Each attention module carries its rules as ``module.moa_rules`` (a :class:`LayerRules`, attached by
:func:`pipeline.sparse_runtime.apply_plan`). Three cases:

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
from transformers.masking_utils import AttentionMaskInterface

import kernels
from kernels.decode import packed_decode_attention
from kernels.kv_cache import CACHE_KWARG

ATTENTION_NAME = "moa"
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
    cache_layer = kwargs.get(CACHE_KWARG)
    n = query.shape[2]
    if cache_layer is None:
        if key.shape[2] != n:
            raise ValueError(
                f"attention layer {layer_idx}: decoding with 'moa' needs the per-head cache; pass "
                "cache=pipeline.sparse_runtime.make_cache(...) to generate() (or use sparse_runtime.generate)"
            )
        # Spans stay on the host: the kernels move them, and their argument checks then never sync the GPU.
        out = kernels.moa_attention(query, key, value, rules.spans(n), rules.sink, backend=rules.backend, scale=scaling)
    elif cache_layer.seen == n:  # prefill: the cache returned the prompt's own states
        out = kernels.moa_attention(query, key, value, cache_layer.query_spans, cache_layer.sink,
                                    backend=rules.backend, scale=scaling)
    else:
        out = packed_decode_attention(
            query, cache_layer.keys, cache_layer.values, cache_layer.offsets, cache_layer.valid_lengths(),
            keep=cache_layer.decode_keep(), scale=scaling, backend=_DECODE_BACKEND.get(rules.backend, rules.backend),
        )
    return out.transpose(1, 2).contiguous(), None  # (B, n, Hq, D)


def moa_mask(*, attention_mask: torch.Tensor | None = None, **_) -> None:
    """Build no mask; refuse a 2-D padding mask that hides any token."""
    if attention_mask is not None and not bool(attention_mask.all()):
        raise ValueError(
            "'moa' attention does not support padding: batch prompts of equal length (the attention mask has zeros)"
        )
    return None


AttentionInterface.register(ATTENTION_NAME, moa_attention_forward)
AttentionMaskInterface.register(ATTENTION_NAME, moa_mask)
