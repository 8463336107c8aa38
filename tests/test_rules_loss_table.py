"""stage=rules math: the diagonal-sum loss table against a token-level oracle, span scaling fits, the grid."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from kernels.pattern import span_at, token_mask
from pipeline.rules.grid import load_grid
from pipeline.rules.loss_table import BlockInfluence, band_pairs, rule_table
from pipeline.rules.scaling import fit_span_scaling

GRID = "search_spaces/elastic_rules.yaml"


def token_influence(blocks: torch.Tensor, n: int, block: int) -> torch.Tensor:
    """Expand ``[..., nb, nb]`` block influence uniformly over each block's causal token pairs: ``[..., n, n]``."""
    owner = torch.arange(n) // block  # token -> block
    causal = torch.ones(n, n).tril().bool()
    nb = blocks.shape[-1]
    pairs = torch.zeros(nb, nb)
    pairs.index_put_((owner.view(n, 1).expand(n, n)[causal], owner.view(1, n).expand(n, n)[causal]),
                     torch.ones(int(causal.sum())), accumulate=True)
    per_pair = blocks.double().tril() / pairs.double().clamp(min=1)
    return per_pair[..., owner.view(n, 1), owner.view(1, n)] * causal


def oracle_loss(blocks: torch.Tensor, n: int, block: int, sink: int, span: int) -> torch.Tensor:
    """Influence outside :func:`kernels.pattern.token_mask`, summed over explicit token pairs: ``[...]``."""
    return (token_influence(blocks, n, block) * ~token_mask(n, span, sink)).sum((-1, -2))


@settings(max_examples=40, deadline=None)
@given(delta=st.integers(-20, 40), rows=st.integers(0, 12), cols=st.integers(0, 12), span=st.integers(0, 60))
def test_band_pairs_counts_like_brute_force(delta, rows, cols, span):
    brute = sum(1 for a in range(rows) for c in range(cols) if 0 <= delta + a - c < span)
    assert band_pairs(torch.tensor(delta), torch.tensor(rows), torch.tensor(cols), torch.tensor(span)).item() == brute


@pytest.mark.parametrize(("n", "block", "sink"), [(256, 64, 64), (232, 16, 20), (100, 32, 0), (97, 8, 50),
                                                  (64, 64, 64), (130, 16, 200)])
def test_loss_per_rule_equals_token_level_oracle(n, block, sink):
    torch.manual_seed(n + block + sink)
    nb = math.ceil(n / block)
    blocks = torch.rand(2, 3, nb, nb)  # above-diagonal entries are noise the table must ignore
    influence = BlockInfluence.from_blocks(blocks, n, block, sink)
    spans = torch.tensor(sorted({1, 2, block - 1, block, block + 3, n // 3, n - 1, n}))
    got = influence.loss_per_rule(spans)  # (L, H, R)
    want = torch.stack([oracle_loss(blocks, n, block, sink, int(s)) for s in spans], dim=-1)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(influence.total, blocks.double().tril().sum((-1, -2)))


@settings(max_examples=15, deadline=None)
@given(n=st.integers(1, 150), block=st.sampled_from([4, 16, 32]), sink=st.integers(0, 70),
       coverage=st.sampled_from([0.5, 0.9, 0.99]), seed=st.integers(0, 100))
def test_needed_span_is_the_smallest_span_meeting_coverage(n, block, sink, coverage, seed):
    torch.manual_seed(seed)
    nb = math.ceil(n / block)
    blocks = torch.rand(1, 2, nb, nb) ** 4
    influence = BlockInfluence.from_blocks(blocks, n, block, sink)
    outside = torch.stack([oracle_loss(blocks, n, block, sink, s) for s in range(1, n + 1)], dim=-1)  # (1, 2, n)
    total = token_influence(blocks, n, block).sum((-1, -2))
    meets = outside <= (1 - coverage) * total.unsqueeze(-1) * (1 + 1e-9) + 1e-9
    want = meets.int().argmax(-1) + 1  # first span that meets it (span n always does)
    got = influence.needed_span(coverage)
    # Spans within float rounding of the threshold may land either side; the oracle is float64 too.
    assert ((got - want).abs() <= 1).all() and (got == want).float().mean() > 0.9


def test_fit_recovers_local_and_elastic_heads():
    lengths = [512, 1024, 2048, 4096]
    block, sink, fraction = 32, 0, 0.25
    needed = []
    for n in lengths:
        nb = n // block
        q = torch.arange(nb).view(nb, 1)
        k = torch.arange(nb).view(1, nb)
        local = (q - k <= 1).float()  # mass within one block of the diagonal
        elastic = (q - k == round(fraction * nb)).float()  # mass at a fixed fraction of N back
        blocks = torch.stack([local.tril(), elastic.tril()]).unsqueeze(0)  # (1, 2, nb, nb)
        needed.append(BlockInfluence.from_blocks(blocks, n, block, sink).needed_span(0.95).numpy())
    spans = np.stack(needed, axis=-1)  # (1, 2, T)
    alpha, beta, r2 = fit_span_scaling(lengths, spans)
    assert abs(beta[0, 0]) < 0.01 and spans[0, 0].max() <= 2 * block
    assert beta[0, 1] == pytest.approx(fraction, abs=0.02) and r2[0, 1] > 0.99


def test_fit_is_exact_on_a_line_and_constant_spans():
    alpha, beta, r2 = fit_span_scaling([100, 200, 400], np.array([[50.0, 80.0, 140.0], [64.0, 64.0, 64.0]]))
    np.testing.assert_allclose(alpha, [20.0, 64.0])
    np.testing.assert_allclose(beta, [0.3, 0.0], atol=1e-12)
    np.testing.assert_allclose(r2, [1.0, 1.0])


def test_default_grid_is_tens_of_valid_rules():
    lengths = [512, 1024, 2048]
    rules = load_grid(GRID, lengths, sink=64, min_span=64, block_size=64)
    assert 40 <= len(rules) <= 100
    assert len(set(rules)) == len(rules)
    assert any(r.alpha < 0 for r in rules) and {r.beta for r in rules} >= {0.0, 0.5, 1.0}
    for r in rules:
        assert all(1 <= r.alpha + r.beta * n <= (n if r.beta <= 1 else math.inf) for n in lengths)


@pytest.mark.parametrize(("lengths", "block"), [([512, 1024, 2048], 64), ([256, 512], 64), ([640, 1280], 64),
                                               ([32], 16), ([48, 96], 16)])
def test_default_grid_is_every_valid_block_multiple_from_each_slopes_lowest_alpha(lengths, block):
    """Oracle: brute force over every block multiple of alpha from -3 N_max to N_max and the file's slopes, with the
    spans evaluated through :func:`kernels.pattern.span_at`. The grid keeps exactly the rules whose raw span is at
    least 1 everywhere, that are not full at the shortest length unless ``beta <= 1`` (then never above ``N``), and
    whose alpha is at least the largest block multiple where the slope keeps ``min_span`` at the shortest length."""
    min_span = 64
    betas = yaml.safe_load(open(GRID))["beta"]
    shortest = lengths[0]
    least = min(min_span, shortest)  # the clamp's floor there: a length below min_span keeps everything

    def valid(a, b):
        raws = [a + b * n for n in lengths]
        if min(raws) < 1:
            return False
        if b > 1:  # a switch rule: narrower than full at the shortest length, after the clamp
            return max(raws[0], least) < shortest
        return all(r <= n for r, n in zip(raws, lengths, strict=True))

    expected = {(float(a), float(b)) for a in range(-3 * lengths[-1], lengths[-1] + 1, block) for b in betas
                if a >= (least - b * shortest) // block * block and valid(a, b)}
    rules = load_grid(GRID, lengths, sink=64, min_span=min_span, block_size=block)
    assert {(r.alpha, r.beta) for r in rules} == expected
    for beta in {r.beta for r in rules}:  # each slope's narrowest rule keeps the least it can at the shortest length
        narrowest = min(r.alpha for r in rules if r.beta == beta)
        assert span_at(narrowest, beta, shortest, min_span) == least
    switch = [r for r in rules if r.beta > 1]
    assert bool(switch) == (shortest > min_span), "switch rules exist where a head can be narrower than full"
    for r in switch:  # narrower than full at the shortest length, full from -alpha / (beta - 1) on
        assert span_at(r.alpha, r.beta, shortest, min_span) < shortest
        full_from = math.ceil(-r.alpha / (r.beta - 1))
        assert span_at(r.alpha, r.beta, full_from, min_span) == full_from
        assert span_at(r.alpha, r.beta, full_from - 1, min_span) < full_from - 1


def test_switch_rule_losses_are_the_full_rules_where_full_and_the_windows_where_narrow():
    """A rule above N (``beta > 1``) is clamped to full attention: in the loss table it costs what the full rule
    costs at lengths where it is full, and what its clamped window costs where it is narrow."""
    torch.manual_seed(0)
    frames = {}
    for n in (256, 512):
        nb = n // 64
        blocks = torch.rand(2, 3, nb, nb)
        frames[n] = (blocks, rule_table(BlockInfluence.from_blocks(blocks, n, 64, 64),
                                        np.array([-384.0, 0.0, 128.0]), np.array([2.0, 1.0, 0.0]), 64))
    at_256, at_512 = frames[256][1], frames[512][1]
    # (-384, 2): raw span 128 at 256 tokens (the window (128, 0)), 640 > 512 at 512 tokens (full)
    np.testing.assert_allclose(at_256[at_256.rule == 0].loss.to_numpy(), at_256[at_256.rule == 2].loss.to_numpy())
    np.testing.assert_allclose(at_512[at_512.rule == 0].loss.to_numpy(), at_512[at_512.rule == 1].loss.to_numpy())
    assert (at_512[at_512.rule == 0].loss == 0).all() and (at_256[at_256.rule == 0].loss > 0).any()
    np.testing.assert_allclose(at_512[at_512.rule == 0].kv_density, 1.0)
    want = oracle_loss(frames[256][0], 256, 64, 64, 128).numpy().ravel()
    np.testing.assert_allclose(at_256[at_256.rule == 0].loss.to_numpy(), want, rtol=1e-5)


def test_grid_with_an_invalid_rule_names_it(tmp_path):
    grid = tmp_path / "grid.yaml"
    grid.write_text("alpha: {start: 0, step_blocks: 4}\nbeta: [0.0]\nrules: [[0, 0.5], [900, 0.5]]\n")
    with pytest.raises(ValueError, match=r"alpha=900.0, beta=0.5.*1024"):
        load_grid(str(grid), [1024, 2048], sink=64, min_span=64, block_size=64)
    grid.write_text("alpha: {start: 0}\nbeta: [0.0]\nsink: 128\n")
    with pytest.raises(ValueError, match="sink=128"):
        load_grid(str(grid), [1024], sink=64, min_span=64, block_size=64)
    with pytest.raises(ValueError, match="not found"):
        load_grid(str(tmp_path / "absent.yaml"), [1024], sink=64, min_span=64, block_size=64)
