"""Benchmark stage=rules' loss table and the optimize front on a Llama-3-8B-shaped synthetic instance.

    python scripts/bench_solver.py [--csv bench_solver.csv] [--tracking-uri sqlite:///bench.db] [--repeats 2]

1. Loss table: synthetic block influence for 32 layers x 32 heads at N = 2k, 4k, 8k, 16k (block 64), scored
   against 48 rules, plus the needed-span bisection at three coverages. Timed without generating the input.
2. Front: the table's loss and KV density go to ``solve_front`` (at most 2 rules per layer, 50% budget,
   ``--gap-rel`` per point) ``--repeats`` times per solver, HiGHS and CBC interleaved. Each run records wall
   time, MILP solves, Pareto points, time-limited points and the largest proven gap; one summary row per
   solver gives the median seconds and its ratio to the first solver. ``--group-size 4`` budgets the KV footprint
   of rules per query head on a GQA model (Llama-3-8B: 32 query heads, 8 KV heads), each KV head costing its
   group's largest density.
Rows go to a CSV and, with ``--tracking-uri``, one MLflow run each (measurements as metrics, settings as params).
"""

from __future__ import annotations

import argparse
import math
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from pipeline.io import write_csv
from pipeline.optimize.front import solve_front
from pipeline.rules.loss_table import BlockInfluence, rule_table

MEASURED = ("seconds", "pareto_points", "flagged", "max_gap")
"""Row fields logged as MLflow metrics (with ``ratio_vs_*``); the others are params."""


def synthetic_influence(layers: int, heads: int, n: int, block: int, seed: int, elastic_share: float) -> torch.Tensor:
    """``[L, H, nb, nb]`` block influence shaped like real attention.

    Every head keeps an attention sink (key block 0) and a local part decaying over its own reach (0.5 to 16
    blocks); most heads add only a faint long-range tail (1-5% of their mass), while an ``elastic_share`` of
    heads spread 40-90% of it over ``beta_h * N`` (``beta_h ~ Beta(2, 5)``), so their needed span grows with
    ``N``. The heads' character comes from ``seed`` alone, so it is the same at every length; only the
    per-block noise depends on ``n``.
    """
    gen = torch.Generator().manual_seed(seed)
    nb = math.ceil(n / block)
    reach = torch.exp(torch.empty(layers, heads, 1, 1).uniform_(math.log(0.5), math.log(16), generator=gen))
    beta = torch.from_numpy(np.random.default_rng(seed).beta(2.0, 5.0, (layers, heads, 1, 1))).float()
    elastic = torch.rand(layers, heads, 1, 1, generator=gen) < elastic_share
    spread = torch.where(elastic, torch.empty(layers, heads, 1, 1).uniform_(0.4, 0.9, generator=gen),
                         torch.empty(layers, heads, 1, 1).uniform_(0.01, 0.05, generator=gen))
    noise = torch.Generator().manual_seed(seed * 1_000_003 + n)
    d = (torch.arange(nb).view(nb, 1) - torch.arange(nb).view(1, nb)).clamp(min=0).float()  # (nb, nb)
    out = torch.empty(layers, heads, nb, nb)
    for layer in range(layers):  # (H, nb, nb) at a time keeps the peak memory at one copy of the result
        local = torch.exp(-d / reach[layer]).tril()
        local = local / local.sum(-1, keepdim=True)  # each query row's local mass sums to one
        wide = torch.exp(-d / (beta[layer] * nb + 1)).tril()
        wide = wide / wide.sum(-1, keepdim=True)
        shape = (1 - spread[layer]) * local + spread[layer] * wide
        out[layer] = (shape * torch.rand(heads, nb, nb, generator=noise) * 2).tril()
    out[..., 0] += 0.5 * out.sum(-1)  # an attention sink: key block 0 carries extra mass
    return out


def bench_rules(lengths, layers, heads, block, sink, min_span, elastic_share, seed=0) -> tuple[dict, pd.DataFrame]:
    betas = np.repeat(np.arange(8) / 8, 6)
    alphas = np.array([round(k * (1 - b) * lengths[0] / 6 / block) * block for b in np.arange(8) / 8 for k in range(1, 7)],
                      dtype=float)
    frames, seconds = [], 0.0
    for n in lengths:
        influence = synthetic_influence(layers, heads, n, block, seed, elastic_share)
        began = time.perf_counter()
        blocks = BlockInfluence.from_blocks(influence, n, block, sink)
        frames.append(rule_table(blocks, alphas, betas, min_span))
        for coverage in (0.9, 0.95, 0.99):
            blocks.needed_span(coverage)
        seconds += time.perf_counter() - began
        del influence
    table = pd.concat(frames, ignore_index=True)
    row = {"bench": "loss_table", "backend": "torch", "layers": layers, "heads": heads, "rules": len(alphas),
           "lengths": "/".join(map(str, lengths)), "seconds": round(seconds, 3), "rows": len(table)}
    return row, table


def bench_front(table: pd.DataFrame, solver: str, budget: float, max_rules: int, points: int, time_limit,
                gap_rel: float, group_size: int = 1) -> dict:
    """One ``solve_front`` call on the table's loss and KV density, timed end to end."""
    shape = (table["layer"].max() + 1, table["head"].max() + 1, table["rule"].max() + 1, table["length"].nunique())
    ordered = table.sort_values(["layer", "head", "rule", "length"])
    loss = ordered["loss"].to_numpy().reshape(shape)  # (L, H, R, T)
    kv = ordered["kv_density"].to_numpy().reshape(shape)
    began = time.perf_counter()
    front = solve_front(loss, kv, budget, max_rules, group_size=group_size, solver=solver, points=points,
                        time_limit=time_limit, gap_rel=gap_rel)
    seconds = time.perf_counter() - began
    gaps = [c.gap for c in front if c.gap is not None]
    return {"bench": "front_run", "backend": solver, "layers": shape[0], "heads": shape[1], "rules": shape[2],
            "lengths": str(shape[3]), "seconds": round(seconds, 3), "solves": points, "pareto_points": len(front),
            "flagged": sum(c.flagged for c in front), "max_gap": max(gaps) if gaps else float("nan"),
            "gap_rel": gap_rel, "time_limit": time_limit, "budget": budget, "max_rules_per_layer": max_rules,
            "group_size": group_size}


def summarise(runs: list[dict], solvers: list[str]) -> list[dict]:
    """One row per solver: median seconds over the repeats, every run's seconds, and the ratio to the first solver."""
    rows = []
    for solver in solvers:
        mine = [r for r in runs if r["backend"] == solver]
        rows.append({**mine[0], "bench": "front", "seconds": round(float(np.median([r["seconds"] for r in mine])), 3),
                     "seconds_runs": "/".join(f"{r['seconds']:.1f}" for r in mine), "repeats": len(mine),
                     "pareto_points": min(r["pareto_points"] for r in mine),
                     "flagged": max(r["flagged"] for r in mine), "max_gap": max(r["max_gap"] for r in mine)})
    for row in rows:
        row[f"ratio_vs_{solvers[0]}"] = round(row["seconds"] / rows[0]["seconds"], 2)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--csv", default="bench_solver.csv")
    parser.add_argument("--tracking-uri", default=None)
    parser.add_argument("--solvers", nargs="+", default=["highs", "cbc"])
    parser.add_argument("--lengths", nargs="+", type=int, default=[2048, 4096, 8192, 16384])
    parser.add_argument("--points", type=int, default=24)
    parser.add_argument("--time-limit", type=float, default=60.0)
    parser.add_argument("--gap-rel", type=float, default=1e-3, help="relative MIP gap per front point")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per solver; the CSV reports the median")
    parser.add_argument("--elastic-share", type=float, default=0.2, help="share of heads whose span grows with N")
    parser.add_argument("--group-size", type=int, default=1,
                        help="heads per KV head in the budget (1: the 32 heads are KV heads; 4: Llama-3-8B query heads)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    os.environ.setdefault("MOA_NO_PROGRESS", "1")

    rules_row, table = bench_rules(args.lengths, 32, 32, 64, 64, 64, args.elastic_share, args.seed)
    print(rules_row, flush=True)
    runs = []
    for _ in range(args.repeats):  # solvers interleaved, so a busy spell on the shared machine hits both
        for solver in args.solvers:
            runs.append(bench_front(table, solver, 0.5, 2, args.points, args.time_limit, args.gap_rel,
                                    args.group_size))
            print(runs[-1], flush=True)
    summary = summarise(runs, args.solvers)
    for row in summary:
        print(row, flush=True)
    rows = [rules_row, *summary, *runs]
    write_csv(args.csv, pd.DataFrame(rows))
    if args.tracking_uri:
        from pipeline.tracking import Tracker

        tracker = Tracker(args.tracking_uri, "moa-bench-solver", Path(args.csv).parent)
        for row in rows:
            with tracker.run(f"{row['bench']}:{row['backend']}") as run:
                measured = {k: float(v) for k, v in row.items() if k in MEASURED or k.startswith("ratio_vs_")}
                run.log_params({k: v for k, v in row.items() if k not in measured})
                run.log_metrics(measured)


if __name__ == "__main__":
    main()
