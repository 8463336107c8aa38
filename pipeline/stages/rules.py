"""stage=rules: from profile/influence_<N>.safetensors, the optimiser's loss table and per-head span scaling.

Writes ``rules/loss_table.parquet`` (one row per layer, head, rule and profile length: ``layer, head, rule, alpha,
beta, length, loss, kv_density, attention_density``; ``loss`` is the influence mass outside the rule's token
mask: of the net influence clamped at 0 by default, of the absolute one with ``rules.influence=abs``; see
:mod:`pipeline.rules.loss_table` for how partly kept blocks are apportioned) and
``rules/head_scaling.csv`` (per head and coverage: the needed span at each length and its ``alpha + beta*N`` fit).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from pipeline.errors import UserError
from pipeline.io import write_csv, write_parquet
from pipeline.rules.figures import beta_histogram, span_vs_length
from pipeline.rules.grid import load_grid
from pipeline.rules.loss_table import BlockInfluence, rule_table
from pipeline.rules.scaling import head_scaling_table
from pipeline.stages.registry import stage

INFLUENCE_TENSORS = {"net": "net_influence", "abs": "influence"}
"""``rules.influence`` -> the tensor of ``profile/influence_<N>.safetensors`` the loss table is built from."""


def load_influence(ctx, n: int, block_size: int, sink: int, kind: str = "net") -> BlockInfluence:
    """``profile/influence_<n>.safetensors`` reduced to diagonal sums: the net block sums clamped at 0 (a block
    whose masking would lower the loss costs nothing), or the absolute ones."""
    influence, _ = ctx.artifacts.load_influence(n, block_size, INFLUENCE_TENSORS[kind])
    if kind == "net":
        influence = influence.clamp(min=0)
    return BlockInfluence.from_blocks(influence, n, block_size, sink)


@stage("rules", requires=("profile",), config_keys=("sparse", "rules", "profile"),
       outputs=("rules/",), uses_model=False)
def run_rules(ctx):
    """Score every elastic rule on every head at every profile length, and fit per-head span scaling."""
    sparse, settings = ctx.settings.sparse, ctx.settings.rules
    sink, min_span, block = sparse.sink, sparse.min_span, sparse.block_size
    coverages, report = list(settings.coverages), settings.report_coverage
    lengths = list(settings.lengths)
    try:
        rules = load_grid(settings.grid, lengths, sink=sink, min_span=min_span, block_size=block)
    except ValueError as err:
        raise UserError(str(err)) from None
    alphas = np.array([r.alpha for r in rules])
    betas = np.array([r.beta for r in rules])
    ctx.log_params({"num_rules": len(rules), "planned_lengths": lengths, "grid_file": settings.grid})

    frames, needed = [], {c: {} for c in coverages}
    for n in ctx.progress(lengths, desc="rules"):
        blocks = load_influence(ctx, n, block, sink, settings.influence)
        frames.append(rule_table(blocks, alphas, betas, min_span))
        for coverage in coverages:
            needed[coverage][n] = blocks.needed_span(coverage)
    table = pd.concat(frames, ignore_index=True)
    scaling = head_scaling_table(needed)
    write_parquet(ctx.artifacts.loss_table, table)
    write_csv(ctx.artifacts.head_scaling, scaling)
    ctx.log_artifact(ctx.artifacts.head_scaling)

    shown = scaling[scaling["coverage"] == report]
    local = int((shown["beta"] < settings.local_beta).sum())
    summary = {"rules": len(rules), "local_heads": local, "elastic_heads": len(shown) - local,
               "median_beta": float(shown["beta"].median()), "mean_r2": float(shown["r2"].mean())}
    ctx.log_metrics(summary)
    ctx.log_figure(span_vs_length(scaling, lengths, report), "needed_span_vs_length.png")
    ctx.log_figure(beta_histogram(scaling), "beta_histogram.png")
    return summary
