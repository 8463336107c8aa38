"""Benchmark stage=rules' loss table and the optimize front on a Llama-3-8B-shaped synthetic instance.

    python scripts/bench_solver.py [--csv bench_solver.csv] [--tracking-uri sqlite:///bench.db]

1. Loss table: synthetic block influence for 32 layers x 32 heads at N = 2k, 4k, 8k, 16k (block 64), scored
   against 48 rules, plus the needed-span bisection at three coverages. Timed without generating the input.
2. Front: the table's loss and KV density go to ``solve_front`` (at most 2 rules per layer, 50% budget) once per
   solver, HiGHS and CBC side by side. Each row records wall time, MILP solves, and Pareto points.
Rows go to a CSV and, with ``--tracking-uri``, one MLflow run each.
"""

from __future__ import annotations

import argparse
import math
import os
import time

import numpy as np
import pandas as pd
import torch

from pipeline.io import write_csv
from pipeline.optimize.front import solve_front
from pipeline.rules.loss_table import BlockInfluence, rule_table


def synthetic_influence(layers: int, heads: int, n: int, block: int, seed: int) -> torch.Tensor:
    """``[L, H, nb, nb]``: a local part decaying over a head's own reach, an elastic part over ``beta_h * N``."""
    torch.manual_seed(seed)  # torch.distributions samples from the global generator
    gen = torch.Generator().manual_seed(seed)
    nb = math.ceil(n / block)
    reach = torch.exp(torch.empty(layers, heads, 1, 1).uniform_(math.log(0.5), math.log(16), generator=gen))
    beta = torch.distributions.Beta(0.7, 3.0).sample((layers, heads, 1, 1))
    weight = torch.rand(layers, heads, 1, 1, generator=gen)
    d = (torch.arange(nb).view(nb, 1) - torch.arange(nb).view(1, nb)).clamp(min=0).float()  # (nb, nb)
    out = torch.empty(layers, heads, nb, nb)
    for layer in range(layers):  # (H, nb, nb) at a time keeps the peak memory at one copy of the result
        shape = weight[layer] * torch.exp(-d / reach[layer]) + (1 - weight[layer]) * torch.exp(-d / (beta[layer] * nb + 1))
        out[layer] = (shape * torch.rand(heads, nb, nb, generator=gen)).tril()
    out[..., 0] += 0.5 * out.sum(-1)  # an attention sink: key block 0 carries extra mass
    return out


def bench_rules(lengths, layers, heads, block, sink, min_span) -> tuple[dict, pd.DataFrame]:
    betas = np.repeat(np.arange(8) / 8, 6)
    alphas = np.array([round(k * (1 - b) * lengths[0] / 6 / block) * block for b in np.arange(8) / 8 for k in range(1, 7)],
                      dtype=float)
    frames, seconds = [], 0.0
    for n in lengths:
        influence = synthetic_influence(layers, heads, n, block, seed=n)
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


def bench_front(table: pd.DataFrame, solver: str, budget: float, max_rules: int, points: int, time_limit):
    shape = (table["layer"].max() + 1, table["head"].max() + 1, table["rule"].max() + 1, table["length"].nunique())
    ordered = table.sort_values(["layer", "head", "rule", "length"])
    loss = ordered["loss"].to_numpy().reshape(shape)
    kv = ordered["kv_density"].to_numpy().reshape(shape)
    began = time.perf_counter()
    front = solve_front(loss, kv, budget, max_rules, solver=solver, points=points, time_limit=time_limit)
    seconds = time.perf_counter() - began
    return {"bench": "front", "backend": solver, "layers": shape[0], "heads": shape[1], "rules": shape[2],
            "lengths": str(shape[3]), "seconds": round(seconds, 3), "solves": points, "pareto_points": len(front),
            "flagged": sum(c.flagged for c in front), "budget": budget, "max_rules_per_layer": max_rules}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--csv", default="bench_solver.csv")
    parser.add_argument("--tracking-uri", default=None)
    parser.add_argument("--solvers", nargs="+", default=["highs", "cbc"])
    parser.add_argument("--lengths", nargs="+", type=int, default=[2048, 4096, 8192, 16384])
    parser.add_argument("--points", type=int, default=24)
    parser.add_argument("--time-limit", type=float, default=60.0)
    args = parser.parse_args()
    os.environ.setdefault("MOA_NO_PROGRESS", "1")

    rules_row, table = bench_rules(args.lengths, 32, 32, 64, 64, 64)
    print(rules_row, flush=True)
    rows = [rules_row]
    for solver in args.solvers:
        rows.append(bench_front(table, solver, 0.5, 2, args.points, args.time_limit))
        print(rows[-1], flush=True)
    write_csv(args.csv, pd.DataFrame(rows))
    if args.tracking_uri:
        import mlflow

        mlflow.set_tracking_uri(args.tracking_uri)
        mlflow.set_experiment("moa-bench-solver")
        for row in rows:
            with mlflow.start_run(run_name=f"{row['bench']}:{row['backend']}"):
                mlflow.log_params({k: v for k, v in row.items() if k != "seconds"})
                mlflow.log_metric("seconds", row["seconds"])


if __name__ == "__main__":
    main()
