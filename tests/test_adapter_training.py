"""Adapter training and inference on the tiny model, against independent oracles: the response-only loss equals
``model(..., labels=...)`` with the prompt masked, the first AdamW step moves each weight by ``-lr * sign`` of
the oracle gradient, divergence and callback errors stop training, and batched greedy answers equal a plain
one-at-a-time greedy loop without a cache (with and without a sparse plan)."""

from __future__ import annotations

import math

import pytest
import torch
from omegaconf import OmegaConf

from pipeline.adapters.inference import accuracy, end_ids, generation_latency_ms, greedy_answers
from pipeline.adapters.tasks import AdapterExample, make_examples
from pipeline.adapters.training import (
    EncodedExample,
    TrainingDiverged,
    encode,
    micro_batches,
    response_loss,
    train,
)
from pipeline.calibration.builder import chat_ids
from pipeline.models import load_model

TINY = {"name": "tiny", "source": "tiny", "path": None, "cache_dir": "/tmp", "dtype": "float32", "max_positions": 4096,
        "seed": 0, "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128, "num_layers": 2, "num_heads": 4,
        "num_kv_heads": 2}


def tiny():
    loaded = load_model(OmegaConf.create(TINY))
    for p in loaded.model.parameters():
        p.requires_grad_(False)
    return loaded.model, loaded.tokenizer


def short_examples(n: int = 6) -> list[AdapterExample]:
    """Short prompts of a few different lengths (the byte tokenizer counts characters)."""
    words = ("ab", "abc", "abcd", "ab", "abcdefgh", "abc", "a", "abcdefghijklmno")
    return [AdapterExample("t", f"say {words[i % len(words)]}", f"{i}{words[i % len(words)]}") for i in range(n)]


def oracle_loss(model, batch: list[EncodedExample], pad_id: int) -> torch.Tensor:
    """The model's own loss: full logits, labels -100 on the prompt and the padding."""
    width = max(len(e) for e in batch)
    ids = torch.full((len(batch), width), pad_id)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for row, e in enumerate(batch):
        ids[row, :len(e)] = torch.tensor(e.input_ids)
        mask[row, :len(e)] = 1
        labels[row, len(e.prompt_ids):len(e)] = torch.tensor(e.response_ids)
    return model(input_ids=ids, attention_mask=mask, labels=labels).loss


# --- encoding and the loss --------------------------------------------------------------------------------------

def test_encode_masks_the_prompt_and_ends_the_turn():
    _, tokenizer = tiny()
    examples = short_examples(3)
    for example, encoded in zip(examples, encode(tokenizer, examples), strict=True):
        assert list(encoded.prompt_ids) == chat_ids(tokenizer, example.prompt)
        end = tokenizer.convert_tokens_to_ids("<|im_end|>")
        assert encoded.response_ids[-1] == end
        assert tokenizer.decode(list(encoded.response_ids[:-1])) == example.answer
        assert encoded.input_ids == encoded.prompt_ids + encoded.response_ids


def test_response_loss_equals_the_models_own_masked_loss():
    model, tokenizer = tiny()
    batch = encode(tokenizer, short_examples(5))
    assert len({len(e) for e in batch}) > 2  # really padded
    with torch.no_grad():
        total, count = response_loss(model, batch, pad_id=7)
        expected = oracle_loss(model, batch, pad_id=0)
    assert count == sum(len(e.response_ids) for e in batch)
    torch.testing.assert_close(total / count, expected, atol=1e-5, rtol=1e-5)


def test_micro_batches_cover_the_batch_and_group_similar_lengths():
    short = EncodedExample((1,) * 10, (2, 3))
    long = EncodedExample((1,) * 200, (2, 3))
    chunks = micro_batches([long, short, long, short, short])
    assert sorted(map(len, chunks)) == [2, 3]
    assert all(len({len(e) for e in chunk}) == 1 for chunk in chunks)


def test_first_loss_and_step_match_the_oracle_batch():
    """With as many examples as the batch, step 1 sees every example once: its loss is the oracle's mean over
    all response tokens (micro-batches summed, not averaged), and AdamW's first step moves each trained weight
    by ``-lr * sign(grad)`` of the oracle gradient."""
    model, tokenizer = tiny()
    encoded = encode(tokenizer, short_examples(6))
    head = model.lm_head.weight
    head.requires_grad_(True)
    expected_loss = oracle_loss(model, encoded, pad_id=0)
    (grad,) = torch.autograd.grad(expected_loss, [head])
    before = head.detach().clone()
    lr = 1e-3
    result = train(model, encoded, [head], steps=1, batch_size=6, lr=lr, warmup_ratio=0.0, max_grad_norm=None,
                   progress=False)
    assert result.steps == 1 and len(result.losses) == 1
    assert math.isclose(result.losses[0], float(expected_loss), rel_tol=1e-5)
    step = head.detach() - before
    clear = grad.abs() > 1e-4
    assert clear.sum() > 100
    torch.testing.assert_close(step[clear], -lr * grad[clear].sign(), atol=1e-6, rtol=1e-3)


def test_only_the_given_parameters_change_and_the_loss_falls():
    model, tokenizer = tiny()
    encoded = encode(tokenizer, short_examples(4))
    trained = [model.lm_head.weight, model.model.norm.weight]
    for p in trained:
        p.requires_grad_(True)
    frozen = {name: p.detach().clone() for name, p in model.named_parameters() if not p.requires_grad}
    calls = []
    result = train(model, encoded, trained, steps=30, batch_size=4, lr=3e-2, progress=False,
                   on_step=lambda step, loss: calls.append((step, loss)))
    assert calls == list(enumerate(result.losses, start=1)) and result.steps == 30
    assert result.losses[-1] < 0.5 * result.losses[0]
    assert result.seconds_per_step > 0 and result.total_seconds >= result.seconds_per_step
    for name, p in model.named_parameters():
        if name in frozen:
            assert torch.equal(p, frozen[name]), name
    assert not model.training


def test_training_is_seeded():
    losses = []
    for seed in (0, 0, 1):
        model, tokenizer = tiny()
        model.lm_head.weight.requires_grad_(True)
        encoded = encode(tokenizer, short_examples(8))
        losses.append(train(model, encoded, [model.lm_head.weight], steps=3, batch_size=2, lr=1e-2, seed=seed,
                            progress=False).losses)
    assert losses[0] == losses[1] and losses[0] != losses[2]


def test_aux_loss_is_added_after_the_forward_in_train_mode():
    model, tokenizer = tiny()
    model.lm_head.weight.requires_grad_(True)
    encoded = encode(tokenizer, short_examples(6))
    expected = float(oracle_loss(model, encoded, pad_id=0))
    modes = []

    def aux():
        modes.append(model.training)
        return torch.tensor(0.25)

    result = train(model, encoded, [model.lm_head.weight], steps=1, batch_size=6, lr=1e-3, aux_loss=aux,
                   progress=False)
    assert modes and all(modes) and not model.training
    assert math.isclose(result.losses[0], expected + 0.25, rel_tol=1e-5)


def test_divergence_stops_training():
    model, tokenizer = tiny()
    model.lm_head.weight.requires_grad_(True)
    encoded = encode(tokenizer, short_examples(4))
    seen = []
    with pytest.raises(TrainingDiverged, match="diverged at step") as caught:
        train(model, encoded, [model.lm_head.weight], steps=50, batch_size=2, lr=1e12, warmup_ratio=0.0,
              max_grad_norm=None, progress=False, on_step=lambda step, loss: seen.append(step))
    assert isinstance(caught.value, ValueError) and caught.value.step == len(seen) + 1 and caught.value.step < 50
    assert not model.training
    with pytest.raises(TrainingDiverged) as injected:
        train(model, encoded, [model.lm_head.weight], steps=5, batch_size=2, lr=1e-3, progress=False,
              aux_loss=lambda: torch.tensor(float("inf")))
    assert injected.value.step == 1 and injected.value.loss == float("inf")


def test_on_step_exceptions_propagate():
    class Pruned(Exception):
        pass

    model, tokenizer = tiny()
    model.lm_head.weight.requires_grad_(True)
    encoded = encode(tokenizer, short_examples(4))

    def prune(step, loss):
        if step == 2:
            raise Pruned

    with pytest.raises(Pruned):
        train(model, encoded, [model.lm_head.weight], steps=10, batch_size=2, lr=1e-3, progress=False, on_step=prune)
    assert not model.training


def test_training_refuses_bad_arguments():
    model, tokenizer = tiny()
    encoded = encode(tokenizer, short_examples(2))
    with pytest.raises(ValueError, match="require grad"):
        train(model, encoded, [model.lm_head.weight], steps=1, batch_size=1, lr=1e-3, progress=False)
    model.lm_head.weight.requires_grad_(True)
    with pytest.raises(ValueError, match="no training examples"):
        train(model, [], [model.lm_head.weight], steps=1, batch_size=1, lr=1e-3, progress=False)
    with pytest.raises(ValueError, match="steps and batch_size"):
        train(model, encoded, [model.lm_head.weight], steps=0, batch_size=1, lr=1e-3, progress=False)


# --- inference --------------------------------------------------------------------------------------------------

def eos_prone(model, tokenizer, examples, new: int):
    """Make the tiny model end some answers early: the end token gets twice the logit row of a token the model
    often picks, so wherever that token wins with a positive logit, the end token wins instead."""
    counts = torch.zeros(model.lm_head.weight.shape[0])
    for example in examples:
        for token in plain_greedy(model, chat_ids(tokenizer, example.prompt), new, set()):
            counts[token] += 1
    common = int(counts.argmax())
    with torch.no_grad():
        for end in end_ids(model, tokenizer):
            model.lm_head.weight[end] = 2 * model.lm_head.weight[common]
    return model


@torch.no_grad()
def plain_greedy(model, prompt: list[int], new: int, stop: set[int]) -> list[int]:
    """One example, no cache, no generate(): argmax of a full forward per token."""
    tokens = list(prompt)
    for _ in range(new):
        token = int(model(input_ids=torch.tensor([tokens]), use_cache=False).logits[0, -1].argmax())
        tokens.append(token)
        if token in stop:
            break
    return tokens[len(prompt):]


def oracle_answers(model, tokenizer, examples, new: int) -> list[str]:
    stop = set(end_ids(model, tokenizer))
    answers = []
    for example in examples:
        tokens = plain_greedy(model, chat_ids(tokenizer, example.prompt), new, stop)
        tokens = [t for t in tokens if t not in stop]
        answers.append(tokenizer.decode(tokens, skip_special_tokens=True).strip())
    return answers


def bucketed_examples() -> list[AdapterExample]:
    """Prompts with repeated lengths, so buckets hold several examples and the batch size splits some."""
    prompts = ["hello there", "hello where", "hi", "yo", "ab", "count to ten", "count to six", "say", "hello whale"]
    return [AdapterExample("t", p, "x") for p in prompts]


def test_batched_greedy_equals_one_at_a_time_greedy():
    model, tokenizer = tiny()
    examples = bucketed_examples()
    new = 10
    eos_prone(model, tokenizer, examples, new)
    expected = oracle_answers(model, tokenizer, examples, new)
    ended_early = [len(tokenizer.encode(a, add_special_tokens=False)) < new for a in expected]
    assert any(ended_early) and not all(ended_early)
    for batch_size in (1, 2, 8):
        assert greedy_answers(model, tokenizer, examples, max_new_tokens=new, batch_size=batch_size) == expected


def test_batched_greedy_under_a_sparse_plan_equals_one_at_a_time():
    """With a plan applied, decoding goes through the per-head cache; the batched (same-length, unpadded) answers
    equal each example decoded alone through the same runtime, and differ from the dense model's somewhere."""
    from pipeline.plan import Plan
    from pipeline.sparse_runtime import plan_applied

    model, tokenizer = tiny()
    examples = [AdapterExample("t", f"{word} " * 12, "x") for word in ("alpha", "gamma", "delta", "omega", "sigma")]
    new = 8
    dense = greedy_answers(model, tokenizer, examples, max_new_tokens=new)
    plan = Plan.uniform(model, 0.0, sink=2, min_span=2)
    g = torch.Generator().manual_seed(0)
    shape = (len(plan.alphas), len(plan.alphas[0]))
    plan.alphas = (4 + torch.rand(shape, generator=g) * 8).tolist()
    with plan_applied(model, plan, backend="cpu"):
        alone = [greedy_answers(model, tokenizer, [e], max_new_tokens=new)[0] for e in examples]
        batched = greedy_answers(model, tokenizer, examples, max_new_tokens=new, batch_size=4)
    assert batched == alone
    assert alone != dense


def test_accuracy_scores_exact_answers():
    model, tokenizer = tiny()
    examples = bucketed_examples()[:6]
    responses = greedy_answers(model, tokenizer, examples, max_new_tokens=6)
    kept = [(e, r) for e, r in zip(examples, responses, strict=True) if r.strip()]
    assert len(kept) >= 3
    gold = [AdapterExample("t", e.prompt, r if i % 2 == 0 else r + " zz") for i, (e, r) in enumerate(kept)]
    correct, n, again = accuracy(model, tokenizer, gold, max_new_tokens=6)
    assert again == [r for _, r in kept]
    assert n == len(gold) and correct == (len(gold) + 1) // 2


def test_generation_latency_runs_the_full_length():
    model, tokenizer = tiny()
    examples = bucketed_examples()[:3]
    eos_prone(model, tokenizer, examples, 10)
    assert any(len(a) < 10 for a in oracle_answers(model, tokenizer, examples, 10))
    ms = generation_latency_ms(model, tokenizer, examples, max_new_tokens=10, repeats=2)
    assert ms > 0 and math.isfinite(ms)
    with pytest.raises(ValueError, match="no examples"):
        generation_latency_ms(model, tokenizer, [], max_new_tokens=4)


def test_tasks_encode_and_decode_on_the_tiny_model():
    """The real tasks run end to end on the tiny model: encode, one training step, greedy answers."""
    model, tokenizer = tiny()
    examples = [e for task in ("arithmetic", "extraction") for e in make_examples(task, "train", 2, 0)]
    model.lm_head.weight.requires_grad_(True)
    result = train(model, encode(tokenizer, examples), [model.lm_head.weight], steps=1, batch_size=4, lr=1e-3,
                   progress=False)
    assert math.isfinite(result.losses[0])
    correct, n, responses = accuracy(model, tokenizer, examples, max_new_tokens=4)
    assert n == 4 and len(responses) == 4 and 0 <= correct <= n
