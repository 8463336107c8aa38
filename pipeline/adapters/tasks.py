"""Procedurally generated downstream tasks for adapter training, scored by exact match after normalisation.

Three tasks, each asking for an answer in a fixed format that SmolLM2-135M-Instruct does not produce by itself
(it restates the question and answers in a sentence), so an adapter has a format to learn and some skill on top:

- ``arithmetic``: a two-operation word problem about named people and objects (add then subtract, multiply
  then subtract, or add three amounts; small whole numbers); the answer is the two steps in order,
  ``"4 + 2 = 6, 6 - 3 = 3"``, like the example in the prompt. Asked for the number alone, neither the base model
  nor a briefly trained LoRA (2/48) could compute it; written out step by step, a LoRA gets most right.
- ``extraction``: a one-line staff record (``Record: John Weber, 40, baker in Moscow, ID 5276.``); the answer
  is the name as ``LASTNAME, Firstname`` (``"WEBER, John"``).
- ``long_context``: the evaluation stage's ``var_tracking`` generator (:mod:`pipeline.evaluation.tasks`) with two
  hops and one distractor chain, sized by characters (``LONG_CONTEXT_CHARS``: about 400 SmolLM2 tokens for
  validation and test, 180 for training); the answer is the number only.

Splits: ``make_examples(task, split, n, seed)`` draws candidates from the stream
``item_rng(f"adapters-{split}", task, ...)`` (no other stage's split name: calibration, validation, evaluation and
evaluation-text use their own) and keeps a candidate only if a hash of its prompt assigns it to ``split`` and it
is new, so no prompt can be in two splits and no split repeats a prompt. ``is_correct`` compares the words,
numbers and arithmetic signs of the response and the answer, ignoring case, punctuation and spacing
(:func:`pipeline.evaluation.scoring.normalize_answer` does not fit: it joins ``"5 - 3"`` into ``"53"`` and drops
the signs).

Measured on 2 shared CPU cores (load 1-2 from other jobs) with SmolLM2-135M-Instruct, greedy decoding of at most
24 new tokens, 48 test items per task, and a peft LoRA (r=8, alpha=16, dropout 0.05 on q_proj and v_proj) as the
stand-in adapter, AdamW with cosine schedule (:func:`pipeline.adapters.training.train`):

============  ========  =====  ========================  ============  ====================
task          prompt    base   LoRA, one task, 30 steps  s/step at 8   eval of 48 (base /
              tokens                                                   trained), s
============  ========  =====  ========================  ============  ====================
arithmetic    85-87     0/48   38/48                     2.44          17.5 / 15.9
extraction    64        0/48   42/48                     1.56          11.6 / 5.7
long_context  400-411   0/48   26/48                     10.40         36.0 / 29.7
============  ========  =====  ========================  ============  ====================

(one task: 96 training items, batch 8, lr 2e-3, long_context trained at 1536 characters). One LoRA on all three
tasks mixed, as a search trial trains it: 64 training items per task (long_context at 512 characters), 24 steps
of batch 4, lr 5e-3: 1.61 s/step, 38.7 s; validation on 8 items per task 11.7 s (eval batch 16); test 24/48,
35/48 and 24/48 (20 steps at lr 4e-3: 31.3 s, 7/48, 36/48, 22/48). The base model's exact-match accuracy is
0 on every task: it never answers in a bare format, also not with a terse system prompt or an example format in
the prompt (tried). Scored leniently (the answer anywhere in its response; for arithmetic the final number) it
gets 4/48, 0/48 and 26/48: it does find the long-context number about half the time, so there a trained adapter
mostly learns the format, while the arithmetic and the upper-cased surname are skills it learns.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass

from pipeline.calibration.tasks import item_rng
from pipeline.evaluation import tasks as eval_tasks

TASKS = ("arithmetic", "extraction", "long_context")
SPLITS = ("train", "val", "test")
STREAM = "adapters"
"""Seed streams are ``item_rng(f"{STREAM}-{split}", task, ...)``: no other stage uses a split name starting so."""
ARITHMETIC_EXAMPLE = "2 + 3 = 5, 5 - 1 = 4"
LONG_CONTEXT_CHARS = {"train": 512, "val": 1536, "test": 1536}
"""Default character budget of a ``long_context`` user message per split (sized by characters, so items do not
depend on the tokenizer). With SmolLM2's chat template 1536 characters are 400-411 tokens and 512 are 178-189:
training items are shorter because a 400-token example costs as much to train on as six short ones."""
MAX_DRAWS = 50
"""Candidates drawn per returned example at most before giving up (rejections: other splits, duplicates)."""

# Every word below is a single SmolLM2 token after a space, so most prompts of a template have the same token
# length and batch together without padding (pipeline.adapters.inference buckets by length).
FIRST_NAMES = ("Anna", "Ben", "Carl", "Dana", "Eva", "Finn", "Hugo", "Jack", "Kate", "Leo", "Mia", "Nina", "Omar",
               "Paul", "Rosa", "Sam", "Tara", "Vera", "Will", "Max", "Ivy", "Noah", "Ruby", "Emma", "Lucy", "Mark",
               "Alex", "Sara", "John", "Mary", "Adam", "Ella", "Tom", "Jane", "Luke", "Amy", "Ryan", "Lily", "Owen",
               "Kim", "Rose", "Anne", "Eric", "Lisa", "Hans", "Nick", "Sean")
LAST_NAMES = ("Smith", "Berg", "Costa", "Dunn", "Engel", "Fischer", "Garcia", "Hart", "Jensen", "Keller", "Lopez",
              "Price", "Quinn", "Silva", "Weber", "Young", "Blake", "Cruz", "Marsh", "Park", "Stone", "Wolf", "Brown",
              "Green", "Hill", "Ward", "Ford", "Bell", "Cole", "Reed", "Fox", "Gray", "Long", "Moore", "Hayes",
              "Lane", "Ross", "Shaw", "King", "Wood", "Hall", "Baker", "Moss", "Lee")
CITIES = ("Oslo", "Lima", "Rome", "Paris", "Cairo", "Dublin", "Madrid", "Vienna", "Prague", "Boston", "Denver",
          "Lisbon", "Munich", "Warsaw", "Athens", "Geneva", "London", "Berlin", "Tokyo", "Sydney", "Chicago",
          "Toronto", "Moscow")
OBJECTS = ("apples", "books", "coins", "pens", "stamps", "marbles", "cards", "eggs", "shells", "stickers",
           "candles", "cookies", "cups", "toys", "keys", "hats")
JOBS = ("nurse", "pilot", "teacher", "baker", "chemist", "lawyer", "painter", "farmer", "editor", "dentist", "doctor",
        "driver", "writer", "cook")


@dataclass(frozen=True)
class AdapterExample:
    task: str
    prompt: str
    answer: str


def _arithmetic(rng: random.Random) -> AdapterExample:
    a, b = rng.sample(FIRST_NAMES, 2)
    obj = rng.choice(OBJECTS)
    kind = rng.randrange(3)
    if kind == 0:
        x, y = rng.randint(2, 9), rng.randint(2, 9)
        z = rng.randint(1, min(9, x + y - 1))
        text = f"Puzzle: {a} has {x} {obj}. {b} gives {a} {y} more, then {a} gives away {z}. How many {obj} does {a} have now?"
        steps = f"{x} + {y} = {x + y}, {x + y} - {z} = {x + y - z}"
    elif kind == 1:
        k, m = rng.randint(2, 5), rng.randint(2, 5)
        z = rng.randint(1, min(9, k * m - 1))
        text = f"Puzzle: {a} buys {k} bags with {m} {obj} in each, then gives {z} {obj} to {b}. How many {obj} does {a} keep?"
        steps = f"{k} * {m} = {k * m}, {k * m} - {z} = {k * m - z}"
    else:
        x, y, z = rng.randint(2, 9), rng.randint(2, 9), rng.randint(2, 9)
        text = f"Puzzle: {a} has {x} {obj}, {b} has {y} and their friend has {z}. How many {obj} do they have in total?"
        steps = f"{x} + {y} = {x + y}, {x + y} + {z} = {x + y + z}"
    return AdapterExample("arithmetic", f"{text} Reply with the steps only, like {ARITHMETIC_EXAMPLE}.", steps)


def _extraction(rng: random.Random) -> AdapterExample:
    first, last = rng.choice(FIRST_NAMES), rng.choice(LAST_NAMES)
    city, job = rng.choice(CITIES), rng.choice(JOBS)
    age, code = rng.randint(21, 69), rng.randint(1000, 9999)
    text = (f"Record: {first} {last}, {age}, {job} in {city}, ID {code}.\n"
            "Write the person's name as LASTNAME, Firstname.")
    return AdapterExample("extraction", text, f"{last.upper()}, {first}")


def _long_context(rng: random.Random, chars: int) -> AdapterExample:
    item = eval_tasks.var_tracking(rng, lambda text: len(text) <= chars, hops=2, distractors=1)
    return AdapterExample("long_context", item.prompt, item.answer)


def _split_of(prompt: str) -> str:
    """The one split a prompt may belong to: a hash of its text, so no prompt can ever be in two splits."""
    return SPLITS[int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:8], "big") % len(SPLITS)]


def make_examples(task: str, split: str, n: int, seed: int, *,
                  long_context_chars: int | None = None) -> list[AdapterExample]:
    """``n`` distinct examples of ``task`` for ``split``, deterministic in ``seed``; the first ``k`` of ``n``
    are the ``k`` examples of a smaller call. ``long_context_chars`` overrides the split's
    ``LONG_CONTEXT_CHARS``."""
    if task not in TASKS:
        raise ValueError(f"unknown adapter task {task!r}; expected one of {', '.join(TASKS)}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    chars = LONG_CONTEXT_CHARS[split] if long_context_chars is None else int(long_context_chars)
    examples: list[AdapterExample] = []
    seen: set[str] = set()
    index = 0
    while len(examples) < n:
        if index >= MAX_DRAWS * (n + 1):
            raise ValueError(f"could not draw {n} distinct {task} examples for split {split!r}")
        rng = item_rng(f"{STREAM}-{split}", task, chars if task == "long_context" else 0, index, seed)
        index += 1
        if task == "arithmetic":
            example = _arithmetic(rng)
        elif task == "extraction":
            example = _extraction(rng)
        else:
            example = _long_context(rng, chars)
        if _split_of(example.prompt) == split and example.prompt not in seen:
            seen.add(example.prompt)
            examples.append(example)
    return examples


def normalize(text: str) -> list[str]:
    """Words, numbers and arithmetic signs of ``text``, lower-cased: case, punctuation and spacing do not count."""
    return re.findall(r"\w+|[-+*/=]", text.lower())


def is_correct(response: str, answer: str) -> bool:
    """Exact match after normalisation (:func:`normalize`)."""
    if not normalize(answer):
        raise ValueError(f"empty gold answer {answer!r}")
    return normalize(response) == normalize(answer)
