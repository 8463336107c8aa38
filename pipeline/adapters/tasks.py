"""Procedurally generated downstream tasks for adapter training, scored by exact match.

DRAFT
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
LONG_CONTEXT_CHARS = 1600
"""Character budget of a ``long_context`` user message (sized by characters, so items do not depend on the
tokenizer): about 400 SmolLM2 tokens with the chat template."""
MAX_DRAWS = 50
"""Candidates drawn per returned example at most before giving up (rejections: other splits, duplicates)."""

FIRST_NAMES = ("Anna", "Ben", "Carl", "Dana", "Eva", "Finn", "Gina", "Hugo", "Ida", "Jack", "Kate", "Leo", "Mia",
               "Nina", "Omar", "Paul", "Rosa", "Sam", "Tara", "Uma", "Vera", "Will", "Zoe", "Lena", "Max", "Ivy",
               "Noah", "Ruby", "Theo", "Emma", "Liam", "Olga")
LAST_NAMES = ("Varga", "Smith", "Novak", "Berg", "Costa", "Dunn", "Engel", "Fischer", "Garcia", "Hart", "Ivanov",
              "Jensen", "Keller", "Lopez", "Moreau", "Nagy", "Olsen", "Price", "Quinn", "Rossi", "Silva", "Tanaka",
              "Weber", "Young", "Blake", "Cruz", "Holm", "Marsh", "Park", "Stone", "Wolf", "Reyes")
CITIES = ("Oslo", "Lima", "Rome", "Paris", "Cairo", "Dublin", "Madrid", "Vienna", "Prague", "Boston", "Denver",
          "Lisbon", "Munich", "Warsaw", "Athens", "Geneva")
OBJECTS = ("apples", "books", "coins", "pens", "stamps", "marbles", "cards", "eggs", "shells", "stickers",
           "candles", "cookies")
JOBS = ("nurse", "pilot", "teacher", "baker", "chemist", "lawyer", "painter", "farmer", "editor", "dentist")


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
        z = rng.randint(1, x + y - 1)
        text = f"{a} has {x} {obj}. {b} gives {a} {y} more, then {a} gives away {z}. How many {obj} does {a} have now?"
        working = f"{x} + {y} = {x + y}, {x + y} - {z} = {x + y - z}"
    elif kind == 1:
        k, m = rng.randint(2, 5), rng.randint(2, 5)
        z = rng.randint(1, k * m - 1)
        text = f"{a} buys {k} bags with {m} {obj} in each, then gives {z} {obj} to {b}. How many {obj} does {a} keep?"
        working = f"{k} * {m} = {k * m}, {k * m} - {z} = {k * m - z}"
    else:
        x, y, z = rng.randint(2, 9), rng.randint(2, 9), rng.randint(2, 9)
        text = f"{a} has {x} {obj}, {b} has {y} and their friend has {z}. How many {obj} do they have in total?"
        working = f"{x} + {y} = {x + y}, {x + y} + {z} = {x + y + z}"
    return AdapterExample("arithmetic", text + " Reply with the steps only, like 2 + 3 = 5, 5 - 1 = 4.", working)


def _extraction(rng: random.Random) -> AdapterExample:
    first, last = rng.choice(FIRST_NAMES), rng.choice(LAST_NAMES)
    city, job = rng.choice(CITIES), rng.choice(JOBS)
    age, code = rng.randint(21, 69), rng.randint(1000, 9999)
    text = (f"Record: {first} {last}, {age}, {job} in {city}, ID {code}.\n"
            "Write the person's name as LASTNAME, Firstname.")
    return AdapterExample("extraction", text, f"{last.upper()}, {first}")


def _long_context(rng: random.Random, chars: int) -> AdapterExample:
    item = eval_tasks.passkey(rng, lambda text: len(text) <= chars)
    return AdapterExample("long_context", item.prompt, item.answer)


def _split_of(prompt: str) -> str:
    """The one split a prompt may belong to: a hash of its text, so no prompt can ever be in two splits."""
    return SPLITS[int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:8], "big") % len(SPLITS)]


def make_examples(task: str, split: str, n: int, seed: int, *,
                  long_context_chars: int = LONG_CONTEXT_CHARS) -> list[AdapterExample]:
    """``n`` distinct examples of ``task`` for ``split``, deterministic in ``seed``; the first ``k`` of ``n``
    are the ``k`` examples of a smaller call."""
    if task not in TASKS:
        raise ValueError(f"unknown adapter task {task!r}; expected one of {', '.join(TASKS)}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    examples: list[AdapterExample] = []
    seen: set[str] = set()
    index = 0
    while len(examples) < n:
        if index >= MAX_DRAWS * (n + 1):
            raise ValueError(f"could not draw {n} distinct {task} examples for split {split!r}")
        rng = item_rng(f"{STREAM}-{split}", task, long_context_chars if task == "long_context" else 0, index, seed)
        index += 1
        if task == "arithmetic":
            example = _arithmetic(rng)
        elif task == "extraction":
            example = _extraction(rng)
        else:
            example = _long_context(rng, long_context_chars)
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
