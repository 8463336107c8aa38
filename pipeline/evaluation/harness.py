"""Evaluate one attention method at one length: accuracy, fidelity to dense, perplexity and cost.

A *method* is dense attention or a plan (the selected MoA plan, or a baseline plan at the same KV density); every
plan runs through the same runtime (:func:`pipeline.sparse_runtime.plan_applied`). Fidelity compares each
sample with the dense model's own greedy answer, so it holds even where both are wrong:

- ``agree_dense``: the share of samples whose greedy answer equals dense's (normalised answer text);
- ``kl_dense``: the mean KL(dense || method) over dense's response tokens, teacher-forced. While a method's greedy
  response equals dense's, its own decode logits are exactly those; otherwise one forward pass over the prompt
  and dense's response gives them.
"""

from __future__ import annotations

import contextlib
import math
import statistics
from dataclasses import dataclass

import torch

from pipeline.calibration.builder import chat_ids
from pipeline.calibration.tasks import _prose_paragraphs, item_rng
from pipeline.evaluation.generation import Generation, teacher_forced_logits, timed_greedy
from pipeline.evaluation.perplexity import perplexity
from pipeline.evaluation.scoring import agreement, is_correct, kl_from_dense, wilson_interval
from pipeline.evaluation.tasks import make_eval_item
from pipeline.plan import Plan, plan_attention_density, plan_kv_density
from pipeline.sparse_runtime import plan_applied

PPL_SPLIT = "evaluation-text"


@dataclass(frozen=True, eq=False)
class Method:
    name: str
    """``dense``, ``moa``, ``uniform`` or ``binary``."""
    budget: str
    """The budget label (empty for dense)."""
    plan_id: str
    plan: Plan | None


def eval_items(tokenizer, tasks, length: int, samples: int, max_new_tokens: int, seed: int) -> dict[str, list]:
    """``{task: [EvalItem, ...]}``: ``samples`` items per task whose chat prompt fits ``length - max_new_tokens``."""
    return {task: [make_eval_item(tokenizer, task, length, max_new_tokens, index, seed) for index in range(samples)]
            for task in tasks}


def heldout_text(tokenizer, length: int, seed: int) -> dict[str, torch.Tensor]:
    """One ``length``-token passage of natural prose (a seed stream of its own), scored on its second half:
    ``input_ids``/``loss_mask`` ``[1, length]``, ``lengths`` ``[1]``."""
    rng = item_rng(PPL_SPLIT, "prose", length, 0, seed)
    paragraphs = list(_prose_paragraphs())
    rng.shuffle(paragraphs)
    ids: list[int] = []
    for paragraph in paragraphs:
        ids += tokenizer(paragraph + "\n\n", add_special_tokens=False)["input_ids"]
        if len(ids) >= length:
            break
    if len(ids) < length:
        raise ValueError(f"not enough held-out prose for {length} tokens")
    mask = torch.zeros(1, length, dtype=torch.uint8)
    mask[0, length // 2:] = 1
    return {"input_ids": torch.tensor([ids[:length]]), "loss_mask": mask, "lengths": torch.tensor([length])}


def run_method(model, tokenizer, method: Method, items: dict[str, list], eos_ids: set[int], max_new_tokens: int,
               *, backend: str) -> dict[str, list[Generation]]:
    """Greedy generations of ``method`` for every item (after one untimed warm-up generation)."""
    with _attention(model, method, backend):
        warm = next(iter(items.values()))[0]
        timed_greedy(model, chat_ids(tokenizer, warm.prompt), 2, eos_ids)
        return {task: [timed_greedy(model, chat_ids(tokenizer, item.prompt), max_new_tokens, eos_ids)
                       for item in task_items] for task, task_items in items.items()}


def method_perplexity(model, method: Method, text: dict[str, torch.Tensor], *, backend: str) -> float:
    with _attention(model, method, backend):
        return perplexity(model, text["input_ids"], text["loss_mask"], text["lengths"])


def result_rows(model, tokenizer, method: Method, length: int, items: dict[str, list],
                generations: dict[str, list[Generation]], dense: dict[str, list[Generation]], ppl: float,
                *, backend: str) -> list[dict]:
    """One results row per task (the ``eval/results.csv`` columns)."""
    rows = []
    for task, task_items in items.items():
        gens, refs = generations[task], dense[task]
        texts = [tokenizer.decode(g.response_ids, skip_special_tokens=True) for g in gens]
        dense_texts = [tokenizer.decode(g.response_ids, skip_special_tokens=True) for g in refs]
        correct = sum(is_correct(text, item.answer) for text, item in zip(texts, task_items, strict=True))
        low, high = wilson_interval(correct, len(gens))
        rows.append({
            "method": method.name, "budget": method.budget, "plan_id": method.plan_id, "task": task,
            "seq_len": length, "n": len(gens), "accuracy": correct / len(gens), "acc_lo": low, "acc_hi": high,
            "agree_dense": agreement(dense_texts, texts),
            "kl_dense": _mean_kl(model, method, gens, refs, backend=backend),
            "ppl": ppl,
            "prefill_ms": statistics.median(g.prefill_ms for g in gens),
            "decode_ms_per_token": _median_finite(g.decode_ms_per_token for g in gens),
            "kv_bytes": int(statistics.median(g.kv_bytes for g in gens)),
            "kv_density": 1.0 if method.plan is None else plan_kv_density(method.plan, length),
            "attention_density": 1.0 if method.plan is None else plan_attention_density(method.plan, length),
        })
    return rows


def _mean_kl(model, method: Method, gens: list[Generation], refs: list[Generation], *, backend: str) -> float:
    """Mean over samples of the mean KL(dense || method) on dense's response tokens."""
    if method.plan is None:
        return 0.0
    values = []
    with _attention(model, method, backend):
        for gen, ref in zip(gens, refs, strict=True):
            if gen.response_ids[:len(ref.response_ids)] == ref.response_ids:
                logits = gen.logits[:len(ref.response_ids)]  # same prefix: the decode logits are teacher-forced ones
            else:
                logits = teacher_forced_logits(model, ref.prompt_ids, ref.response_ids)
            values.append(kl_from_dense(ref.logits, logits, torch.ones(len(ref.response_ids))))
    return sum(values) / len(values)


def _median_finite(values) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return statistics.median(finite) if finite else float("nan")


def _attention(model, method: Method, backend: str):
    """Dense attention, or the method's plan applied for the length of the block."""
    return contextlib.nullcontext() if method.plan is None else plan_applied(model, method.plan, backend=backend)
