"""The validation shortlist: the front plans nearest the ideal point, not the extreme plan of one length."""

from __future__ import annotations

import random

from pipeline.stages.validate import shortlist

LENGTHS = [512, 1024, 2048]


def _entry(name: str, *losses: float) -> dict:
    return {"plan": name, **{f"influence_loss@{n}": loss for n, loss in zip(LENGTHS, losses, strict=True)}}


def test_a_balanced_plan_beats_the_extreme_plan_of_the_longest_length():
    front = [
        _entry("best_at_2048", 0.30, 0.20, 0.10),   # ratios to the ideal (0.10, 0.10, 0.10): 3, 2, 1
        _entry("best_at_512", 0.10, 0.25, 0.30),    # 1, 2.5, 3
        _entry("balanced", 0.15, 0.12, 0.13),       # 1.5, 1.2, 1.3
        _entry("best_at_1024", 0.22, 0.10, 0.20),   # 2.2, 1, 2
    ]
    assert [e["plan"] for e in shortlist(front, LENGTHS, 2)] == ["balanced", "best_at_1024"]


def test_no_plan_left_out_is_nearer_the_ideal_than_one_taken():
    rng = random.Random(0)
    for _ in range(50):
        front = [_entry(f"p{i}", *(rng.uniform(0.01, 1.0) for _ in LENGTHS)) for i in range(rng.randint(1, 12))]
        size = rng.randint(1, 5)
        taken = shortlist(front, LENGTHS, size)
        assert len(taken) == min(size, len(front))
        ideal = [min(e[f"influence_loss@{n}"] for e in front) for n in LENGTHS]

        def worst(e, ideal=ideal):
            return max(e[f"influence_loss@{n}"] / best for n, best in zip(LENGTHS, ideal, strict=True))

        left_out = [e for e in front if e not in taken]
        if left_out:
            assert max(worst(e) for e in taken) <= min(worst(e) for e in left_out)


def test_an_empty_front_gives_an_empty_shortlist():
    assert shortlist([], LENGTHS, 3) == []
