"""Procedural long-context evaluation tasks, with their own templates and seed namespace.

Calibration (``pipeline.calibration.tasks``) builds hard items on which the model is mostly wrong; that suits
profiling but not accuracy. The tasks here are worded so that the dense embedded model (SmolLM2-135M-Instruct)
answers most of them at short context, so that a sparse plan's accuracy loss is measurable:

- ``passkey``: a pass-key sentence hidden at a random depth in repetitive filler; ask for the pass key.
- ``var_tracking``: RULER-style chains of assignments (``NAME = 12345``, then ``OTHER = NAME``; ``hops`` links, 2
  by default) hidden in the filler; the header names the asked variable up front and the question asks for it at
  the end. ``distractors`` adds chains of the same shape (0 by default: with one distractor chain dense SmolLM2 is
  at chance, 3-4 of 8 at 1k tokens).
- ``multi_doc_qa``: titled passages of natural English prose, one of which carries a planted catalogue number;
  ask for it by the passage's title.

Items come from ``item_rng(split, task, length, index, seed)`` with ``split="evaluation"``, a seed stream that
calibration (``"calibration"``) and validation (``"validation"``) never use, and every template sentence differs
from calibration's. Each item is an ``EvalItem``: a calibration ``TaskItem`` (``task, prompt, answer``) plus the
``needle``, the exact sentence of the prompt that holds the answer. The needle is placed in the first 80% of the
context, so the answer always lies well before the question.

Measured with dense SmolLM2-135M-Instruct (greedy, chat template, 48 new tokens, 10 items per cell): every task
scores 10/10 at 512 and 1024 tokens; at 2048, passkey 4/10, var_tracking 9/10, multi_doc_qa 10/10.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from pipeline.calibration.builder import chat_ids
from pipeline.calibration.tasks import TaskItem, _fill, _prose_paragraphs, _word, item_rng

SPLIT = "evaluation"

FILLER = (
    "The river runs slowly toward the sea. ",
    "Tall trees stand quietly on the hill. ",
    "A soft wind moves across the field. ",
    "The road goes on and on. ",
    "Clouds pass over the old stone wall. ",
)
RETRY_TIGHTER = (1, 2, 4, 8, 16, 32, 64)
"""How many tokens tighter each redraw sizes the text, when a finished prompt overshoots its budget."""
MAX_DEPTH = 0.8
"""The needle goes at a depth drawn uniformly from [0, MAX_DEPTH] of the filler (0 = start of the context)."""

PASSKEY_HEADER = ("There is a pass key hidden inside a lot of irrelevant text. Find the pass key and remember it. "
                  "I will ask you for the pass key at the end.\n\n")
PASSKEY_NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key. "
PASSKEY_QUESTION = "\n\nWhat is the pass key? Answer with the pass key only."

VAR_HEADER = ("Below, some names are set equal to numbers or to other names. "
              "I will ask you what number {name} is equal to.\n\n")
VAR_FIRST = "{name} = {value}. "
VAR_LINK = "{name} = {previous}. "
VAR_QUESTION = "\n\nWhat number is {name} equal to? Answer with the number only."

DOC_HEADER = ("Below are passages, each with a title. One passage has a catalogue number. "
              "Read them carefully; I will ask you about one of them at the end.\n\n")
DOC_ENTRY = "Passage {number}, titled {title}:\n{text}\n\n"
DOC_FACT = "This passage has the catalogue number {code}. "
DOC_QUESTION = "What is the catalogue number of the passage titled {title}? Answer with the number only."


@dataclass(frozen=True)
class EvalItem(TaskItem):
    """A task item and its needle: the sentence of ``prompt`` that holds ``answer``."""

    needle: str = ""


def _depth_slot(rng: random.Random, units: int) -> int:
    """Where the needle goes among ``units`` filler units: a slot in the first ``MAX_DEPTH`` of them."""
    return rng.randrange(int(units * MAX_DEPTH) + 1)


def _filler(i: int) -> str:
    return FILLER[i % len(FILLER)]


def passkey(rng: random.Random, fits: Callable[[str], bool]) -> EvalItem:
    key = rng.randrange(10000, 100000)
    needle = PASSKEY_NEEDLE.format(key=key)
    units = _fill(_filler, lambda body: fits(PASSKEY_HEADER + body + needle + PASSKEY_QUESTION))
    if not units:
        raise ValueError("length too short for passkey")
    slot = _depth_slot(rng, len(units))
    body = "".join(units[:slot]) + needle + "".join(units[slot:])
    return EvalItem("passkey", PASSKEY_HEADER + body + PASSKEY_QUESTION, str(key), needle)


def var_tracking(rng: random.Random, fits: Callable[[str], bool], hops: int = 2, distractors: int = 0) -> EvalItem:
    """``hops`` links from a number to the asked name, plus ``distractors`` chains of the same shape."""
    chains = 1 + distractors
    names: list[str] = []
    while len(names) < chains * (hops + 1):
        name = _word(rng, 2).upper()
        if name not in names:
            names.append(name)
    values: list[int] = []
    while len(values) < chains:
        value = rng.randrange(10000, 100000)
        if value not in values:
            values.append(value)
    statements = []  # one list per chain; chain 0 is asked about
    for c in range(chains):
        chain = names[c * (hops + 1):(c + 1) * (hops + 1)]
        statements.append([VAR_FIRST.format(name=chain[0], value=values[c])]
                          + [VAR_LINK.format(name=chain[i], previous=chain[i - 1]) for i in range(1, hops + 1)])
    target = names[hops]
    header, question = VAR_HEADER.format(name=target), VAR_QUESTION.format(name=target)
    everything = "".join(s for chain in statements for s in chain)
    units = _fill(_filler, lambda body: fits(header + body + everything + question))
    if not units:
        raise ValueError("length too short for var_tracking")
    # Each chain's number early (within MAX_DEPTH), its links at later slots: every chain reads forward.
    placed = []  # (slot, chain, position, statement)
    for c, chain in enumerate(statements):
        first = _depth_slot(rng, len(units))
        slots = [first] + sorted(rng.randint(first, len(units)) for _ in range(hops))
        placed += [(slot, c, k, statement) for k, (slot, statement) in enumerate(zip(slots, chain, strict=True))]
    placed.sort()
    body: list[str] = []
    for i in range(len(units) + 1):
        body.extend(statement for slot, _, _, statement in placed if slot == i)
        if i < len(units):
            body.append(units[i])
    return EvalItem("var_tracking", header + "".join(body) + question, str(values[0]), statements[0][0])


def multi_doc_qa(rng: random.Random, fits: Callable[[str], bool]) -> EvalItem:
    paragraphs = _prose_paragraphs()
    order = rng.sample(range(len(paragraphs)), k=min(400, len(paragraphs)))
    titles: list[str] = []
    code = rng.randrange(1000, 10000)
    fact = DOC_FACT.format(code=code)

    def title(i: int) -> str:
        while len(titles) <= i:
            candidate = _word(rng, 3).capitalize()
            if candidate not in titles:
                titles.append(candidate)
        return titles[i]

    def entry(i: int, text: str) -> str:
        return DOC_ENTRY.format(number=i + 1, title=title(i), text=text)

    probe = DOC_QUESTION.format(title="Xxxxxxxxx")
    docs = _fill(lambda i: entry(i, paragraphs[order[i % len(order)]]),
                 lambda body: fits(DOC_HEADER + body + fact + probe))
    # Top up with the leading words of one more passage, so the prompt ends close to the budget.
    words = paragraphs[order[len(docs) % len(order)]].split()
    for count in range(len(words) - 1, 0, -1):
        partial = entry(len(docs), " ".join(words[:count]).rstrip(".,;:") + ".")
        if fits(DOC_HEADER + "".join(docs) + partial + fact + probe):
            docs.append(partial)
            break
    if not docs:
        raise ValueError("length too short for multi_doc_qa")
    target = _depth_slot(rng, len(docs) - 1) if len(docs) > 1 else 0
    head = DOC_ENTRY.format(number=target + 1, title=titles[target], text="")[:-2]
    docs[target] = head + fact + docs[target][len(head):]
    prompt = DOC_HEADER + "".join(docs) + DOC_QUESTION.format(title=titles[target])
    return EvalItem("multi_doc_qa", prompt, str(code), fact)


TASKS: dict[str, Callable[[random.Random, Callable[[str], bool]], EvalItem]] = {
    "passkey": passkey,
    "var_tracking": var_tracking,
    "multi_doc_qa": multi_doc_qa,
}


def make_eval_item(tokenizer, task: str, length: int, max_new_tokens: int, index: int, seed: int, *,
                   split: str = SPLIT) -> EvalItem:
    """One evaluation item whose chat-formatted prompt fits in ``length - max_new_tokens`` tokens, close to it.

    The generators size their text against the budget before placing the needle; where a subword tokenizer
    merges differently around the needle and the finished prompt overshoots by a token or two, the item is
    drawn again from the same seed against a budget ``RETRY_TIGHTER`` tokens tighter, so every prompt fits.
    Raises ValueError for an unknown task or a length too short for it."""
    if task not in TASKS:
        raise ValueError(f"unknown evaluation task {task!r}; known: {sorted(TASKS)}")
    budget = length - max_new_tokens
    count = lambda text: len(chat_ids(tokenizer, text))  # noqa: E731
    for tighter in (0, *RETRY_TIGHTER):
        rng = item_rng(split, task, length, index, seed)
        item = TASKS[task](rng, lambda text, limit=budget - tighter: count(text) <= limit)
        if count(item.prompt) <= budget:
            return item
    raise ValueError(f"could not fit a {task} item in {budget} tokens")
