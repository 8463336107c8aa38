"""Scoring evaluation answers: exact-answer matching, Wilson intervals, and fidelity of a sparse model to dense.

- ``is_correct``: whether a free-text response states the gold answer. Small chat models answer in a sentence
  and often spell numbers digit by digit ("The pass key is 6 8 3 4 2."), so responses are normalised first.
- ``wilson_interval``: the Wilson score interval of an accuracy (scipy's ``binomtest``).
- ``kl_from_dense``: mean KL(dense || sparse) of the next-token distributions over the scored positions.
- ``stated_answer``: what a response answers: the numbers it states, in order, or its normalised text if none.
- ``agreement``: share of items on which the sparse model's greedy answer equals the dense one.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
import torch.nn.functional as F

# A run of single digits spelt one by one: "6 8 3 4 2", "6, 8, 3", "6-8-3" (at least two digits).
_SPELT_DIGITS = re.compile(r"(?<![\d.,])\d(?:(?:\s*[,\-]\s*|\s+)\d)+(?![\d]|[.,]\d)")
# Thousands separators: "68,342" or "1,234,567".
_THOUSANDS = re.compile(r"(?<![\d.,])\d{1,3}(?:,\d{3})+(?![\d]|[.,]\d)")
# A number: a digit run, with a decimal part when one follows ("3.5"); a sentence's final period is no part of it.
_NUMBER = re.compile(r"\d+(?:\.\d+)*")


def _collapse_digits(text: str) -> str:
    """``text`` with digit-by-digit spellings and thousands separators joined into plain numbers."""
    text = _THOUSANDS.sub(lambda m: m.group(0).replace(",", ""), text)
    return _SPELT_DIGITS.sub(lambda m: re.sub(r"\D", "", m.group(0)), text)


def normalize_answer(text: str) -> str:
    """The canonical form used to compare responses: digit spellings collapsed, lower case, words only.

    ``"The pass key is 6 8 3 4 2."`` and ``"the pass key is 68342"`` both become ``"the pass key is 68342"``."""
    text = _collapse_digits(text).lower()
    text = re.sub(r"(?<!\d)\.|\.(?!\d)", " ", text)  # periods, except a decimal point
    return " ".join(re.sub(r"[^\w.]+", " ", text).split())


def stated_answer(text: str) -> tuple[str, ...] | str:
    """What ``text`` answers, for comparing two responses to the same question: the numbers it states, in order,
    after digit spellings and thousands separators are collapsed; its :func:`normalize_answer` text if it states
    none. Every evaluation question asks for a number, so ``"The answer is 81350."`` and ``"The number NEBA equals
    81350."`` give the same answer, and ``"... is 43."`` and ``"... is 4344."`` do not."""
    numbers = _NUMBER.findall(_collapse_digits(text))
    return tuple(numbers) if numbers else normalize_answer(text)


def is_correct(response_text: str, answer: str) -> bool:
    """Whether ``response_text`` states ``answer``.

    A numeric answer must appear as a whole number of the response after digit spellings ("6 8 3 4 2") and
    thousands separators ("68,342") are collapsed; it never matches inside a longer number ("683421", "168342",
    "68342.5"). Any other answer must appear as whole words, case-insensitively. An empty response is wrong."""
    answer = answer.strip()
    if not answer:
        raise ValueError("empty gold answer")
    if answer.isdigit():
        return answer in _NUMBER.findall(_collapse_digits(response_text))
    normalized, target = normalize_answer(response_text), normalize_answer(answer)
    return bool(target) and re.search(rf"(?<![\w.]){re.escape(target)}(?![\w]|\.\d)", normalized) is not None


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """The Wilson score interval ``(low, high)`` of ``successes`` out of ``n`` at ``confidence``."""
    from scipy.stats import binomtest

    if n <= 0 or not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n and n > 0, got {successes} of {n}")
    ci = binomtest(int(successes), int(n)).proportion_ci(confidence_level=confidence, method="wilson")
    return float(ci.low), float(ci.high)


def kl_from_dense(dense_logits: torch.Tensor, sparse_logits: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean KL(dense || sparse) over the positions where ``mask`` is set, in nats.

    dense_logits, sparse_logits: ``[..., T, V]`` next-token logits of the same tokens; mask: ``[..., T]``, nonzero
    at the positions to score. To score response tokens ``t`` (``loss_mask[t] == 1``), mark the positions that
    predict them, ``t - 1``. Computed in float64 from ``log_softmax``; a token the dense model gives zero
    probability adds nothing, and one the sparse model gives zero probability but dense does not makes it inf."""
    if dense_logits.shape != sparse_logits.shape:
        raise ValueError(f"logit shapes differ: {tuple(dense_logits.shape)} vs {tuple(sparse_logits.shape)}")
    if mask.shape != dense_logits.shape[:-1]:
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match logits {tuple(dense_logits.shape)}")
    keep = mask.to(torch.bool)
    if not keep.any():
        raise ValueError("mask selects no position")
    log_p = F.log_softmax(dense_logits[keep].to(torch.float64), dim=-1)  # (K, V)
    log_q = F.log_softmax(sparse_logits[keep].to(torch.float64), dim=-1)  # (K, V)
    p = log_p.exp()
    per_token = torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p)).sum(dim=-1)  # (K,)
    return float(per_token.mean())


def agreement(dense_answers: Sequence, sparse_answers: Sequence) -> float:
    """Share of items whose sparse greedy answer equals the dense one.

    Responses given as strings are compared by :func:`stated_answer` (the numbers they state; wording, case,
    punctuation and digit spelling do not count); answers given as token-id sequences are compared exactly."""
    if len(dense_answers) != len(sparse_answers):
        raise ValueError(f"{len(dense_answers)} dense answers but {len(sparse_answers)} sparse ones")
    if not dense_answers:
        raise ValueError("no answers to compare")

    def key(answer):
        if isinstance(answer, str):
            return stated_answer(answer)
        if isinstance(answer, torch.Tensor):
            return tuple(answer.flatten().tolist())
        return tuple(int(token) for token in answer)

    if len({isinstance(answer, str) for answer in [*dense_answers, *sparse_answers]}) > 1:
        raise ValueError("compare strings with strings or token ids with token ids, not both")
    same = sum(key(d) == key(s) for d, s in zip(dense_answers, sparse_answers, strict=True))
    return same / len(dense_answers)
