"""Peak memory and time of attention-influence profiling, side by side, each in a fresh subprocess.

Three methods on one sample per length (random tokens, the last quarter marked as the response):

- ``plain``: forward+backward of the same response loss with SDPA attention and parameter gradients,
  i.e. one ordinary training step's worth of work (the reference the targets are stated against);
- ``blockwise``: :func:`pipeline.profile.attention_influence` (SDPA pass with q/k/v/dO capture, then the
  blockwise recomputation);
- ``naive``: :func:`pipeline.profile.naive_attention_influence` (eager attention, every layer's ``A`` and
  ``dL/dA`` held at once).

Peak RSS is ``ru_maxrss`` of the worker process; ``peak_delta_mb`` subtracts the RSS right after the model was
loaded. Wall time and process CPU time (user + system) are both reported: on a shared machine the CPU time
is the steadier of the two. A naive run whose ``A`` and ``dL/dA`` alone (``2 L Hq N^2`` floats) would not fit under
``--memory-limit-gb`` is skipped and recorded with its estimate instead of risking the OOM killer.

    .venv/bin/python scripts/bench_profile.py --lengths 1024 2048 4096 --csv runs/bench/profile_bench.csv
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
METHODS = ("plain", "blockwise", "naive")


def rss_mb() -> float:
    """Current resident set size of this process in MiB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def cpu_seconds() -> float:
    """User + system CPU time of this process: steadier than wall time on a shared machine."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def load(args):
    """The model from ``--model-path`` or the pipeline's model config ``--model`` (e.g. smollm2, tiny)."""
    from hydra import compose, initialize_config_dir

    from pipeline.models import load_model

    overrides = [f"model={args.model}"] + ([f"model.path={args.model_path}"] if args.model_path else [])
    with initialize_config_dir(config_dir=str(REPO / "pipeline" / "conf"), version_base=None):
        cfg = compose(config_name="config", overrides=overrides)
    return load_model(cfg.model)


def sample(n: int, vocab: int, response: float):
    """Seeded random token ids ``[n]`` and a loss mask over the last ``response`` fraction."""
    import torch

    gen = torch.Generator().manual_seed(n)
    ids = torch.randint(0, vocab, (n,), generator=gen)
    mask = torch.zeros(n, dtype=torch.uint8)
    mask[n - max(1, int(response * n)):] = 1
    return ids, mask


def run_method(method: str, model, ids, mask, block_size: int) -> None:
    from pipeline.profile import attention_influence, naive_attention_influence
    from pipeline.profile.loss import response_loss

    if method == "plain":
        model.zero_grad(set_to_none=True)
        response_loss(model, ids, mask).backward()
        model.zero_grad(set_to_none=True)
    elif method == "blockwise":
        attention_influence(model, ids, mask, block_size, "kv_head")
    else:
        naive_attention_influence(model, ids, mask, block_size, "kv_head")


def worker(args) -> None:
    """Measure one (method, length) in this process; print one JSON line."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = load(args)
    model, info = loaded.model, loaded.info
    estimate = naive_estimate_gb(args.length, info)
    if args.worker == "naive" and estimate > args.memory_limit_gb:
        status = f"skipped: A and dL/dA alone need {estimate:.1f} GB > limit {args.memory_limit_gb:.1f} GB"
        print(json.dumps({"method": args.worker, "seq_len": args.length, "model": info.name, "status": status}))
        return
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    model.set_attn_implementation("sdpa")
    warm_ids, warm_mask = sample(128, model.config.vocab_size, args.response)
    run_method(args.worker, model, warm_ids.to(device), warm_mask.to(device), args.block_size)
    ids, mask = sample(args.length, model.config.vocab_size, args.response)
    ids, mask = ids.to(device), mask.to(device)
    base = rss_mb()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    seconds, cpu = [], []
    for _ in range(args.repeats):
        start, start_cpu = time.perf_counter(), cpu_seconds()
        run_method(args.worker, model, ids, mask, args.block_size)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
        cpu.append(cpu_seconds() - start_cpu)
    row = {"method": args.worker, "seq_len": args.length, "model": info.name, "device": device.type,
           "threads": torch.get_num_threads(), "repeats": args.repeats, "seconds_median": statistics.median(seconds),
           "seconds_min": min(seconds), "cpu_seconds_median": statistics.median(cpu), "peak_rss_mb": peak_rss_mb(), "rss_after_load_mb": base,
           "peak_delta_mb": peak_rss_mb() - base, "status": "ok"}
    if device.type == "cuda":
        row["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    print(json.dumps(row), flush=True)


def naive_estimate_gb(n: int, info) -> float:
    """GiB of every layer's ``A`` and ``dL/dA`` in float32, the naive method's unavoidable floor."""
    return 2 * info.num_layers * info.num_heads * n * n * 4 / 2**30


def available_gb() -> float:
    with open("/proc/meminfo") as f:
        fields = dict(line.split(":", 1) for line in f)
    return int(fields["MemAvailable"].split()[0]) / 2**20


def measure(args, method: str, n: int, limit_gb: float) -> dict:
    """Run one worker subprocess and return its JSON row (or a failure row)."""
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", method, "--length", str(n),
               "--model", args.model, "--block-size", str(args.block_size), "--response", str(args.response),
               "--repeats", str(args.repeats), "--memory-limit-gb", str(limit_gb), "--threads", str(args.threads)]
    if args.model_path:
        command += ["--model-path", args.model_path]
    env = {**os.environ, "MOA_NO_PROGRESS": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO)
    if done.returncode != 0:
        tail = done.stderr.strip().splitlines()[-1:] or [f"exit status {done.returncode}"]
        return {"method": method, "seq_len": n, "status": f"failed: {tail[0]}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def add_ratios(rows: list[dict]) -> None:
    """Time and peak-memory ratios against ``plain`` at the same length."""
    plain = {r["seq_len"]: r for r in rows if r["method"] == "plain" and r["status"] == "ok"}
    for row in rows:
        ref = plain.get(row["seq_len"])
        if ref and row["status"] == "ok":
            row["time_vs_plain"] = row["seconds_median"] / ref["seconds_median"]
            row["cpu_time_vs_plain"] = row["cpu_seconds_median"] / ref["cpu_seconds_median"]
            row["peak_rss_vs_plain"] = row["peak_rss_mb"] / ref["peak_rss_mb"]
            row["peak_delta_vs_plain"] = row["peak_delta_mb"] / ref["peak_delta_mb"]


def log_mlflow(rows: list[dict], uri: str, csv_path: Path) -> None:
    from pipeline.tracking import Tracker

    tracker = Tracker(uri, "bench_profile", csv_path.parent)
    with tracker.run("bench_profile") as parent:
        for row in rows:
            with tracker.run(f"{row['method']}@{row['seq_len']}", parent=parent) as run:
                run.log_params({k: row[k] for k in ("method", "seq_len", "status") if k in row})
                run.log_metrics({k: float(v) for k, v in row.items() if isinstance(v, (int, float)) and k != "seq_len"})
        parent.log_artifact(csv_path)


def parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096])
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--model", default="smollm2", help="a pipeline/conf/model/<name>.yaml config")
    parser.add_argument("--model-path", default=None, help="any local HF checkpoint directory instead")
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--response", type=float, default=0.25, help="fraction of tokens in the loss")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per worker (median reported)")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch intra-op threads per worker (0: torch's default); 1 is steadier on a shared box")
    parser.add_argument("--memory-limit-gb", type=float, default=None,
                        help="skip naive runs whose estimate exceeds this (default: 60%% of MemAvailable)")
    parser.add_argument("--csv", type=Path, default=REPO / "runs" / "bench" / "profile_bench.csv")
    parser.add_argument("--tracking-uri", default=None, help="log every row to MLflow at this URI")
    parser.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--length", type=int, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main() -> None:
    args = parse()
    sys.path.insert(0, str(REPO))
    if args.worker:
        worker(args)
        return
    import pandas as pd

    from pipeline.io import write_csv

    rows = []
    for n in args.lengths:
        for method in args.methods:
            limit = args.memory_limit_gb if args.memory_limit_gb is not None else 0.6 * available_gb()
            row = measure(args, method, n, limit)
            print(json.dumps(row), flush=True)
            rows.append(row)
    add_ratios(rows)
    frame = pd.DataFrame(rows)
    write_csv(args.csv, frame)
    print(frame.to_string(index=False))
    if args.tracking_uri:
        log_mlflow(rows, args.tracking_uri, args.csv)


if __name__ == "__main__":
    main()
