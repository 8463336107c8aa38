"""stage=rules: from profile/influence_<N>.safetensors, the optimiser's loss table and per-head span scaling.

Writes ``rules/loss_table.parquet`` (one row per layer, head, rule and profile length: ``layer, head, rule, alpha,
beta, length, loss, kv_density, attention_density``; ``loss`` is the influence mass outside the rule's token
mask, see :mod:`pipeline.rules.loss_table` for how partly kept blocks are apportioned) and
``rules/head_scaling.csv`` (per head and coverage: the needed span at each length and its ``alpha + beta*N`` fit).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from pipeline.artifacts import profile_lengths
from pipeline.errors import UserError
from pipeline.io import write_csv, write_parquet
from pipeline.rules.figures import beta_histogram, span_vs_length
from pipeline.rules.grid import load_grid
from pipeline.rules.loss_table import BlockInfluence, rule_table
from pipeline.rules.scaling import head_scaling_table
from pipeline.stages.registry import stage


def load_influence(ctx, n: int, block_size: int, sink: int) -> BlockInfluence:
    """``profile/influence_<n>.safetensors`` reduced to diagonal sums."""
    influence, _ = ctx.artifacts.load_influence(n, block_size)
    return BlockInfluence.from_blocks(influence, n, block_size, sink)


@stage("rules", requires=("profile",), config_keys=("sparse", "rules", "profile"),
       outputs=("rules/",), uses_model=False)
def run_rules(ctx):
    """Score every elastic rule on every head at every profile length, and fit per-head span scaling."""
    cfg = ctx.cfg
    sink, min_span, block = int(cfg.sparse.sink), int(cfg.sparse.min_span), int(cfg.sparse.block_size)
    coverages = [float(c) for c in cfg.rules.coverages]
    report = float(cfg.rules.report_coverage)
    if not coverages or not all(0 < c < 1 for c in coverages) or report not in coverages:
        raise UserError(f"rules.coverages must be fractions in (0, 1) that include rules.report_coverage={report}")
    lengths = profile_lengths(cfg)
    rules = load_grid(str(cfg.rules.grid), lengths, sink=sink, min_span=min_span, block_size=block)
    alphas = np.array([r.alpha for r in rules])
    betas = np.array([r.beta for r in rules])
    ctx.log_params({"num_rules": len(rules), "planned_lengths": lengths, "grid_file": cfg.rules.grid})

    frames, needed = [], {c: {} for c in coverages}
    for n in ctx.progress(lengths, desc="rules"):
        blocks = load_influence(ctx, n, block, sink)
        frames.append(rule_table(blocks, alphas, betas, min_span))
        for coverage in coverages:
            needed[coverage][n] = blocks.needed_span(coverage)
    table = pd.concat(frames, ignore_index=True)
    scaling = head_scaling_table(needed)
    write_parquet(ctx.artifacts.loss_table, table)
    write_csv(ctx.artifacts.head_scaling, scaling)
    ctx.log_artifact(ctx.artifacts.head_scaling)

    shown = scaling[scaling["coverage"] == report]
    local = int((shown["beta"] < float(cfg.rules.local_beta)).sum())
    summary = {"rules": len(rules), "local_heads": local, "elastic_heads": len(shown) - local,
               "median_beta": float(shown["beta"].median()), "mean_r2": float(shown["r2"].mean())}
    ctx.log_metrics(summary)
    ctx.log_figure(span_vs_length(scaling, lengths, report), "needed_span_vs_length.png")
    ctx.log_figure(beta_histogram(scaling), "beta_histogram.png")
    return summary
