"""Greedy answers, exact-match accuracy and generation latency of a (possibly adapted, possibly sparse) model.

Prompts are batched only with prompts of the same token length, so no batch is ever padded: the sparse runtime's
kernels (:mod:`pipeline.sparse_runtime`) do not honour padding, and an unpadded batch decodes each row exactly as
it would decode alone. With a plan applied (``model.moa_plan``) decoding runs through
:func:`pipeline.sparse_runtime.generate` and its per-head cache; otherwise through ``model.generate``.
"""

from __future__ import annotations

import statistics
import time
from collections import defaultdict
from collections.abc import Sequence

import torch

from pipeline.adapters.tasks import AdapterExample, is_correct
from pipeline.adapters.training import im_end_id, progress_bar
from pipeline.calibration.builder import chat_ids, end_token_ids
from pipeline.sparse_runtime import generate as sparse_generate


def end_ids(model, tokenizer) -> list[int]:
    """Token ids that end an answer: the tokenizer's and the generation config's eos, and ``<|im_end|>``."""
    ids = end_token_ids(model, tokenizer)
    if im_end_id(tokenizer) is not None:
        ids.add(im_end_id(tokenizer))
    if not ids:
        raise ValueError("the tokenizer and the model define no end-of-sequence token")
    return sorted(ids)


def _length_buckets(prompts: list[list[int]], batch_size: int) -> list[list[int]]:
    """Indices of ``prompts`` grouped into batches of identical token length, at most ``batch_size`` each."""
    by_length: dict[int, list[int]] = defaultdict(list)
    for i, ids in enumerate(prompts):
        by_length[len(ids)].append(i)
    return [group[start:start + batch_size] for _, group in sorted(by_length.items())
            for start in range(0, len(group), batch_size)]


@torch.no_grad()
def _generate(model, input_ids: torch.Tensor, max_new_tokens: int, stop: list[int] | None, **kwargs) -> torch.Tensor:
    """Greedy continuation ``[B, max_new_tokens or fewer]`` of the unpadded batch ``input_ids`` ``[B, P]``."""
    kwargs = dict(kwargs, do_sample=False, num_beams=1, attention_mask=torch.ones_like(input_ids),
                  eos_token_id=stop, pad_token_id=(stop or [0])[0])
    if getattr(model, "moa_plan", None) is not None:
        out = sparse_generate(model, input_ids, max_new_tokens, **kwargs)
    else:
        out = model.generate(input_ids, max_new_tokens=max_new_tokens, **kwargs)
    return out[:, input_ids.shape[1]:]


def greedy_answers(model, tokenizer, examples: Sequence[AdapterExample], *, max_new_tokens: int,
                   batch_size: int = 8, progress: bool = True) -> list[str]:
    """The model's greedy answer to each example's prompt (chat template), cut at the first end token and decoded
    without special tokens; in the order of ``examples``. A transient tqdm bar counts the answered examples
    (``progress=False`` or ``MOA_NO_PROGRESS=1`` hides it)."""
    if max_new_tokens < 1 or batch_size < 1:
        raise ValueError(f"max_new_tokens and batch_size must be >= 1, got {max_new_tokens} and {batch_size}")
    stop = end_ids(model, tokenizer)
    device = next(model.parameters()).device
    prompts = [chat_ids(tokenizer, example.prompt) for example in examples]
    answers: list[str | None] = [None] * len(prompts)
    with progress_bar(len(prompts), "answer", progress=progress, leave=False) as bar:
        for batch in _length_buckets(prompts, batch_size):
            input_ids = torch.tensor([prompts[i] for i in batch], device=device)  # (B, P)
            continuations = _generate(model, input_ids, max_new_tokens, stop).tolist()  # (B, R)
            for i, tokens in zip(batch, continuations, strict=True):
                ended = next((k for k, token in enumerate(tokens) if token in stop), len(tokens))
                answers[i] = tokenizer.decode(tokens[:ended], skip_special_tokens=True).strip()
            bar.update(len(batch))
    return answers  # type: ignore[return-value]


def accuracy(model, tokenizer, examples: Sequence[AdapterExample], *, max_new_tokens: int,
             batch_size: int = 8) -> tuple[int, int, list[str]]:
    """``(correct, n, responses)``: exact-match accuracy (:func:`pipeline.adapters.tasks.is_correct`) of the
    greedy answers."""
    responses = greedy_answers(model, tokenizer, examples, max_new_tokens=max_new_tokens, batch_size=batch_size)
    correct = sum(is_correct(response, example.answer) for response, example in zip(responses, examples, strict=True))
    return correct, len(examples), responses


def generation_latency_ms(model, tokenizer, examples: Sequence[AdapterExample], *, max_new_tokens: int,
                          repeats: int = 1, warmup: bool = True) -> float:
    """Median wall-clock milliseconds to greedily generate exactly ``max_new_tokens`` tokens (end tokens do not
    stop it) for one example at a time, over ``examples`` x ``repeats``. One measurement per call, so a caller
    comparing two models can interleave their calls; ``warmup`` runs the first example once untimed."""
    if not examples:
        raise ValueError("no examples to time")
    if max_new_tokens < 1 or repeats < 1:
        raise ValueError(f"max_new_tokens and repeats must be >= 1, got {max_new_tokens} and {repeats}")
    device = next(model.parameters()).device
    prompts = [torch.tensor([chat_ids(tokenizer, example.prompt)], device=device) for example in examples]
    fixed = {"min_new_tokens": max_new_tokens}
    if warmup:
        _generate(model, prompts[0], max_new_tokens, None, **fixed)
    timings = []
    for _ in range(repeats):
        for input_ids in prompts:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            started = time.perf_counter()
            out = _generate(model, input_ids, max_new_tokens, None, **fixed)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            timings.append((time.perf_counter() - started) * 1e3)
            if out.shape[1] != max_new_tokens:
                raise ValueError(f"generation stopped after {out.shape[1]} of {max_new_tokens} tokens")
    return statistics.median(timings)
