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


def test_a_small_space_still_gives_distinct_disjoint_splits(monkeypatch):
    """With two names and one object the arithmetic space is small enough that draws repeat: every split still
    has distinct prompts and no prompt is in two splits; asking for more than the space holds is refused."""
    monkeypatch.setattr(adapter_tasks, "FIRST_NAMES", ("Anna", "Ben"))
    monkeypatch.setattr(adapter_tasks, "OBJECTS", ("apples",))
    seen: dict[str, str] = {}
    for split in SPLITS:
        prompts = [e.prompt for e in make_examples("arithmetic", split, 200, 0)]
        assert len(set(prompts)) == len(prompts)
        for prompt in prompts:
            assert seen.setdefault(prompt, split) == split
    with pytest.raises(ValueError, match="could not draw"):
        make_examples("arithmetic", "train", 1000, 0)  # the space holds about 2,500


@pytest.mark.parametrize("task", TASKS)
def test_examples_are_deterministic_and_prefix_stable(splits, task):
    again = make_examples(task, "val", 20, 0)
    assert again == splits[task, "val"][:20]
    other_seed = make_examples(task, "val", 20, 1)
    assert len({e.prompt for e in other_seed} & {e.prompt for e in again}) <= 2


def test_arithmetic_answers_follow_from_the_prompt(splits):
    """Recompute each answer from the prompt's numbers: the two steps, then the whole-number result."""
    for example in splits["arithmetic", "train"] + splits["arithmetic", "test"]:
        question = example.prompt[:example.prompt.index(" Reply with")]
        a, b, c = (int(n) for n in re.findall(r"\b\d+\b", question))
        if " bags with " in question:
            first, sign, result = f"{a} * {b} = {a * b}", "-", a * b - c
        elif " gives away " in question:
            first, sign, result = f"{a} + {b} = {a + b}", "-", a + b - c
        else:
            first, sign, result = f"{a} + {b} = {a + b}", "+", a + b + c
        middle = first.rsplit(" ", 1)[1]
        assert example.answer == f"{first}, {middle} {sign} {c} = {result}", example
        assert result >= 0
        assert example.prompt.endswith(f"Reply with the steps only, like {adapter_tasks.ARITHMETIC_EXAMPLE}.")


def test_extraction_answers_follow_from_the_prompt(splits):
    for example in splits["extraction", "train"] + splits["extraction", "test"]:
        first, last = re.match(r"Record: (\w+) (\w+),", example.prompt).groups()
        assert example.answer == f"{last.upper()}, {first}", example


def test_long_context_answer_follows_the_asked_chain(splits):
    """Follow the assignments from the asked name back to a number (two chains: one asked, one distractor)."""
    for example in splits["long_context", "test"]:
        assignments = dict(re.findall(r"\b([A-Z]{4}) = (\w+)\.", example.prompt))
        assert len(assignments) == 6 and sum(v.isdigit() for v in assignments.values()) == 2
        name = re.search(r"What number is ([A-Z]{4}) equal to\?", example.prompt).group(1)
        hops = 0
        while not name.isdigit():
            name, hops = assignments[name], hops + 1
        assert name == example.answer and hops == 3
        assert adapter_tasks.LONG_CONTEXT_CHARS["test"] - 120 <= len(example.prompt) <= adapter_tasks.LONG_CONTEXT_CHARS["test"]


@pytest.mark.parametrize("split", SPLITS)
def test_long_context_length_defaults_per_split_and_is_configurable(split):
    default = adapter_tasks.LONG_CONTEXT_CHARS[split]
    assert all(default - 120 <= len(e.prompt) <= default for e in make_examples("long_context", split, 5, 0))
    longer = make_examples("long_context", split, 5, 0, long_context_chars=default + 500)
    assert all(default + 380 <= len(e.prompt) <= default + 500 for e in longer)


def test_streams_are_not_the_other_stages_streams(splits):
    """Own split names, and no planted assignment ("NAME = 12345.") shared with the evaluation stage's items."""
    from pipeline.evaluation.harness import PPL_SPLIT
    from pipeline.evaluation.tasks import SPLIT as EVALUATION
    from pipeline.stages.calibrate import SPLIT as CALIBRATION
    from pipeline.stages.validate import SPLIT as VALIDATION

    ours = {f"{adapter_tasks.STREAM}-{split}" for split in SPLITS}
    assert not ours & {EVALUATION, CALIBRATION, VALIDATION, PPL_SPLIT}
    needles = [make_eval_item(byte_tokenizer(), "var_tracking", 512, 16, index, 0).needle for index in range(20)]
    ours = [e.prompt for split in SPLITS for e in splits["long_context", split]]
    assert not [needle for needle in needles if any(needle in prompt for prompt in ours)]


@pytest.mark.parametrize(("response", "answer", "expected"), [
    ("12", "12", True),
    (" 12.\n", "12", True),
    ("1 2", "12", False),           # exact: digits spelt one by one are another answer
    ("1.2", "12", False),
    ("The answer is 12.", "12", False),
    ("12 apples", "12", False),
    ("120", "12", False),
    ("VARGA, Lena", "VARGA, Lena", True),
    ("Varga, Lena.", "VARGA, Lena", True),   # case and punctuation do not count
    ("Varga Lena", "VARGA, Lena", True),
    ("Lena Varga", "VARGA, Lena", False),
    ("VARGA, Lena Maria", "VARGA, Lena", False),
    ("", "12", False),
    ("4 + 2 = 6, 6 - 4 = 2", "4 + 2 = 6, 6 - 4 = 2", True),
    ("4+2=6,6-4=2", "4 + 2 = 6, 6 - 4 = 2", True),   # spacing does not count
    ("4 + 2 = 6, 6 - 4 = 3", "4 + 2 = 6, 6 - 4 = 2", False),
    ("2 + 4 = 6, 6 - 4 = 2", "4 + 2 = 6, 6 - 4 = 2", False),  # the steps in the order asked
    ("4 + 2 = 6, 6 + 4 = 2", "4 + 2 = 6, 6 - 4 = 2", False),  # signs count
    ("4 * 2 = 8", "4 * 2 = 8", True),
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
