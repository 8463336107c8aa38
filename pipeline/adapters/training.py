"""Supervised fine-tuning of adapter parameters on chat-formatted examples, loss on the response tokens only.

:func:`encode` turns examples into prompt ids (the chat template, ending with the assistant header) and response
ids (the answer's tokens and the end-of-turn token). :func:`train` runs AdamW with a cosine schedule and warmup,
gradient clipping and an optional auxiliary loss over the given parameters only; the base model's weights are
expected to be frozen by the caller.

Each step's batch is drawn from a seeded generator (a fresh permutation of the examples per epoch), sorted by
length and cut into micro-batches of similar length, each right-padded with an attention mask; their gradients
are accumulated, so the step's gradient is that of the whole batch without padding most of it. With a sparse
plan applied (``model.moa_plan``) micro-batches hold examples of one length only: the sparse runtime refuses
padding, and its spans depend on the sequence length, which padding would change. The LM head is
applied only at the positions that predict response tokens (:func:`response_loss`), which saves most of its cost
on a large vocabulary; the loss is the mean cross-entropy over all response tokens of the batch.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from pipeline.calibration.builder import chat_ids

MICRO_BATCH_SLACK = 1.25
"""A micro-batch's longest example is at most this times its shortest (plus a few tokens): little padding."""
MICRO_BATCH_TOKENS = 4096
"""At most this many (padded) tokens per micro-batch, which bounds activation memory."""


class TrainingDiverged(ValueError):
    """The training loss (or gradient) became NaN or infinite."""

    def __init__(self, step: int, loss: float, what: str = "loss"):
        self.step, self.loss = int(step), float(loss)
        super().__init__(f"training diverged at step {self.step}: {what} {self.loss}")


@dataclass(frozen=True)
class EncodedExample:
    prompt_ids: tuple[int, ...]
    response_ids: tuple[int, ...]
    """The answer's tokens and the end-of-turn token; the only tokens with a loss."""

    @property
    def input_ids(self) -> tuple[int, ...]:
        return self.prompt_ids + self.response_ids

    def __len__(self) -> int:
        return len(self.prompt_ids) + len(self.response_ids)


@dataclass
class TrainResult:
    steps: int
    losses: list[float] = field(default_factory=list)
    """Per optimizer step: the batch's mean response cross-entropy (plus the auxiliary loss, if any)."""
    seconds_per_step: float = float("nan")
    """Median wall-clock seconds of one optimizer step."""
    total_seconds: float = 0.0


def im_end_id(tokenizer) -> int | None:
    """The ChatML ``<|im_end|>`` token's id, or ``None`` where the vocabulary lacks it."""
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    return im_end if isinstance(im_end, int) and im_end != tokenizer.unk_token_id else None


def end_of_turn_id(tokenizer) -> int:
    """The token that ends an assistant turn: ``<|im_end|>`` where the vocabulary has it, else the eos token."""
    im_end = im_end_id(tokenizer)
    if im_end is not None:
        return im_end
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has neither <|im_end|> nor an eos token")
    return int(tokenizer.eos_token_id)


def encode(tokenizer, examples: Sequence) -> list[EncodedExample]:
    """Prompt ids (chat template with the assistant header) and response ids (answer tokens + end of turn)."""
    end = end_of_turn_id(tokenizer)
    encoded = []
    for example in examples:
        answer = tokenizer.encode(example.answer, add_special_tokens=False)
        if not answer:
            raise ValueError(f"empty answer for prompt {example.prompt[:40]!r}")
        encoded.append(EncodedExample(tuple(chat_ids(tokenizer, example.prompt)), tuple(answer) + (end,)))
    return encoded


def _causal_lm(model):
    """The Hugging Face causal LM inside ``model`` (a PEFT wrapper's base model, or the model itself)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not (hasattr(inner, "get_decoder") and hasattr(inner, "get_output_embeddings")):
        raise ValueError(f"{type(inner).__name__} is not a Hugging Face causal LM with a decoder and an LM head")
    return inner


def _pad(batch: Sequence[EncodedExample], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Right-padded ``input_ids`` ``[B, T]`` and its ``attention_mask`` ``[B, T]``, or ``None`` for no padding."""
    width = max(len(e) for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, example in enumerate(batch):
        ids[row, :len(example)] = torch.tensor(example.input_ids)
        mask[row, :len(example)] = 1
    return ids.to(device), (mask.to(device) if not bool(mask.all()) else None)


def response_loss(model, batch: Sequence[EncodedExample], *, pad_id: int = 0) -> tuple[torch.Tensor, int]:
    """``(sum of response-token cross-entropies, number of response tokens)`` of one right-padded forward.

    Runs the decoder for the hidden states and applies the LM head only at the positions that predict response
    tokens (``prompt_length - 1`` up to the second-to-last token of each example)."""
    lm = _causal_lm(model)
    device = lm.get_output_embeddings().weight.device
    input_ids, attention_mask = _pad(batch, pad_id, device)
    hidden = lm.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    rows, cols, targets = [], [], []
    for row, example in enumerate(batch):
        start, end = len(example.prompt_ids) - 1, len(example) - 1
        rows += [row] * (end - start)
        cols += range(start, end)
        targets += example.response_ids
    picked = hidden[torch.tensor(rows, device=device), torch.tensor(cols, device=device)]  # (R, H)
    logits = lm.get_output_embeddings()(picked).float()  # (R, V)
    loss = F.cross_entropy(logits, torch.tensor(targets, device=device), reduction="sum")
    return loss, len(targets)


def micro_batches(batch: Sequence[EncodedExample], *, exact: bool = False) -> list[list[EncodedExample]]:
    """``batch`` sorted by length and cut where lengths grow past ``MICRO_BATCH_SLACK`` or the token cap; with
    ``exact``, cut wherever the length changes, so no micro-batch is padded."""
    chunks: list[list[EncodedExample]] = []
    for example in sorted(batch, key=len):
        if chunks:
            chunk = chunks[-1]
            shortest = len(chunk[0])
            similar = len(example) == shortest if exact else len(example) <= MICRO_BATCH_SLACK * shortest + 8
            if similar and len(example) * (len(chunk) + 1) <= MICRO_BATCH_TOKENS:
                chunk.append(example)
                continue
        chunks.append([example])
    return chunks


def _epochs(count: int, generator: torch.Generator):
    """Indices 0..count-1 in a fresh seeded permutation per epoch, endlessly."""
    while True:
        yield from torch.randperm(count, generator=generator).tolist()


def progress_bar(total: int, desc: str, *, progress: bool = True, **kwargs):
    """A tqdm bar over ``total`` units, hidden when ``progress`` is false or ``MOA_NO_PROGRESS=1``."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, dynamic_ncols=True,
                disable=not progress or os.environ.get("MOA_NO_PROGRESS") == "1", **kwargs)


def train(model, encoded: Sequence[EncodedExample], params: Sequence[torch.nn.Parameter], *, steps: int,
          batch_size: int, lr: float, weight_decay: float = 0.0, warmup_ratio: float = 0.1,
          max_grad_norm: float | None = 1.0, aux_loss: Callable[[], torch.Tensor] | None = None,
          on_step: Callable[[int, float], None] | None = None, seed: int = 0,
          progress: bool = True, position: int | None = None, leave: bool = False) -> TrainResult:
    """Train ``params`` (and nothing else) for ``steps`` optimizer steps of ``batch_size`` examples.

    The loss is the mean cross-entropy over the batch's response tokens, plus ``aux_loss()`` (a 0-dim tensor,
    read after each forward, weighted by the micro-batch's share of examples) when given. ``on_step(step, loss)``
    runs after each optimizer step (``step`` counts from 1); whatever it raises propagates. A NaN or infinite
    loss or gradient norm stops training at once with :class:`TrainingDiverged`. The model trains in train mode
    (dropout on) and is left in eval mode, also when training stops early. ``position``/``leave`` go to the
    tqdm bar, so a caller's outer bar stays readable; ``progress=False`` (or ``MOA_NO_PROGRESS=1``) hides it."""
    from transformers import get_cosine_schedule_with_warmup

    params = list(params)
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be >= 1, got {steps} and {batch_size}")
    if not encoded:
        raise ValueError("no training examples")
    if not params:
        raise ValueError("no parameters to train")
    if not all(p.requires_grad for p in params):
        raise ValueError("every trained parameter must require grad (freeze the base model, not the adapter)")
    if lr < 0 or not 0 <= warmup_ratio <= 1:
        raise ValueError(f"need lr >= 0 and 0 <= warmup_ratio <= 1, got {lr} and {warmup_ratio}")
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    schedule = get_cosine_schedule_with_warmup(optimizer, round(warmup_ratio * steps), steps)
    order = _epochs(len(encoded), torch.Generator().manual_seed(seed))
    unpadded = getattr(model, "moa_plan", None) is not None  # the sparse runtime refuses padding
    result = TrainResult(steps=0)
    durations: list[float] = []
    bar = progress_bar(steps, "train", progress=progress, position=position, leave=leave)
    started = time.perf_counter()
    model.train()
    try:
        for step in range(1, steps + 1):
            step_started = time.perf_counter()
            batch = [encoded[next(order)] for _ in range(batch_size)]
            chunks = micro_batches(batch, exact=unpadded)
            tokens = sum(len(e.response_ids) for e in batch)
            optimizer.zero_grad(set_to_none=True)
            total = 0.0
            for chunk in chunks:
                loss_sum, _ = response_loss(model, chunk)
                loss = loss_sum / tokens
                if aux_loss is not None:
                    loss = loss + aux_loss() * (len(chunk) / len(batch))
                loss.backward()
                total += float(loss.detach())
            if not math.isfinite(total):
                raise TrainingDiverged(step, total)
            if max_grad_norm is not None:
                norm = float(torch.nn.utils.clip_grad_norm_(params, max_grad_norm))
                if not math.isfinite(norm):
                    raise TrainingDiverged(step, norm, "gradient norm")
            optimizer.step()
            schedule.step()
            durations.append(time.perf_counter() - step_started)
            result.losses.append(total)
            result.steps = step
            bar.update(1)
            bar.set_postfix(loss=f"{total:.3f}")
            if on_step is not None:
                on_step(step, total)
    finally:
        model.eval()
        optimizer.zero_grad(set_to_none=True)
        bar.close()
        result.total_seconds = time.perf_counter() - started
        result.seconds_per_step = statistics.median(durations) if durations else float("nan")
    return result
