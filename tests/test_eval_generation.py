"""Timed greedy generation against a reference response: the teacher-forced logits it returns without a second
prefill equal one forward pass over the prompt and the reference, dense or under a plan, wherever the two part."""

import pytest
import torch
from conftest import make_tiny_model
from test_hf_integration import random_plan

from pipeline.evaluation.generation import teacher_forced_logits, timed_greedy
from pipeline.sparse_runtime import plan_applied

PROMPT = torch.randint(3, 128, (40,), generator=torch.Generator().manual_seed(5)).tolist()
NEW = 8
NO_END: set[int] = set()


def references(greedy: list[int]) -> dict[str, list[int]]:
    """Reference responses that follow the greedy one for 0, 3 or all of its tokens, shorter or as long."""
    other = [(t + 1) % 128 for t in greedy]  # differs from greedy at every step
    return {"same": greedy, "parts_at_0": other, "parts_at_3": greedy[:3] + other[3:],
            "shorter_same": greedy[:5], "shorter_parts_at_2": greedy[:2] + other[2:5]}


@pytest.mark.parametrize("with_plan", [False, True])
def test_reference_logits_equal_one_teacher_forced_pass(with_plan):
    model = make_tiny_model(layers=3)
    plan = random_plan(model, seed=2, scale=0.6)  # spans well under the 48 tokens: the plan matters
    context = plan_applied(model, plan, backend="cpu") if with_plan else torch.no_grad()
    with context:
        greedy = timed_greedy(model, PROMPT, NEW, NO_END).response_ids
        for name, reference in references(greedy).items():
            gen = timed_greedy(model, PROMPT, NEW, NO_END, reference=reference)
            assert gen.response_ids == greedy, name  # the reference never changes the generation itself
            expected = teacher_forced_logits(model, PROMPT, reference)  # (R, V): one forward pass
            assert gen.reference_logits.shape == expected.shape, name
            torch.testing.assert_close(gen.reference_logits, expected, atol=2e-4, rtol=1e-4, msg=name)


def test_no_reference_gives_no_reference_logits():
    model = make_tiny_model(layers=1)
    assert timed_greedy(model, PROMPT, 3, NO_END).reference_logits is None


def test_run_method_perplexity_is_the_methods_own():
    """``run_method`` scores the held-out text under the method's attention (its perplexity pass is also the
    warm-up): dense equals exp of the mean cross-entropy of one plain forward pass, and the plan's equals the
    same computed from a forward pass under the plan with the float64 reference backend."""
    import math

    import torch.nn.functional as F

    from pipeline.evaluation.harness import Method, run_method
    from pipeline.evaluation.tasks import EvalItem

    model = make_tiny_model(layers=3)
    plan = random_plan(model, seed=2, scale=0.6)
    ids = torch.tensor([PROMPT + PROMPT[::-1]])  # (1, 80)
    mask = torch.zeros_like(ids, dtype=torch.uint8)
    mask[0, 40:] = 1
    text = {"input_ids": ids, "loss_mask": mask, "lengths": torch.tensor([ids.shape[1]])}

    class Tokens:  # chat_ids(tokenizer, prompt) -> the prompt's token ids
        def apply_chat_template(self, messages, **kwargs):
            return list(PROMPT)

    items = {"t": [EvalItem(task="t", prompt="p", answer="1", needle="")]}

    def expected() -> float:
        with torch.no_grad():
            logits = model(input_ids=ids, use_cache=False).logits[0, 39:-1].double()  # predicts tokens 40..79
        return math.exp(float(F.cross_entropy(logits, ids[0, 40:])))

    ppl = {}
    for name, chosen in (("dense", None), ("moa", plan)):
        run = run_method(model, Tokens(), Method(name, "", name, chosen), items, NO_END, 2, text=text, backend="cpu")
        ppl[name] = run.ppl
    assert ppl["dense"] == pytest.approx(expected(), rel=1e-4)
    with plan_applied(model, plan, backend="reference"):
        assert ppl["moa"] == pytest.approx(expected(), rel=1e-4)
    assert abs(ppl["moa"] - ppl["dense"]) > 1e-3 * ppl["dense"]  # the plan changes the model here
