"""Calibration stage: response-only loss masks, the model's own greedy answers, exact sample lengths."""

from __future__ import annotations

import json
import random

import pytest
import torch
from safetensors.torch import load_file

from pipeline.calibration.builder import answer_positions, chat_ids, make_item
from pipeline.calibration.tasks import TASKS
from pipeline.models import byte_tokenizer, load_model
from pipeline.run import compose
from tests.pipeline_helpers import run_stage

LENGTH = 768


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("cal") / "runs"
    outcome = run_stage(run_dir, "stage=calibrate", f"calibration.lengths=[{LENGTH}]", "calibration.samples_per_length=3")
    assert outcome == {"calibrate": "ran"}
    data = load_file(str(run_dir / "calibrate" / f"calibration_{LENGTH}.safetensors"))
    records = [json.loads(line) for line in (run_dir / "calibrate" / f"samples_{LENGTH}.jsonl").read_text().splitlines()]
    cfg = compose(["model=tiny"])
    return run_dir, data, records, load_model(cfg.model), cfg


def test_tensors_have_exact_length_and_dtypes(calibrated):
    _, data, records, _, _ = calibrated
    assert data["input_ids"].shape == (3, LENGTH) and data["input_ids"].dtype == torch.int64
    assert data["loss_mask"].shape == (3, LENGTH) and data["loss_mask"].dtype == torch.uint8
    assert data["lengths"].tolist() == [r["prompt_tokens"] + r["response_tokens"] for r in records]
    tasks = list(compose([]).calibration.tasks)  # the default tasks, in turn
    assert [r["task"] for r in records] == [tasks[i % len(tasks)] for i in range(3)]


def test_loss_mask_covers_exactly_the_response(calibrated):
    _, data, records, loaded, cfg = calibrated
    for row, record in enumerate(records):
        item = make_item(loaded.tokenizer, record["task"], LENGTH, int(cfg.calibration.max_new_tokens),
                         split="calibration", index=record["index"], seed=int(cfg.calibration.seed))
        prompt = chat_ids(loaded.tokenizer, item.prompt)
        start, end = len(prompt), int(data["lengths"][row])
        assert data["input_ids"][row, :start].tolist() == prompt
        expected = torch.zeros(LENGTH, dtype=torch.uint8)
        expected[start:end] = 1
        response = data["input_ids"][row, start:end].tolist()
        expected[[start + i for i in answer_positions(loaded.tokenizer, response, item.answer)]] = 2
        assert (expected == 2).any() == record["correct"] and record["answer_tokens"] == int((expected == 2).sum())
        assert torch.equal(data["loss_mask"][row], expected)
        assert (data["input_ids"][row, end:] == loaded.tokenizer.pad_token_id).all()


def test_stored_response_is_the_models_own_greedy_answer(calibrated):
    """Oracle: a plain argmax loop over full forwards (no generate(), no cache)."""
    _, data, _, loaded, _ = calibrated
    model = loaded.model
    for row in range(data["input_ids"].shape[0]):
        start = int(data["loss_mask"][row].nonzero()[0])
        end = int(data["lengths"][row])
        tokens = data["input_ids"][row, :start].unsqueeze(0)  # (1, P)
        with torch.no_grad():
            for _ in range(end - start):
                next_token = model(tokens).logits[0, -1].argmax()
                tokens = torch.cat([tokens, next_token.view(1, 1)], dim=1)
        assert tokens[0, start:].tolist() == data["input_ids"][row, start:end].tolist()


@pytest.mark.parametrize("task", sorted(TASKS))
def test_answer_is_stated_far_back_in_the_prompt(task):
    tokenizer = byte_tokenizer()
    item = make_item(tokenizer, task, 2048, 16, split="calibration", index=0, seed=7)
    assert len(chat_ids(tokenizer, item.prompt)) <= 2048 - 16
    position = item.prompt.find(item.answer)
    assert 0 <= position < len(item.prompt) - 150, "the answer must appear in the context, not next to the question"


def test_answer_positions_are_the_answer_and_the_token_before_it():
    tokenizer = byte_tokenizer()  # one token per character here
    text = "The secret number is 25,252. Yes, 25 252."
    ids = tokenizer.encode(text, add_special_tokens=False) + [tokenizer.eos_token_id]
    first, second = text.index("25,252"), text.index("25 252")
    want = [first - 1, *range(first, first + 6), second - 1, *range(second, second + 6)]
    assert list(answer_positions(tokenizer, ids, "25252")) == want
    assert answer_positions(tokenizer, ids, "99999") == ()


def _bpe_tokenizer():
    """A byte-level BPE with merges, so tokens span several characters and digits group unevenly."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    corpus = [f"The secret number is {n}. It was founded in the year {n % 2000}." for n in range(10000, 10400)]
    core.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=400, special_tokens=["<eos>"],
                                                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<eos>")


def test_answer_positions_match_brute_force_over_token_ranges():
    """Oracle: the minimal token ranges whose decoded text (commas and spaces dropped) contains the answer, each
    with the token before it."""
    tokenizer = _bpe_tokenizer()
    rng = random.Random(0)
    marked = 0
    for _ in range(60):
        answer = str(rng.randrange(100, 99999))
        parts = ["The number is", answer if rng.random() < 0.7 else "none", ", so", answer if rng.random() < 0.3 else "",
                 "and", str(rng.randrange(10, 999)), "."]
        ids = tokenizer.encode(" ".join(parts), add_special_tokens=False)
        def covers(a, b, ids=ids, answer=answer):
            return answer in tokenizer.decode(ids[a:b]).replace(",", "").replace(" ", "")
        want = set()
        for a in range(len(ids)):
            for b in range(a + 1, len(ids) + 1):
                if covers(a, b) and not covers(a + 1, b) and not covers(a, b - 1):
                    want.update(range(a, b))
                    if a:
                        want.add(a - 1)
        assert set(answer_positions(tokenizer, ids, answer)) == want, (answer, parts)
        marked += bool(want)
    assert 30 < marked < 60
