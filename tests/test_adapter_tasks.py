"""Adapter tasks: deterministic, disjoint splits on their own seed streams, answers that follow from the prompt
(recomputed here by parsing it), and exact-match scoring after normalisation."""

from __future__ import annotations

import re

import pytest

from pipeline.adapters import tasks as adapter_tasks
from pipeline.adapters.tasks import SPLITS, TASKS, AdapterExample, is_correct, make_examples
from pipeline.evaluation.tasks import make_eval_item
from pipeline.models import byte_tokenizer

COUNTS = {"arithmetic": 300, "extraction": 300, "long_context": 120}


@pytest.fixture(scope="module")
def splits():
    return {(task, split): make_examples(task, split, COUNTS[task], 0) for task in TASKS for split in SPLITS}


@pytest.mark.parametrize("task", TASKS)
def test_splits_are_disjoint_and_distinct(splits, task):
    seen: dict[str, str] = {}
    for split in SPLITS:
        examples = splits[task, split]
        assert len(examples) == COUNTS[task]
        assert all(isinstance(e, AdapterExample) and e.task == task for e in examples)
        prompts = [e.prompt for e in examples]
        assert len(set(prompts)) == len(prompts), f"duplicate prompt within {task}/{split}"
        for prompt in prompts:
            assert seen.setdefault(prompt, split) == split, f"{task} prompt in {seen[prompt]} and {split}"


@pytest.mark.parametrize("task", TASKS)
def test_examples_are_deterministic_and_prefix_stable(splits, task):
    again = make_examples(task, "val", 20, 0)
    assert again == splits[task, "val"][:20]
    other_seed = make_examples(task, "val", 20, 1)
    assert len({e.prompt for e in other_seed} & {e.prompt for e in again}) <= 2


def test_arithmetic_answers_follow_from_the_prompt(splits):
    for example in splits["arithmetic", "train"] + splits["arithmetic", "test"]:
        numbers = [int(n) for n in re.findall(r"\b\d+\b", example.prompt)]
        if " bags with " in example.prompt:
            expected = numbers[0] * numbers[1] - numbers[2]
        elif " gives away " in example.prompt:
            expected = numbers[0] + numbers[1] - numbers[2]
        else:
            expected = sum(numbers)
        assert example.answer == str(expected) and expected >= 0, example
        assert example.prompt.endswith("Answer with the number only.")


def test_extraction_answers_follow_from_the_prompt(splits):
    for example in splits["extraction", "train"] + splits["extraction", "test"]:
        first, last = re.match(r"Record: (\w+) (\w+),", example.prompt).groups()
        assert example.answer == f"{last.upper()}, {first}", example


def test_long_context_answer_is_the_planted_pass_key(splits):
    for example in splits["long_context", "test"]:
        keys = set(re.findall(r"The pass key is (\d+)\.", example.prompt))
        assert keys == {example.answer}
        assert adapter_tasks.LONG_CONTEXT_CHARS - 120 <= len(example.prompt) <= adapter_tasks.LONG_CONTEXT_CHARS


def test_long_context_length_is_configurable():
    short = make_examples("long_context", "train", 3, 0, long_context_chars=600)
    assert all(len(e.prompt) <= 600 for e in short)
    assert [e.prompt for e in short] != [e.prompt for e in make_examples("long_context", "train", 3, 0)]


def test_streams_are_not_the_other_stages_streams(splits):
    """Own split names, and no pass key shared with the evaluation stage's items (which use "evaluation")."""
    from pipeline.evaluation.harness import PPL_SPLIT
    from pipeline.evaluation.tasks import SPLIT as EVALUATION
    from pipeline.stages.calibrate import SPLIT as CALIBRATION
    from pipeline.stages.validate import SPLIT as VALIDATION

    ours = {f"{adapter_tasks.STREAM}-{split}" for split in SPLITS}
    assert not ours & {EVALUATION, CALIBRATION, VALIDATION, PPL_SPLIT}
    evaluation = {make_eval_item(byte_tokenizer(), "passkey", 512, 16, index, 0).answer for index in range(20)}
    ours_keys = {e.answer for split in SPLITS for e in splits["long_context", split]}
    assert not evaluation & ours_keys


@pytest.mark.parametrize(("response", "answer", "expected"), [
    ("12", "12", True),
    (" 12.\n", "12", True),
    ("1 2", "12", True),            # digits spelt one by one
    ("The answer is 12.", "12", False),
    ("12 apples", "12", False),
    ("120", "12", False),
    ("VARGA, Lena", "VARGA, Lena", True),
    ("Varga, Lena.", "VARGA, Lena", True),   # case and punctuation do not count
    ("Varga Lena", "VARGA, Lena", True),
    ("Lena Varga", "VARGA, Lena", False),
    ("VARGA, Lena Maria", "VARGA, Lena", False),
    ("", "12", False),
])
def test_is_correct_is_exact_after_normalisation(response, answer, expected):
    assert is_correct(response, answer) is expected


def test_errors_are_value_errors():
    with pytest.raises(ValueError, match="unknown adapter task"):
        make_examples("poetry", "train", 1, 0)
    with pytest.raises(ValueError, match="unknown split"):
        make_examples("arithmetic", "validation", 1, 0)
    with pytest.raises(ValueError, match="n must be"):
        make_examples("arithmetic", "train", -1, 0)
    with pytest.raises(ValueError, match="empty gold answer"):
        is_correct("12", " ")
