"""Evaluate one attention method at one length: accuracy, fidelity to dense, perplexity and cost.

A *method* is dense attention or a plan (the selected MoA plan, or a baseline plan at the same KV density); every
plan runs through the same runtime (:func:`pipeline.sparse_runtime.plan_applied`). Fidelity compares each
sample with the dense model's own greedy answer, so it holds even where both are wrong:

- ``agree_dense``: the share of samples whose greedy answer equals dense's (normalised answer text);
- ``kl_dense``: the mean KL(dense || method) over dense's response tokens, teacher-forced. They come with the
  method's own generation (:func:`pipeline.evaluation.generation.timed_greedy` given dense's response): its step
  logits while it follows dense, then decode steps over dense's remaining tokens from a copy of the cache where it
  left it; so no sample pays a second prefill.

Speed against dense is paired by prompt: ``prefill_speedup`` (and ``decode_speedup``) is the median over samples of
dense's prefill time (per-token decode time) on a prompt over the method's on the same prompt, so prompts of
different lengths do not blur it. Methods run one after another, so a machine whose load changes between them
shows in these ratios; ``stage=benchmark`` times kernels side by side in interleaved rounds.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

import torch

from pipeline.calibration.builder import chat_ids
from pipeline.calibration.tasks import _prose_paragraphs, item_rng
from pipeline.evaluation.generation import Generation, teacher_forced_logits, timed_greedy
from pipeline.evaluation.perplexity import perplexity
from pipeline.evaluation.scoring import is_correct, kl_from_dense, stated_answer, wilson_interval
from pipeline.evaluation.tasks import make_eval_item
from pipeline.plan import Plan, plan_attention_density, plan_kv_density
from pipeline.sparse_runtime import plan_applied_if

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


WARM_UP_TOKENS = 256
"""Prompt tokens of the untimed generation that warms the cache and decode path up before the timed ones."""


@dataclass(frozen=True)
class MethodRun:
    generations: dict[str, list[Generation]]
    """Per task, the greedy generation of every item."""
    ppl: float
    """Perplexity on the held-out text."""


def run_method(model, tokenizer, method: Method, items: dict[str, list], eos_ids: set[int], max_new_tokens: int,
               *, text: dict[str, torch.Tensor], backend: str,
               dense: dict[str, list[Generation]] | None = None) -> MethodRun:
    """``method``'s perplexity on the held-out ``text`` (see :func:`heldout_text`), then its greedy generations of
    every item; given ``dense``'s generations, each also carries the teacher-forced logits of dense's response (for
    ``kl_dense``). The perplexity pass, a forward at the evaluated length, comes first and untimed, so it also warms
    the method's prefill up; a short untimed generation warms up its cache and decode steps."""
    with plan_applied_if(model, method.plan, backend=backend):
        ppl = perplexity(model, text["input_ids"], text["loss_mask"], text["lengths"])
        warm = next(iter(items.values()))[0]
        timed_greedy(model, chat_ids(tokenizer, warm.prompt)[-WARM_UP_TOKENS:], 2, eos_ids)
        generations = {task: [timed_greedy(model, chat_ids(tokenizer, item.prompt), max_new_tokens, eos_ids,
                                           reference=None if dense is None else dense[task][i].response_ids)
                              for i, item in enumerate(task_items)] for task, task_items in items.items()}
    return MethodRun(generations, ppl)


def answer_rows(tokenizer, method: Method, length: int, items: dict[str, list],
                generations: dict[str, list[Generation]], dense: dict[str, list[Generation]]) -> list[dict]:
    """One row per item (the ``eval/answers.csv`` columns): the gold answer, the method's response and dense's,
    whether the response is correct, and whether it equals dense's (what ``accuracy`` and ``agree_dense`` count)."""
    rows = []
    for task, task_items in items.items():
        for index, (item, gen, ref) in enumerate(zip(task_items, generations[task], dense[task], strict=True)):
            text = tokenizer.decode(gen.response_ids, skip_special_tokens=True)
            dense_text = tokenizer.decode(ref.response_ids, skip_special_tokens=True)
            rows.append({"method": method.name, "budget": method.budget, "plan_id": method.plan_id, "task": task,
                         "seq_len": length, "item": index, "answer": item.answer, "response": text,
                         "correct": is_correct(text, item.answer), "dense_response": dense_text,
                         "agrees_dense": stated_answer(text) == stated_answer(dense_text)})
    return rows


def result_rows(model, method: Method, length: int, answers: list[dict],
                generations: dict[str, list[Generation]], dense: dict[str, list[Generation]], ppl: float,
                *, backend: str) -> list[dict]:
    """One results row per task (the ``eval/results.csv`` columns); accuracy and agreement count ``answers``
    (:func:`answer_rows` of the same generations)."""
    rows = []
    for task, gens in generations.items():
        refs = dense[task]
        scored = [answer for answer in answers if answer["task"] == task]
        correct = sum(answer["correct"] for answer in scored)
        low, high = wilson_interval(correct, len(gens))
        rows.append({
            "method": method.name, "budget": method.budget, "plan_id": method.plan_id, "task": task,
            "seq_len": length, "n": len(gens), "accuracy": correct / len(gens), "acc_lo": low, "acc_hi": high,
            "agree_dense": sum(answer["agrees_dense"] for answer in scored) / len(gens),
            "kl_dense": _mean_kl(model, method, gens, refs, backend=backend),
            "ppl": ppl,
            "prefill_ms": statistics.median(g.prefill_ms for g in gens),
            "decode_ms_per_token": _median_finite(g.decode_ms_per_token for g in gens),
            "kv_bytes": int(statistics.median(g.kv_bytes for g in gens)),
            "kv_density": 1.0 if method.plan is None else plan_kv_density(method.plan, length),
            "attention_density": 1.0 if method.plan is None else plan_attention_density(method.plan, length),
            "prefill_speedup": _paired_ratio([g.prefill_ms for g in refs], [g.prefill_ms for g in gens]),
            "decode_speedup": _paired_ratio([g.decode_ms_per_token for g in refs],
                                            [g.decode_ms_per_token for g in gens]),
        })
    return rows


def _mean_kl(model, method: Method, gens: list[Generation], refs: list[Generation], *, backend: str) -> float:
    """Mean over samples of the mean KL(dense || method) on dense's response tokens, from the teacher-forced logits
    generated with the response (one forward pass for a generation made without them)."""
    if method.plan is None:
        return 0.0
    values = []
    with plan_applied_if(model, method.plan, backend=backend):
        for gen, ref in zip(gens, refs, strict=True):
            logits = gen.reference_logits
            if logits is None:
                logits = teacher_forced_logits(model, ref.prompt_ids, ref.response_ids)
            values.append(kl_from_dense(ref.logits, logits, torch.ones(len(ref.response_ids))))
    return sum(values) / len(values)


def _paired_ratio(dense_ms: list[float], method_ms: list[float]) -> float:
    """Median over samples of dense's time over the method's on the same prompt (above 1: the method is faster);
    nan when no sample has both times."""
    return _median_finite(a / b for a, b in zip(dense_ms, method_ms, strict=True) if b > 0)


def _median_finite(values) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return statistics.median(finite) if finite else float("nan")

