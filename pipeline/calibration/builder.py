"""Turn task items into token samples of an exact length, answered greedily by the model itself.

A sample of length ``N`` is ``prompt | response | padding``: the chat-formatted prompt fills at most
``N - max_new_tokens`` tokens, the response is the model's greedy continuation (up to and including its end
token), and the tail is padded to exactly ``N``. The loss mask is non-zero on the response tokens only: 2
(``ANSWER``) on the tokens that state the gold answer and the one before them (:func:`answer_positions`), 1
(``RESPONSE``) on the others. Padding comes after everything it could influence, so it changes no loss and no
attention of earlier positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.calibration.tasks import TASKS, TaskItem, item_rng
from pipeline.evaluation.response_loss import ANSWER, RESPONSE


@dataclass
class Sample:
    item: TaskItem
    prompt_ids: list[int]
    response_ids: list[int]
    response_text: str
    answer_positions: tuple[int, ...] = ()
    """Indices into ``response_ids`` of the answer tokens (:func:`answer_positions`)."""

    @property
    def correct(self) -> bool:
        return self.item.answer in _without_separators(self.response_text)[0]


def _without_separators(text: str) -> tuple[str, list[int]]:
    """``text`` without commas and spaces (how answers are matched), and each kept character's index in ``text``."""
    kept = [i for i, ch in enumerate(text) if ch not in ", "]
    return "".join(text[i] for i in kept), kept


def answer_positions(tokenizer, response_ids: list[int], answer: str) -> tuple[int, ...]:
    """The response tokens that state ``answer`` (every occurrence, matched as :attr:`Sample.correct` matches it)
    and, before each occurrence, the token where the model commits to stating it: for ``The number is 25252``,
    the space before the digits and the five digit tokens. Empty when the response does not contain the answer."""
    if not answer:
        return ()
    # Character offsets of each token in the decoded response: token i covers [ends[i - 1], ends[i]).
    ends = [len(tokenizer.decode(response_ids[: i + 1], skip_special_tokens=True)) for i in range(len(response_ids))]
    text = tokenizer.decode(response_ids, skip_special_tokens=True)
    squeezed, index = _without_separators(text)
    positions: set[int] = set()
    start = squeezed.find(answer)
    while start >= 0:
        first_char, last_char = index[start], index[start + len(answer) - 1]
        tokens = [i for i in range(len(response_ids))
                  if (ends[i - 1] if i else 0) <= last_char and ends[i] > first_char]
        positions.update(tokens)
        if tokens and tokens[0] > 0:
            positions.add(tokens[0] - 1)
        start = squeezed.find(answer, start + 1)
    return tuple(sorted(positions))


def chat_ids(tokenizer, user_text: str) -> list[int]:
    """Token ids of one user turn in the model's chat format, ending with the assistant header."""
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": user_text}], add_generation_prompt=True, tokenize=True, return_dict=False
    )
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):
        ids = ids["input_ids"]
    return list(ids)


def make_item(tokenizer, task: str, length: int, max_new_tokens: int, *, split: str, index: int, seed: int) -> TaskItem:
    """One task item whose chat-formatted prompt fits in ``length - max_new_tokens`` tokens."""
    budget = length - max_new_tokens
    rng = item_rng(split, task, length, index, seed)
    return TASKS[task](rng, lambda text: len(chat_ids(tokenizer, text)) <= budget)


@torch.no_grad()
def greedy_response(model, prompt_ids: list[int], max_new_tokens: int, eos_ids: set[int]) -> list[int]:
    """The model's greedy continuation of ``prompt_ids``, stopped after the first end token."""
    device = next(model.parameters()).device
    input_ids = torch.tensor([prompt_ids], device=device)  # (1, P)
    output = model.generate(
        input_ids,
        attention_mask=torch.ones_like(input_ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        eos_token_id=sorted(eos_ids) or None,
        pad_token_id=sorted(eos_ids)[0] if eos_ids else 0,
    )
    response = output[0, len(prompt_ids):].tolist()  # (R,)
    for position, token in enumerate(response):
        if token in eos_ids:
            return response[: position + 1]
    return response


def end_token_ids(model, tokenizer) -> set[int]:
    ids = set()
    for candidate in (tokenizer.eos_token_id, getattr(model.generation_config, "eos_token_id", None)):
        if isinstance(candidate, int):
            ids.add(candidate)
        elif candidate:
            ids.update(int(c) for c in candidate)
    return ids


def build_sample(model, tokenizer, item: TaskItem, max_new_tokens: int) -> Sample:
    prompt_ids = chat_ids(tokenizer, item.prompt)
    response_ids = greedy_response(model, prompt_ids, max_new_tokens, end_token_ids(model, tokenizer))
    text = tokenizer.decode(response_ids, skip_special_tokens=True)
    return Sample(item=item, prompt_ids=prompt_ids, response_ids=response_ids, response_text=text,
                  answer_positions=answer_positions(tokenizer, response_ids, item.answer))


def build_samples(model, tokenizer, *, tasks: list[str], length: int, count: int, max_new_tokens: int, split: str,
                  seed: int, progress=iter) -> list[Sample]:
    """``count`` samples at ``length``, cycling through ``tasks``, each answered greedily by ``model``.

    Raises ValueError when ``length`` is too short for a task."""
    samples = []
    for index in progress(range(count)):
        item = make_item(tokenizer, tasks[index % len(tasks)], length, max_new_tokens, split=split, index=index, seed=seed)
        samples.append(build_sample(model, tokenizer, item, max_new_tokens))
    return samples


def pad_token_id(tokenizer) -> int:
    """The id used for tail padding: the pad token, or the end token when the tokenizer has none."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def pack(samples: list[Sample], length: int, pad_id: int) -> dict[str, torch.Tensor]:
    """Stack samples into the dataset tensors: input_ids/loss_mask ``[S, N]``, lengths/prompt_lengths ``[S]``."""
    count = len(samples)
    input_ids = torch.full((count, length), pad_id, dtype=torch.int64)  # (S, N)
    loss_mask = torch.zeros((count, length), dtype=torch.uint8)  # (S, N)
    lengths = torch.zeros(count, dtype=torch.int64)
    prompt_lengths = torch.zeros(count, dtype=torch.int64)
    for row, sample in enumerate(samples):
        tokens = sample.prompt_ids + sample.response_ids
        if len(tokens) > length:
            raise ValueError(f"sample of {len(tokens)} tokens exceeds length {length}")
        input_ids[row, : len(tokens)] = torch.tensor(tokens)
        loss_mask[row, len(sample.prompt_ids) : len(tokens)] = RESPONSE
        loss_mask[row, [len(sample.prompt_ids) + i for i in sample.answer_positions]] = ANSWER
        lengths[row] = len(tokens)
        prompt_lengths[row] = len(sample.prompt_ids)
    return {"input_ids": input_ids, "loss_mask": loss_mask, "lengths": lengths, "prompt_lengths": prompt_lengths}
