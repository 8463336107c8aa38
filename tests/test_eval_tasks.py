"""Evaluation tasks and scoring: deterministic items that fit their length, disjoint from calibration and
validation, robust answer matching, Wilson intervals and KL fidelity against independent oracles."""

from __future__ import annotations

import math
import re

import pytest
import torch

from pipeline.calibration import tasks as calibration_tasks
from pipeline.calibration.builder import chat_ids, make_item
from pipeline.evaluation import tasks as eval_tasks
from pipeline.evaluation.scoring import (
    agreement,
    is_correct,
    kl_from_dense,
    normalize_answer,
    wilson_interval,
)
from pipeline.evaluation.tasks import SPLIT, TASKS, make_eval_item
from pipeline.models import byte_tokenizer

MAX_NEW = 48
TASK_NAMES = sorted(TASKS)


@pytest.fixture(scope="module")
def tokenizer():
    return byte_tokenizer()


# --- generators -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("task", TASK_NAMES)
def test_items_are_deterministic_per_seed(tokenizer, task):
    first = make_eval_item(tokenizer, task, 1024, MAX_NEW, 3, 11)
    again = make_eval_item(tokenizer, task, 1024, MAX_NEW, 3, 11)
    assert first == again and first.task == task
    others = [make_eval_item(tokenizer, task, 1024, MAX_NEW, 3, 12),   # another seed
              make_eval_item(tokenizer, task, 1024, MAX_NEW, 4, 11)]   # another index
    for other in others:
        assert other.prompt != first.prompt and other.answer != first.answer


@pytest.mark.parametrize("length", [512, 1024, 2048])
@pytest.mark.parametrize("task", TASK_NAMES)
def test_prompt_fits_the_budget_closely(tokenizer, task, length):
    """Like calibration: the chat-formatted prompt fits ``length - max_new_tokens``; and it ends close to it
    (within one filler sentence / a few words; the byte tokenizer counts bytes)."""
    budget = length - MAX_NEW
    for index in range(4):
        item = make_eval_item(tokenizer, task, length, MAX_NEW, index, 0)
        used = len(chat_ids(tokenizer, item.prompt))
        assert budget - 48 <= used <= budget, (task, index, used, budget)


class _MergingTokenizer:
    """A byte tokenizer whose count grows by 40 when a needle is followed by more context than the question,
    as a subword tokenizer may merge differently around a needle once it moves into the context."""

    def __init__(self, inner):
        self.inner = inner

    def apply_chat_template(self, messages, **kwargs):
        text = messages[0]["content"]
        needle_then_context = r"(?:the pass key\.|catalogue number \d+\.|= [A-Z]{4}\.) (?!\n|What|[A-Z]{4} =)"
        extra = 40 * len(re.findall(needle_then_context, text))
        return list(self.inner.apply_chat_template(messages, **kwargs)) + [0] * extra


@pytest.mark.parametrize("task", TASK_NAMES)
def test_prompt_fits_even_when_the_needle_tokenizes_longer_in_place(tokenizer, task):
    merging = _MergingTokenizer(tokenizer)
    for index in range(4):
        item = make_eval_item(merging, task, 1024, MAX_NEW, index, 0)
        assert len(chat_ids(merging, item.prompt)) <= 1024 - MAX_NEW


@pytest.mark.parametrize("task", TASK_NAMES)
def test_answer_is_stated_far_back_in_the_prompt(tokenizer, task):
    for index in range(6):
        item = make_eval_item(tokenizer, task, 2048, MAX_NEW, index, 7)
        assert item.prompt.count(item.needle) == 1 and item.answer in item.needle
        needle_at = item.prompt.find(item.needle)
        assert needle_at < 0.85 * len(item.prompt), "the needle lies in the first 80% of the context"
        assert item.answer not in item.prompt[-300:], "the answer must not sit next to the question"


def test_needle_depth_varies(tokenizer):
    depths = {make_eval_item(tokenizer, "passkey", 2048, MAX_NEW, index, 0).prompt.find("The pass key is")
              for index in range(8)}
    assert len(depths) >= 6


def _resolve(prompt: str, name: str) -> str:
    """Oracle: follow ``NAME = X`` assignments in the prompt from ``name`` until a number."""
    assignments = dict(re.findall(r"\b([A-Z]{4}) = ([A-Z]{4}|\d+)\.", prompt))
    seen = set()
    while not name.isdigit():
        assert name not in seen, "cyclic chain"
        seen.add(name)
        name = assignments[name]
    return name


@pytest.mark.parametrize("hops, distractors", [(1, 0), (2, 0), (2, 2)])
def test_var_tracking_chain_resolves_to_the_answer(hops, distractors):
    for index in range(5):
        rng = calibration_tasks.item_rng(SPLIT, "var_tracking", 2048, index, 0)
        item = eval_tasks.var_tracking(rng, lambda text: len(text) <= 3000, hops=hops, distractors=distractors)
        asked = re.search(r"What number is ([A-Z]{4}) equal to\?", item.prompt).group(1)
        assert _resolve(item.prompt, asked) == item.answer
        assert len(re.findall(r"\b[A-Z]{4} = ", item.prompt)) == (1 + distractors) * (hops + 1)
        # Every link comes after the name it copies: the chain reads forward.
        for name, previous in re.findall(r"\b([A-Z]{4}) = ([A-Z]{4})\.", item.prompt):
            assert item.prompt.find(f"{previous} = ") < item.prompt.find(f"{name} = {previous}")


def test_multi_doc_fact_sits_in_the_passage_asked_about(tokenizer):
    for index in range(6):
        item = make_eval_item(tokenizer, "multi_doc_qa", 2048, MAX_NEW, index, 0)
        title = re.search(r"the passage titled (\w+)\?", item.prompt).group(1)
        passages = re.findall(r"Passage \d+, titled (\w+):\n(.*?)\n\n", item.prompt, flags=re.S)
        assert len(passages) >= 3 and len({t for t, _ in passages}) == len(passages)
        holders = [t for t, text in passages if item.needle in text]
        assert holders == [title]


def test_unknown_task_and_too_short_length_are_refused(tokenizer):
    with pytest.raises(ValueError, match="unknown evaluation task"):
        make_eval_item(tokenizer, "kv_lines", 1024, MAX_NEW, 0, 0)
    for task in TASK_NAMES:
        with pytest.raises(ValueError, match="too short"):
            make_eval_item(tokenizer, task, 200, MAX_NEW, 0, 0)


# --- disjointness from calibration and validation ---------------------------------------------------------------

def _needle_of(prompt: str, answer: str) -> str:
    """The sentence or line of a calibration prompt that holds its answer."""
    at = prompt.find(answer)
    start = max(prompt.rfind(". ", 0, at) + 2, prompt.rfind("\n", 0, at) + 1, 0)
    ends = [e for e in (prompt.find(". ", at), prompt.find("\n", at)) if e >= 0]
    return prompt[start:min(ends) + 1 if ends else len(prompt)]


CALIBRATION_STEMS = ("REGISTER_CONTENT", "Memorize and track the chain", "VAR ", calibration_tasks.NOISE.strip(),
                     "Document [", "(Title:", "archive", "Answer with the year only")
EVAL_STEMS = (eval_tasks.PASSKEY_HEADER.strip(), eval_tasks.PASSKEY_NEEDLE.split("{")[0],
              eval_tasks.PASSKEY_QUESTION.strip(), eval_tasks.VAR_HEADER.split("{")[0],
              eval_tasks.VAR_QUESTION.strip().split("{")[0], eval_tasks.DOC_HEADER.strip(),
              eval_tasks.DOC_FACT.split("{")[0], eval_tasks.DOC_QUESTION.split("{")[0],
              *(sentence.strip() for sentence in eval_tasks.FILLER))


def test_eval_items_are_disjoint_from_calibration_and_validation(tokenizer):
    length, count, seed = 1024, 12, 0
    evaluation = [make_eval_item(tokenizer, task, length, MAX_NEW, index, seed)
                  for task in TASK_NAMES for index in range(count)]
    others = [make_item(tokenizer, task, length, MAX_NEW, split=split, index=index, seed=seed)
              for split in ("calibration", "validation") for task in sorted(calibration_tasks.TASKS)
              for index in range(count)]
    assert {item.prompt for item in evaluation}.isdisjoint(item.prompt for item in others)
    eval_keys = {(item.task, item.answer, item.needle) for item in evaluation}
    other_keys = {(item.task, item.answer, _needle_of(item.prompt, item.answer)) for item in others}
    assert eval_keys.isdisjoint(other_keys)
    # Different templates: no template sentence of one side appears in the other side's prompts.
    for item in evaluation:
        assert not [stem for stem in CALIBRATION_STEMS if stem in item.prompt], item.task
    for item in others:
        assert not [stem for stem in EVAL_STEMS if stem in item.prompt], item.task
    # The seed streams differ even for the shared task names.
    for task in ("var_tracking", "multi_doc_qa"):
        same = calibration_tasks.item_rng("calibration", task, length, 0, seed).random()
        assert eval_tasks.item_rng(SPLIT, task, length, 0, seed).random() != same


# --- scoring -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("response, answer, expected", [
    ("The pass key is 68342.", "68342", True),
    ("The pass key is 6 8 3 4 2.", "68342", True),      # digit-by-digit spelling
    ("6, 8, 3, 4, 2", "68342", True),
    ("6-8-3-4-2", "68342", True),
    ("It is 68,342!", "68342", True),                    # thousands separator
    ("The answer is: 68342", "68342", True),
    ("The answer is 100.\n\nThe value is 68342", "68342", True),
    ("The pass key is 683421.", "68342", False),         # inside a longer number
    ("The pass key is 168342.", "68342", False),
    ("The pass key is 1 6 8 3 4 2.", "68342", False),    # a longer number, spelt out
    ("The pass key is 68342.5", "68342", False),
    ("The pass key is 6834.", "68342", False),
    ("The pass key is 6834 2.", "68342", False),
    ("", "68342", False),                                # empty response
    ("The city is paris.", "Paris", True),
    ("Parisian", "Paris", False),
])
def test_is_correct(response, answer, expected):
    assert is_correct(response, answer) is expected


def test_is_correct_refuses_an_empty_answer():
    with pytest.raises(ValueError):
        is_correct("The pass key is 68342.", " ")


def test_normalize_answer_collapses_spelling_case_and_punctuation():
    assert normalize_answer("The pass key is 6 8 3 4 2.") == normalize_answer("the pass key is 68342") \
        == "the pass key is 68342"
    assert normalize_answer("It costs 3.5 units.") == "it costs 3.5 units"


def _wilson_by_formula(k: int, n: int, z: float) -> tuple[float, float]:
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return centre - half, centre + half


def test_wilson_interval_matches_the_formula():
    # 7 of 10 at 95%: z = 1.959963984540054 (the 97.5% normal quantile).
    low, high = wilson_interval(7, 10)
    expected = _wilson_by_formula(7, 10, 1.959963984540054)
    assert low == pytest.approx(expected[0], abs=1e-12) and high == pytest.approx(expected[1], abs=1e-12)
    assert (round(low, 4), round(high, 4)) == (0.3968, 0.8922)


@pytest.mark.parametrize("k, n, confidence", [(0, 8, 0.95), (8, 8, 0.95), (3, 8, 0.9), (37, 50, 0.99)])
def test_wilson_interval_matches_scipy(k, n, confidence):
    from scipy.stats import binomtest

    ci = binomtest(k, n).proportion_ci(confidence_level=confidence, method="wilson")
    assert wilson_interval(k, n, confidence) == pytest.approx((ci.low, ci.high), abs=1e-12)
    low, high = wilson_interval(k, n, confidence)
    assert 0.0 <= low <= k / n <= high <= 1.0


def test_wilson_interval_refuses_no_samples():
    with pytest.raises(ValueError):
        wilson_interval(0, 0)
    with pytest.raises(ValueError):
        wilson_interval(5, 4)


def _kl_brute_force(dense: torch.Tensor, sparse: torch.Tensor, mask: torch.Tensor) -> float:
    """Oracle: KL(p || q) token by token with plain floats."""
    total, count = 0.0, 0
    for row in range(dense.shape[0]):
        for t in range(dense.shape[1]):
            if not mask[row, t]:
                continue
            d, s = dense[row, t].tolist(), sparse[row, t].tolist()
            zd = sum(math.exp(x) for x in d)
            zs = sum(math.exp(x) for x in s)
            total += sum(math.exp(x) / zd * (math.log(math.exp(x) / zd) - math.log(math.exp(y) / zs))
                         for x, y in zip(d, s, strict=True))
            count += 1
    return total / count


def test_kl_matches_a_brute_force_computation():
    generator = torch.Generator().manual_seed(0)
    dense = torch.randn(2, 6, 9, generator=generator) * 3  # (B, T, V)
    sparse = dense + torch.randn(2, 6, 9, generator=generator)
    mask = torch.tensor([[0, 1, 1, 0, 1, 1], [1, 0, 0, 1, 1, 0]], dtype=torch.uint8)
    assert kl_from_dense(dense, sparse, mask) == pytest.approx(_kl_brute_force(dense, sparse, mask), rel=1e-9)
    # Masked-out positions do not count, however different they are.
    wild = sparse.clone()
    wild[mask == 0] = 100 * torch.randn(int((mask == 0).sum()), 9, generator=generator)
    assert kl_from_dense(dense, wild, mask) == pytest.approx(kl_from_dense(dense, sparse, mask), rel=1e-12)


def test_kl_is_zero_for_identical_logits_and_stable_for_large_ones():
    logits = torch.randn(3, 5, 11, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 200 + 1e4
    mask = torch.ones(3, 5)
    assert kl_from_dense(logits, logits.clone(), mask) == 0.0
    shifted = logits + 123.0  # softmax is shift-invariant: still the same distributions
    assert kl_from_dense(logits, shifted, mask) == pytest.approx(0.0, abs=1e-9)
    flipped = kl_from_dense(logits, logits.flip(-1), mask)
    assert math.isfinite(flipped) and flipped > 0


def test_kl_refuses_mismatched_shapes_and_empty_masks():
    logits = torch.zeros(4, 7)
    with pytest.raises(ValueError):
        kl_from_dense(logits, torch.zeros(4, 8), torch.ones(4))
    with pytest.raises(ValueError):
        kl_from_dense(logits, logits, torch.zeros(4))


def test_agreement_on_stated_answers_and_on_token_ids():
    dense = ["The pass key is 68342.", "The answer is 4516.", "NEFU = TIVO", "The answer is 81350.",
             "The catalogue number of the passage titled Cosami is 4344.", "The pass key is a small wooden key.",
             "It is 12 or 13."]
    sparse = ["the pass key is 6 8 3 4 2", "The answer is 4517.", "NEFU = TIVO.",
              "The number that is NEBA equal to is 81,350.", "The catalogue number of the passage titled Cosami is 43.",
              "The pass key is a pass key.", "It is 13 or 12."]
    # same: digits spelt out; the same words without numbers; one number in other words
    assert agreement(dense, sparse) == pytest.approx(3 / 7)
    assert [agreement([d], [s]) for d, s in zip(dense, sparse, strict=True)] == [1, 0, 1, 1, 0, 0, 0]
    assert agreement([[1, 2, 3], [4, 5]], [torch.tensor([1, 2, 3]), [4, 6]]) == 0.5
    with pytest.raises(ValueError):
        agreement(dense, sparse[:2])
    with pytest.raises(ValueError):
        agreement(["68342"], [[6, 8]])
    with pytest.raises(ValueError):
        agreement([], [])
