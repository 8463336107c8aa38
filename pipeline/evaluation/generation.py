"""Timed greedy generation through the model's cache, keeping each step's logits.

With a plan applied (:func:`pipeline.sparse_runtime.apply_plan`) generation runs on the per-head cache, sized for
this prompt and ``max_new_tokens``; without one, on transformers' ``DynamicCache``. Prefill and every decode step
are timed separately, so one run gives accuracy, fidelity and latency.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from pipeline.sparse_runtime import cache_argument, make_cache


@dataclass
class Generation:
    prompt_ids: list[int]
    response_ids: list[int]
    """The greedy response, up to and including the first end token."""
    logits: torch.Tensor
    """``[R, V]`` float32: the logits each response token was chosen from."""
    prefill_ms: float
    decode_ms_per_token: float
    """Mean over the decode steps (nan when the response has a single token)."""
    kv_bytes: int
    """Bytes the cache holds (dense) or allocates (per-head cache) after generation."""


@torch.no_grad()
def timed_greedy(model, prompt_ids: list[int], max_new_tokens: int, eos_ids: set[int]) -> Generation:
    """Greedy decoding of ``prompt_ids`` for at most ``max_new_tokens`` tokens, stopping after an end token."""
    device = next(model.parameters()).device
    cache = _new_cache(model, len(prompt_ids), max_new_tokens)
    kwargs = {cache_argument(): cache, "use_cache": True, "logits_to_keep": 1}
    started = time.perf_counter()
    out = model(input_ids=torch.tensor([prompt_ids], device=device), **kwargs)  # logits (1, 1, V)
    _synchronize(device)
    prefill = time.perf_counter() - started
    logits, tokens, decode_seconds = [out.logits[0, -1].float()], [], 0.0
    while True:
        tokens.append(int(logits[-1].argmax()))
        if tokens[-1] in eos_ids or len(tokens) == max_new_tokens:
            break
        started = time.perf_counter()
        out = model(input_ids=torch.tensor([[tokens[-1]]], device=device), **kwargs)
        _synchronize(device)
        decode_seconds += time.perf_counter() - started
        logits.append(out.logits[0, -1].float())
    steps = len(tokens) - 1
    return Generation(prompt_ids=list(prompt_ids), response_ids=tokens, logits=torch.stack(logits).cpu(),
                      prefill_ms=prefill * 1e3, decode_ms_per_token=decode_seconds * 1e3 / steps if steps else float("nan"),
                      kv_bytes=_cache_bytes(cache))


@torch.no_grad()
def teacher_forced_logits(model, prompt_ids: list[int], response_ids: list[int]) -> torch.Tensor:
    """``[R, V]`` float32 logits predicting each of ``response_ids`` after ``prompt_ids`` and its predecessors,
    in one forward pass (with whatever attention the model currently has)."""
    device = next(model.parameters()).device
    ids = torch.tensor([prompt_ids + response_ids[:-1]], device=device)  # (1, P + R - 1)
    out = model(input_ids=ids, use_cache=False, logits_to_keep=len(response_ids))
    return out.logits[0].float().cpu()  # (R, V)


def _synchronize(device: torch.device) -> None:
    """Wait for queued CUDA work, so wall-clock times cover the kernels and not just their launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _new_cache(model, prompt_length: int, max_new_tokens: int):
    if getattr(model, "moa_plan", None) is not None:
        return make_cache(model, prompt_length, max_new_tokens)
    from transformers import DynamicCache

    return DynamicCache(config=model.config)


def _cache_bytes(cache) -> int:
    allocated = getattr(cache, "nbytes_allocated", None)
    if allocated is not None:
        return int(allocated)
    total = 0
    for layer in getattr(cache, "layers", []):
        for name in ("keys", "values"):
            tensor = getattr(layer, name, None)
            total += tensor.nbytes if isinstance(tensor, torch.Tensor) else 0
    return total
