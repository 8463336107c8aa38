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


@pytest.fixture(autouse=True)
def one_thread(request):
    """The tiny model is faster on one thread, and much faster when other jobs share the cores (the SmolLM2 test
    keeps every thread)."""
    threads = torch.get_num_threads()
    if request.node.get_closest_marker("slow") is None:
        torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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


def sparse_plan(model):
    """A plan whose spans (4 to 12 tokens, plus 2 sink tokens) are much shorter than the test prompts."""
    from pipeline.plan import Plan

    plan = Plan.uniform(model, 0.0, sink=2, min_span=2)
    g = torch.Generator().manual_seed(0)
    shape = (len(plan.alphas), len(plan.alphas[0]))
    plan.alphas = (4 + torch.rand(shape, generator=g) * 8).tolist()
    return plan


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
    assert math.isclose(result.losses[0], float(expected_loss.detach()), rel_tol=1e-5)
    step = head.detach() - before
    clear = grad.abs() > 1e-4
    assert clear.sum() > 100
    torch.testing.assert_close(step[clear], -lr * grad[clear].sign(), atol=1e-6, rtol=1e-3)


def test_training_under_a_sparse_plan_never_pads():
    """The sparse runtime refuses padding and sizes its spans by the sequence length: under a plan, step 1's loss
    is the mean over examples each run alone at its own length."""
    from pipeline.sparse_runtime import plan_applied

    model, tokenizer = tiny()
    model.lm_head.weight.requires_grad_(True)
    encoded = encode(tokenizer, short_examples(8))
    assert len({len(e) for e in encoded}) < len(encoded)  # some lengths repeat: micro-batches of several
    tokens = sum(len(e.response_ids) for e in encoded)

    def mean_alone() -> float:
        with torch.no_grad():
            return sum(float(oracle_loss(model, [e], pad_id=0)) * len(e.response_ids) for e in encoded) / tokens

    dense = mean_alone()
    with plan_applied(model, sparse_plan(model), backend="cpu"):
        expected = mean_alone()
        result = train(model, encoded, [model.lm_head.weight], steps=1, batch_size=8, lr=1e-3, progress=False)
    assert math.isclose(result.losses[0], expected, rel_tol=1e-5)
    assert abs(dense - expected) > 1e-4  # the plan really changes the loss


def test_only_the_given_parameters_change_and_the_loss_falls():
    model, tokenizer = tiny()
    encoded = encode(tokenizer, short_examples(4))
    trained = [model.lm_head.weight, model.model.norm.weight]
    for p in trained:
        p.requires_grad_(True)
    frozen = {name: p.detach().clone() for name, p in model.named_parameters() if not p.requires_grad}
    calls = []
    result = train(model, encoded, trained, steps=12, batch_size=4, lr=5e-2, progress=False,
                   on_step=lambda step, loss: calls.append((step, loss)))
    assert calls == list(enumerate(result.losses, start=1)) and result.steps == 12
    assert result.losses[-1] < 0.5 * result.losses[0]
    assert result.seconds_per_step > 0 and result.total_seconds >= result.seconds_per_step
    for name, p in model.named_parameters():
        if name in frozen:
            assert torch.equal(p, frozen[name]), name
    assert not model.training


def test_warmup_and_clipping_are_applied(monkeypatch):
    """One warmup step of two: the schedule's first learning rate is 0, so only step 2 moves the weights; the
    gradient is clipped to ``max_grad_norm`` over exactly the trained parameters before every step."""
    model, tokenizer = tiny()
    head = model.lm_head.weight
    head.requires_grad_(True)
    encoded = encode(tokenizer, short_examples(4))
    clipped = []
    real_clip = torch.nn.utils.clip_grad_norm_

    def spy(params, max_norm, *args, **kwargs):
        params = list(params)
        clipped.append(([id(p) for p in params], max_norm))
        return real_clip(params, max_norm, *args, **kwargs)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", spy)
    snapshots = []
    train(model, encoded, [head], steps=2, batch_size=2, lr=1e-2, warmup_ratio=0.5, max_grad_norm=0.5,
          progress=False, on_step=lambda step, loss: snapshots.append(head.detach().clone()))
    before = tiny()[0].lm_head.weight
    assert torch.equal(snapshots[0], before) and not torch.equal(snapshots[1], before)
    assert clipped == [([id(head)], 0.5)] * 2


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
    expected = float(oracle_loss(model, encoded, pad_id=0).detach())
    modes = []

    def aux():
        modes.append(model.training)
        return torch.tensor(0.25)

    result = train(model, encoded, [model.lm_head.weight], steps=1, batch_size=6, lr=1e-3, aux_loss=aux,
                   progress=False)
    assert modes and all(modes) and not model.training
    assert math.isclose(result.losses[0], expected + 0.25, rel_tol=1e-5)


def test_divergence_stops_training():
    """A huge learning rate on two multiplied weights (final norm and LM head) overflows the logits within a few
    steps; an infinite auxiliary loss stops the first step."""
    model, tokenizer = tiny()
    trained = [model.lm_head.weight, model.model.norm.weight]
    for p in trained:
        p.requires_grad_(True)
    encoded = encode(tokenizer, short_examples(4))
    seen = []
    with pytest.raises(TrainingDiverged, match="diverged at step") as caught:
        train(model, encoded, trained, steps=20, batch_size=2, lr=1e20, warmup_ratio=0.0, max_grad_norm=None,
              progress=False, on_step=lambda step, loss: seen.append(step))
    assert isinstance(caught.value, ValueError) and caught.value.step == len(seen) + 1 and caught.value.step < 20
    assert not model.training
    model, _ = tiny()
    model.lm_head.weight.requires_grad_(True)
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
    """Make the tiny model end some answers early, but not all: the end token gets twice the logit row of a token
    the model picks, so wherever that token wins with a positive logit, the end token wins instead. Tries the
    picked tokens from the most frequent down until some examples end early and some do not."""
    counts = torch.zeros(model.lm_head.weight.shape[0])
    for example in examples:
        for token in plain_greedy(model, chat_ids(tokenizer, example.prompt), new, set()):
            counts[token] += 1
    ends = end_ids(model, tokenizer)
    original = model.lm_head.weight[ends].detach().clone()
    with torch.no_grad():
        for token in counts.argsort(descending=True)[:int((counts > 0).sum())].tolist():
            model.lm_head.weight[ends] = 2 * model.lm_head.weight[token]
            early = ends_early(model, tokenizer, examples, new)
            if any(early) and not all(early):
                return model
            model.lm_head.weight[ends] = original
    raise AssertionError("no token makes some answers end early and others not")


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


def oracle_tokens(model, tokenizer, examples, new: int) -> list[list[int]]:
    stop = set(end_ids(model, tokenizer))
    return [plain_greedy(model, chat_ids(tokenizer, example.prompt), new, stop) for example in examples]


def oracle_answers(model, tokenizer, examples, new: int) -> list[str]:
    stop = set(end_ids(model, tokenizer))
    return [tokenizer.decode([t for t in tokens if t not in stop], skip_special_tokens=True).strip()
            for tokens in oracle_tokens(model, tokenizer, examples, new)]


def ends_early(model, tokenizer, examples, new: int) -> list[bool]:
    stop = set(end_ids(model, tokenizer))
    return [tokens[-1] in stop for tokens in oracle_tokens(model, tokenizer, examples, new)]


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
    for batch_size in (1, 2, 8):
        assert greedy_answers(model, tokenizer, examples, max_new_tokens=new, batch_size=batch_size) == expected


def test_batched_greedy_under_a_sparse_plan_equals_one_at_a_time():
    """With a plan applied, decoding goes through the per-head cache; the batched (same-length, unpadded) answers
    equal each example decoded alone through the same runtime, and differ from the dense model's somewhere."""
    from pipeline.sparse_runtime import plan_applied

    model, tokenizer = tiny()
    examples = [AdapterExample("t", f"{word} " * repeat, "x")  # two lengths: a batch must not mix them
                for word in ("alpha", "gamma", "delta", "omega", "sigma") for repeat in (12, 13)]
    new = 8
    dense = greedy_answers(model, tokenizer, examples, max_new_tokens=new)
    with plan_applied(model, sparse_plan(model), backend="cpu"):
        alone = [greedy_answers(model, tokenizer, [e], max_new_tokens=new)[0] for e in examples]
        batched = greedy_answers(model, tokenizer, examples, max_new_tokens=new, batch_size=4)
    assert batched == alone
    assert alone != dense


def test_accuracy_scores_the_greedy_answers_exactly(monkeypatch):
    import pipeline.adapters.inference as inference

    gold = [AdapterExample("t", "p1", "12"), AdapterExample("t", "p2", "12"), AdapterExample("t", "p3", "WEBER, John"),
            AdapterExample("t", "p4", "WEBER, John")]
    said = ["12.", "The answer is 12", "WEBER, John", "John Weber"]
    calls = []

    def fake(model, tokenizer, examples, *, max_new_tokens, batch_size):
        calls.append((list(examples), max_new_tokens, batch_size))
        return said

    monkeypatch.setattr(inference, "greedy_answers", fake)
    assert accuracy(None, None, gold, max_new_tokens=5, batch_size=3) == (2, 4, said)
    assert calls == [(gold, 5, 3)]


def test_generation_latency_runs_the_full_length():
    model, tokenizer = tiny()
    examples = bucketed_examples()[:3]
    eos_prone(model, tokenizer, examples, 10)
    assert any(ends_early(model, tokenizer, examples, 10))
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


# --- the embedded model -----------------------------------------------------------------------------------------

@pytest.mark.slow
def test_smollm2_lora_learns_what_the_base_model_cannot():
    """SmolLM2-135M-Instruct: prompts are short (long_context about 400 tokens), the frozen base model misses the
    exact extraction format, and a peft LoRA (r=8 on q_proj, v_proj) trained for 24 steps of 8 gets most right."""
    import os

    peft = pytest.importorskip("peft")
    loaded = load_model(OmegaConf.create({"name": "smollm2", "source": "smollm2_gguf", "path": None,
                                          "cache_dir": os.path.expanduser("~/.cache/moa-autotune"),
                                          "dtype": "float32", "max_positions": 8192}))
    model, tokenizer = loaded.model, loaded.tokenizer
    lengths = {task: [len(chat_ids(tokenizer, e.prompt)) for e in make_examples(task, "val", 16, 0)]
               for task in ("arithmetic", "extraction", "long_context")}
    assert max(lengths["arithmetic"]) <= 90 and max(lengths["extraction"]) <= 70
    assert 384 <= min(lengths["long_context"]) and max(lengths["long_context"]) <= 512
    test = make_examples("extraction", "test", 16, 0)
    base, n, _ = accuracy(model, tokenizer, test, max_new_tokens=12, batch_size=16)
    assert base <= 0.3 * n
    for p in model.parameters():
        p.requires_grad_(False)
    torch.manual_seed(0)
    adapted = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                                         lora_dropout=0.05))
    params = [p for p in adapted.parameters() if p.requires_grad]
    result = train(adapted, encode(tokenizer, make_examples("extraction", "train", 96, 0)), params, steps=24,
                   batch_size=8, lr=2e-3, progress=False)
    assert result.losses[-1] < 0.5 * result.losses[0]
    trained, n, responses = accuracy(adapted, tokenizer, test, max_new_tokens=12, batch_size=16)
    assert trained >= base + 0.4 * n, responses
