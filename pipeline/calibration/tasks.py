"""Procedural long-context tasks whose answer depends on information far back in the context.

Each task builds a ``TaskItem`` (a user message and its gold answer) from a seeded RNG and a budget in tokens.
The same generators serve calibration and evaluation; the two use disjoint seed namespaces (``split``), so
no evaluation item ever appears in calibration.

- ``kv_lines``: LongEval-style numbered lines ``line <name>: REGISTER_CONTENT is <n>``; ask for one line's value.
- ``var_tracking``: RULER-style multi-hop variable chains hidden in repetitive noise; ask for a variable's value.
- ``multi_doc_qa``: titled documents of natural English prose (Python's bundled reference topics), one of which
  states a planted fact; ask for that fact by document title.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

SYLLABLES = ("ka", "lo", "mi", "ne", "ru", "sa", "ti", "vo", "ze", "po", "da", "fu", "gi", "ha", "je", "ba", "co", "wy")
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "


@dataclass(frozen=True)
class TaskItem:
    task: str
    prompt: str
    answer: str


def item_rng(split: str, task: str, length: int, index: int, seed: int) -> random.Random:
    """A deterministic RNG per (split, task, length, index, seed); splits never share a stream."""
    key = f"{split}/{task}/{length}/{index}/{seed}".encode()
    return random.Random(int.from_bytes(hashlib.sha256(key).digest()[:8], "big"))


def _word(rng: random.Random, syllables: int = 3) -> str:
    return "".join(rng.choice(SYLLABLES) for _ in range(syllables))


def _fill(units: Callable[[int], str], budget: Callable[[str], bool]) -> list[str]:
    """Append ``units(i)`` while the joined text still fits ``budget``; returns the accepted units."""
    accepted: list[str] = []
    i = 0
    while True:
        candidate = units(i)
        if not budget("".join(accepted) + candidate):
            return accepted
        accepted.append(candidate)
        i += 1


def kv_lines(rng: random.Random, fits: Callable[[str], bool]) -> TaskItem:
    names: list[str] = []
    values: list[int] = []

    def line(i: int) -> str:
        while len(names) <= i:
            names.append(f"{_word(rng, 2)}-{_word(rng, 2)}")
            values.append(rng.randrange(10000, 99999))
        return f"line {names[i]}: REGISTER_CONTENT is <{values[i]}>\n"

    header = "Below is a record of lines I want you to remember. Each line begins with 'line <name>' and contains a REGISTER_CONTENT. At the end you will be asked for one line's REGISTER_CONTENT.\n\n"
    question_for = "\nNow the record is over. Tell me: what is the REGISTER_CONTENT in line {name}? Answer with the number only."
    probe = "\nNow the record is over. Tell me: what is the REGISTER_CONTENT in line xxxxx-xxxxx? Answer with the number only."
    lines = _fill(line, lambda body: fits(header + body + probe))
    if not lines:
        raise ValueError("length too short for kv_lines")
    target = rng.randrange(len(lines))
    prompt = header + "".join(lines) + question_for.format(name=names[target])
    return TaskItem("kv_lines", prompt, str(values[target]))


def var_tracking(rng: random.Random, fits: Callable[[str], bool], hops: int = 3) -> TaskItem:
    chain = [_word(rng, 2).upper() for _ in range(hops + 1)]
    value = rng.randrange(10000, 99999)
    statements = [f"VAR {chain[0]} = {value}. "] + [f"VAR {chain[i]} = VAR {chain[i - 1]}. " for i in range(1, hops + 1)]
    header = "Memorize and track the chain of variable assignments hidden in the following text.\n\n"
    question = f"\n\nQuestion: what is the numeric value of VAR {chain[-1]}? Follow the chain of assignments. Answer with the number only."
    noise_units = _fill(lambda i: NOISE, lambda body: fits(header + body + "".join(statements) + question))
    # Spread the chain over the context: the first assignment early, the last one late.
    slots = sorted(rng.sample(range(len(noise_units) + 1), k=min(len(statements), len(noise_units) + 1)))
    while len(slots) < len(statements):
        slots.append(slots[-1])
    body: list[str] = []
    next_statement = 0
    for i in range(len(noise_units) + 1):
        while next_statement < len(statements) and slots[next_statement] == i:
            body.append(statements[next_statement])
            next_statement += 1
        if i < len(noise_units):
            body.append(noise_units[i])
    return TaskItem("var_tracking", header + "".join(body) + question, str(value))


def hidden_number(rng: random.Random, fits: Callable[[str], bool]) -> TaskItem:
    """One number stated once at a random depth in repetitive noise, asked for at the end: single-needle retrieval
    across filler, which the dense model answers, so the profile sees the heads that fetch it."""
    value = rng.randrange(10000, 99999)
    header = "Somewhere in the noise below there is a secret number. Find it and keep it in mind.\n\n"
    fact = f"Note: the secret number is {value}. "
    question = "\n\nQuestion: what is the secret number? Answer with the number only."
    noise_units = _fill(lambda i: NOISE, lambda body: fits(header + body + fact + question))
    if not noise_units:
        raise ValueError("length too short for hidden_number")
    slot = rng.randrange(int(0.8 * len(noise_units)) + 1)  # in the first 80%: never next to the question
    body = "".join(noise_units[:slot]) + fact + "".join(noise_units[slot:])
    return TaskItem("hidden_number", header + body + question, str(value))


@lru_cache(maxsize=1)
def _prose_paragraphs() -> tuple[str, ...]:
    """Natural English paragraphs from the Python reference topics bundled with the interpreter (offline)."""
    from pydoc_data.topics import topics

    paragraphs = []
    for text in topics.values():
        for block in text.split("\n\n"):
            flat = " ".join(block.split())
            if len(flat.split()) >= 30 and flat[0].isupper() and flat.endswith(".") and ">>>" not in flat and "::" not in flat:
                paragraphs.append(_leading_sentences(flat, max_words=60))
    return tuple(paragraphs)


def _leading_sentences(text: str, max_words: int) -> str:
    """The first sentences of ``text`` totalling at most ``max_words`` words (at least one sentence)."""
    sentences = [s if s.endswith(".") else s + "." for s in text.split(". ")]
    kept, words = [], 0
    for sentence in sentences:
        count = len(sentence.split())
        if kept and words + count > max_words:
            break
        kept.append(sentence)
        words += count
    return " ".join(kept)


def multi_doc_qa(rng: random.Random, fits: Callable[[str], bool]) -> TaskItem:
    paragraphs = _prose_paragraphs()
    titles: list[str] = []
    order = rng.sample(range(len(paragraphs)), k=min(400, len(paragraphs)))

    def document(i: int) -> str:
        while len(titles) <= i:
            titles.append(_word(rng, 3).capitalize())
        return f"Document [{i + 1}] (Title: {titles[i]}) {paragraphs[order[i % len(order)]]}\n\n"

    city = _word(rng, 3).capitalize()
    year = rng.randrange(1700, 1999)
    header = "Read the documents below. One of them mentions where and when its archive was founded.\n\n"
    fact = f"The archive of this document was founded in the city of {city} in the year {year}. "
    question_for = "Question: according to the document titled {title}, in which year was its archive founded? Answer with the year only."
    probe = question_for.format(title="Xxxxxxxxx")
    docs = _fill(document, lambda body: fits(header + body + fact + probe))
    if not docs:
        raise ValueError("length too short for multi_doc_qa")
    target = rng.randrange(len(docs))
    prefix = f"Document [{target + 1}] (Title: {titles[target]}) "
    docs[target] = prefix + fact + docs[target][len(prefix):]
    prompt = header + "".join(docs) + question_for.format(title=titles[target])
    return TaskItem("multi_doc_qa", prompt, str(year))


TASKS: dict[str, Callable[[random.Random, Callable[[str], bool]], TaskItem]] = {
    "kv_lines": kv_lines,
    "var_tracking": var_tracking,
    "multi_doc_qa": multi_doc_qa,
    "hidden_number": hidden_number,
}
