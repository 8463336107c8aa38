"""Optuna worker throughput: trials per minute of one adapter study with 1 worker, then with N, on one storage.

Each configuration gets a study of its own (``adapters.optuna.study_name=throughput-w<N>-<stamp>``) and runs
``stage=adapters adapters.optuna.worker=true`` in N processes started together, with the machine's cores split
between them (``OMP_NUM_THREADS``). Throughput is finished trials over the span from the first trial's start to
the last one's end, read from the study itself, so model loading is left out; the wall time of the whole
invocation is reported beside it. Results go to ``<run_dir>/scaling/optuna_workers.csv`` and to the MLflow
experiment ``moa-autotune-scaling``, with the ratio measured in the same run.

    .venv/bin/python scripts/worker_throughput.py --storage "$(bash scripts/postgres.sh url)/moa_optuna" \\
        --workers 1 2 --trials 6 -- model=smollm2 adapters.tasks=[arithmetic] adapters.steps=8
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pandas as pd

from pipeline import io
from pipeline.search.study import FINISHED, hide_password
from pipeline.tracking import Tracker, default_uri

REPO = Path(__file__).resolve().parents[1]


def run_workers(count: int, args, stamp: str) -> dict:
    name = f"throughput-w{count}-{stamp}"
    threads = max(1, (os.cpu_count() or 1) // count)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "MOA_NO_PROGRESS": "1"}
    command = [sys.executable, "-m", "pipeline.run", "stage=adapters", "adapters.plan=null",
               "adapters.optuna.worker=true", f"adapters.optuna.storage={args.storage}",
               f"adapters.optuna.study_name={name}", f"adapters.optuna.trials={args.trials}",
               f"adapters.optuna.startup_trials={args.trials}", "adapters.optuna.pruner=none",
               f"run_dir={args.run_dir}", *args.overrides]
    started = time.perf_counter()
    workers = [subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
               for _ in range(count)]
    outputs = [w.communicate()[0] for w in workers]
    wall = time.perf_counter() - started
    for worker, output in zip(workers, outputs, strict=True):
        if worker.returncode != 0:
            sys.exit(f"a worker failed (exit {worker.returncode}):\n{output}")
    studies = [s.study_name for s in optuna.get_all_study_summaries(args.storage) if s.study_name.startswith(name)
               and not s.study_name.endswith(":pruning")]
    study = optuna.load_study(study_name=studies[0], storage=args.storage)
    finished = study.get_trials(deepcopy=False, states=FINISHED)
    span = (max(t.datetime_complete for t in finished) - min(t.datetime_start for t in finished)).total_seconds()
    return {"workers": count, "threads_per_worker": threads, "trials": len(finished), "search_s": round(span, 1),
            "wall_s": round(wall, 1), "trials_per_min": round(60 * len(finished) / span, 3),
            "study": studies[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--storage", required=True, help="the study's RDB URL (PostgreSQL for several workers)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--trials", type=int, default=6)
    parser.add_argument("--run-dir", type=Path, default=Path("runs/throughput"))
    parser.add_argument("overrides", nargs="*", help="pipeline config overrides (after --)")
    args = parser.parse_args()
    stamp = time.strftime("%Y%m%d%H%M%S")
    print(f"storage {hide_password(args.storage)}; {args.trials} trials per configuration", flush=True)
    rows = []
    for count in args.workers:
        row = run_workers(count, args, stamp)
        rows.append(row)
        print(f"{count} worker(s): {row['trials']} trials in {row['search_s']} s "
              f"({row['trials_per_min']} trials/min; wall {row['wall_s']} s)", flush=True)
    frame = pd.DataFrame(rows)
    frame["speedup_vs_first"] = (frame["trials_per_min"] / frame["trials_per_min"].iloc[0]).round(3)
    out = args.run_dir / "scaling" / "optuna_workers.csv"
    io.write_csv(out, frame)
    tracker = Tracker(default_uri(args.run_dir), "moa-autotune-scaling", args.run_dir)
    with tracker.run("optuna_workers", tags={"overrides": " ".join(args.overrides)}) as run:
        run.log_params({"trials": args.trials, "storage": hide_password(args.storage)})
        for row in frame.itertuples():
            run.log_metrics({f"trials_per_min:w{row.workers}": row.trials_per_min,
                             f"speedup:w{row.workers}": row.speedup_vs_first})
        run.log_artifact(out)
    print(frame.to_string(index=False))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
