"""Train one adapter composition and measure it: the shared harness of trials, baselines and plan variants.

Every method goes through the same three steps, with or without a sparse plan applied:

- :func:`fit`: attach the composition, train it on the mixed task data (response tokens only);
- :func:`score`: exact-match accuracy on a split, with its 95% Wilson interval and per-task accuracies;
- :func:`latency_overhead`: greedy generation time against the base model on dense attention, measured in
  alternating rounds on the same prompts, as the median of per-round ratios, minus one.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass

from pipeline.adapters import attach_adapters, detach_adapters
from pipeline.adapters.attach import adapters_detached
from pipeline.adapters.inference import accuracy, generation_latency_ms
from pipeline.adapters.tasks import is_correct, make_examples
from pipeline.adapters.training import encode, train
from pipeline.evaluation.scoring import wilson_interval
from pipeline.sparse_runtime import plan_applied_if

EVAL_BATCH = 16  # greedy decoding batches prompts of equal token length, up to this many


@dataclass(frozen=True)
class TaskData:
    """Per split, the examples of every task, mixed (``train`` encoded for training)."""

    train: list
    val: list
    test: list


@dataclass(frozen=True)
class Score:
    correct: int
    n: int
    per_task: dict[str, float]

    @property
    def accuracy(self) -> float:
        return self.correct / self.n

    @property
    def interval(self) -> tuple[float, float]:
        return wilson_interval(self.correct, self.n)


def task_data(tokenizer, settings) -> TaskData:
    """Train, validation and test examples of every task in ``settings.tasks`` (an ``AdaptersSettings``)."""
    def split(name: str, n: int) -> list:
        return [ex for task in settings.tasks for ex in make_examples(task, name, n, settings.seed)]

    return TaskData(train=encode(tokenizer, split("train", settings.train_examples)),
                    val=split("val", settings.val_examples), test=split("test", settings.test_examples))


def fit(model, composition, data: TaskData, settings, *, lr: float, seed: int, steps: int,
        on_step: Callable[[int, float], None] | None = None):
    """Attach ``composition`` to ``model`` and train it for ``steps`` optimiser steps (a search trial's
    ``settings.steps``, or the final comparison's ``settings.final_steps``); returns ``(adapter_set, train_result)``.
    The adapters stay attached; the caller detaches them (:func:`pipeline.adapters.detach_adapters`)."""
    adapter_set = attach_adapters(model, composition, seed=seed)
    try:
        result = train(model, data.train, adapter_set.trainable_parameters(), steps=steps,
                       batch_size=settings.batch_size, lr=lr, weight_decay=settings.weight_decay,
                       warmup_ratio=settings.warmup_ratio, max_grad_norm=settings.max_grad_norm,
                       aux_loss=adapter_set.weighted_aux_loss, on_step=on_step, seed=seed)
    except BaseException:
        detach_adapters(model)
        raise
    return adapter_set, result


def score(model, tokenizer, examples: list, settings) -> Score:
    """Greedy exact-match accuracy of ``model`` as it is (adapters, plan) on ``examples``."""
    was_training = model.training
    model.eval()
    try:
        correct, n, responses = accuracy(model, tokenizer, examples, max_new_tokens=settings.max_new_tokens,
                                         batch_size=EVAL_BATCH)
    finally:
        model.train(was_training)
    per_task: dict[str, list[bool]] = {}
    for example, response in zip(examples, responses, strict=True):
        per_task.setdefault(example.task, []).append(is_correct(response, example.answer))
    return Score(correct=correct, n=n, per_task={t: sum(v) / len(v) for t, v in per_task.items()})


def latency_overhead(model, tokenizer, examples: list, settings, *, plan=None, backend: str = "auto") -> float:
    """How much slower greedy generation is as ``model`` stands (its adapters, and ``plan`` if given) than the
    base model on dense attention: median over ``settings.latency_rounds`` rounds of (ours / base) - 1, each
    round timing both on the same ``settings.latency_prompts`` prompts back to back. The base model itself has
    no overhead by definition: 0, without timing."""
    if plan is None and getattr(model, "moa_adapters", None) is None:
        return 0.0
    prompts = examples[:settings.latency_prompts]

    def timed() -> float:
        return generation_latency_ms(model, tokenizer, prompts, max_new_tokens=settings.max_new_tokens)

    ratios = []
    for _ in range(settings.latency_rounds):
        with adapters_detached(model):
            base = timed()
        with plan_applied_if(model, plan, backend=backend):
            ours = timed()
        ratios.append(ours / base)
    return statistics.median(ratios) - 1.0
