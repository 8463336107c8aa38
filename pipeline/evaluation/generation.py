"""Timed greedy generation through the model's cache, keeping each step's logits.

With a plan applied (:func:`pipeline.sparse_runtime.apply_plan`) generation runs on the per-head cache, sized for
this prompt and ``max_new_tokens``; without one, on transformers' ``DynamicCache``. Prefill and every decode step
are timed separately, so one run gives accuracy, fidelity and latency.
"""

from __future__ import annotations

import copy
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
    reference_logits: torch.Tensor | None = None
    """``[R', V]`` float32, when generated against a reference response of ``R'`` tokens: the logits that predict
    each reference token after the prompt and the reference's earlier tokens (teacher-forced)."""


@torch.no_grad()
def timed_greedy(model, prompt_ids: list[int], max_new_tokens: int, eos_ids: set[int],
                 reference: list[int] | None = None) -> Generation:
    """Greedy decoding of ``prompt_ids`` for at most ``max_new_tokens`` tokens, stopping after an end token.

    With ``reference`` (another method's response to the same prompt, at most ``max_new_tokens`` long) it also
    returns the teacher-forced logits of that response, without a second prefill: while the greedy response follows
    the reference, its own step logits are those; where it first leaves it, a copy of the cache is taken (outside
    the timed calls) and, after generation, fed the reference's remaining tokens one decode step at a time.
    """
    device = next(model.parameters()).device
    cache = _new_cache(model, len(prompt_ids), max_new_tokens)
    kwargs = {cache_argument(): cache, "use_cache": True, "logits_to_keep": 1}
    started = time.perf_counter()
    out = model(input_ids=torch.tensor([prompt_ids], device=device), **kwargs)  # logits (1, 1, V)
    _synchronize(device)
    prefill = time.perf_counter() - started
    logits, tokens, decode_seconds = [out.logits[0, -1].float()], [], 0.0
    fork = None  # (p, cache holding the prompt and reference[:p]) where the response leaves the reference
    while True:
        tokens.append(int(logits[-1].argmax()))
        step = len(tokens) - 1
        if fork is None and reference is not None and step < len(reference) and tokens[step] != reference[step]:
            fork = step, copy.deepcopy(cache)
        if tokens[-1] in eos_ids or len(tokens) == max_new_tokens:
            break
        started = time.perf_counter()
        out = model(input_ids=torch.tensor([[tokens[-1]]], device=device), **kwargs)
        _synchronize(device)
        decode_seconds += time.perf_counter() - started
        logits.append(out.logits[0, -1].float())
    steps = len(tokens) - 1
    kv_bytes = _cache_bytes(cache)
    forced = None
    if reference is not None:
        start, forked = fork if fork is not None else (len(tokens) - 1, cache)  # the last token was never fed
        forced = logits[:start + 1] + _teacher_forced_steps(model, forked, reference[start:-1], kwargs)
    return Generation(prompt_ids=list(prompt_ids), response_ids=tokens, logits=torch.stack(logits).cpu(),
                      prefill_ms=prefill * 1e3, decode_ms_per_token=decode_seconds * 1e3 / steps if steps else float("nan"),
                      kv_bytes=kv_bytes,
                      reference_logits=None if forced is None else torch.stack(forced[:len(reference)]).cpu())


def _teacher_forced_steps(model, cache, tokens: list[int], kwargs: dict) -> list[torch.Tensor]:
    """Feed ``tokens`` one decode step at a time into ``cache``; the ``[V]`` logits after each."""
    device = next(model.parameters()).device
    kwargs = {**kwargs, cache_argument(): cache}
    return [model(input_ids=torch.tensor([[token]], device=device), **kwargs).logits[0, -1].float()
            for token in tokens]


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
