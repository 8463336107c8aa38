"""Whole-model latency of a run's selected plans against dense attention, measured side by side.

For each length, one random prompt of ``N - new`` tokens is generated greedily (``--new`` tokens, no end token),
in the evaluation's dtype (``evaluate.dtype``), with dense attention and with each budget's selected plan
(``validate/selected_<budget>.json``) applied through the ``auto`` backend, in interleaved rounds (dense, then
every plan, ``--rounds`` times after one untimed round).
Per plan and length it reports prefill and per-token decode time, and the speed-up over dense as the median of
the per-round ratios (above 1: the plan is faster), so load that drifts between rounds hits both alike.

Results go to ``<run_dir>/latency/plan_latency.csv`` and to the MLflow experiment ``moa-autotune-latency``.

    .venv/bin/python scripts/plan_latency.py --lengths 512 1024 2048 4096 -- run_dir=runs/smollm2
"""

from __future__ import annotations

import argparse
import statistics
import sys

import pandas as pd
import torch
from tqdm import tqdm

from kernels.bench import median_ratio
from pipeline import io
from pipeline.errors import UserError
from pipeline.evaluation.generation import timed_greedy
from pipeline.plan import load_plan, plan_attention_density, plan_kv_density
from pipeline.script_run import add_overrides, open_run
from pipeline.settings import DTYPES, budget_label
from pipeline.sparse_runtime import plan_applied_if
from pipeline.tracking import Tracker, default_uri

EXPERIMENT = "moa-autotune-latency"


def measure(model, plans: dict[str, object], n: int, new: int, rounds: int, seed: int) -> list[dict]:
    """Rows of one length: per method, median prefill ms, decode ms per token, and speed-ups over dense."""
    prompt = torch.randint(200, model.config.vocab_size - 200, (n - new,),
                           generator=torch.Generator().manual_seed(seed + n)).tolist()
    prefill: dict[str, list[float]] = {name: [] for name in ("dense", *plans)}  # ms per timed round
    decode: dict[str, list[float]] = {name: [] for name in prefill}  # ms per token per timed round
    for round_ in range(rounds + 1):  # round 0 is untimed: first-use costs
        for name in prefill:
            plan = plans.get(name)
            with plan_applied_if(model, plan, backend="auto"):
                gen = timed_greedy(model, prompt, new, set())
            if round_:
                prefill[name].append(gen.prefill_ms)
                decode[name].append(gen.decode_ms_per_token)
    rows = []
    for name in prefill:
        plan = plans.get(name)
        rows.append({
            "method": "dense" if plan is None else "moa", "budget": "" if plan is None else name, "seq_len": n,
            "rounds": rounds, "new_tokens": new,
            "kv_density": 1.0 if plan is None else plan_kv_density(plan, n),
            "attention_density": 1.0 if plan is None else plan_attention_density(plan, n),
            "prefill_ms": statistics.median(prefill[name]),
            "decode_ms_per_token": statistics.median(decode[name]),
            "prefill_speedup": median_ratio(prefill["dense"], prefill[name]),
            "decode_speedup": median_ratio(decode["dense"], decode[name]),
        })
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    parser.add_argument("--new", type=int, default=16, help="tokens generated per prompt (decode steps + 1)")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds after one untimed round")
    parser.add_argument("--seed", type=int, default=0)
    add_overrides(parser)
    args = parser.parse_args()
    try:
        run = open_run(args.overrides)
        settings, run_dir, artifacts, loaded = run.settings, run.run_dir, run.artifacts, run.loaded
        dtype = settings.evaluate.compute_dtype(settings.model.dtype, settings.run.torch_device())
        loaded.model.to(DTYPES[dtype])  # timed in the evaluation's dtype; the fingerprint is the loaded weights'
        too_long = [n for n in args.lengths if loaded.info.max_positions and n > loaded.info.max_positions]
        if too_long or min(args.lengths) <= args.new:
            raise UserError(f"--lengths: {(too_long or [min(args.lengths)])[0]} is outside ({args.new}, "
                            f"{loaded.info.max_positions}]")
        plans = {}
        for budget in (budget_label(b) for b in settings.optimize.budgets):
            path = artifacts.selected_plan_at(budget)
            if not path.is_file():
                raise UserError(f"{path}: no selected plan; run stage=validate on {run_dir} first")
            plans[budget] = load_plan(path, loaded.info)
    except (UserError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"timing in {dtype} (evaluate.dtype={settings.evaluate.dtype})", flush=True)
    rows = []
    for n in tqdm(args.lengths, desc="lengths"):
        rows += measure(loaded.model, plans, n, args.new, args.rounds, args.seed)
        for row in rows[-len(plans) - 1:]:
            print(f"N={n} {row['method']}{'@' + row['budget'] if row['budget'] else ''}: prefill "
                  f"{row['prefill_ms']:.0f} ms ({row['prefill_speedup']:.2f}x dense), decode "
                  f"{row['decode_ms_per_token']:.1f} ms/token ({row['decode_speedup']:.2f}x)", flush=True)
    frame = pd.DataFrame(rows).assign(dtype=dtype)
    out = run_dir / "latency" / "plan_latency.csv"
    io.write_csv(out, frame)
    tracker = Tracker(default_uri(run_dir), EXPERIMENT, run_dir)
    with tracker.run("plan_latency", tags={"threads": str(torch.get_num_threads())}) as run:
        run.log_params({"lengths": list(args.lengths), "new_tokens": args.new, "rounds": args.rounds, "dtype": dtype})
        run.log_metrics({f"{metric}:{row.budget or 'dense'}:{row.seq_len}": getattr(row, metric)
                         for row in frame.itertuples() for metric in ("prefill_speedup", "decode_speedup",
                                                                       "prefill_ms", "decode_ms_per_token")})
        run.log_artifact(out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
