"""Calibration stage: response-only loss masks, the model's own greedy answers, exact sample lengths."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from pipeline.calibration.builder import chat_ids, make_item
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
