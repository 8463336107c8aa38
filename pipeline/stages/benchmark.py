"""stage=benchmark: time the sparse kernels against dense attention and FlexAttention; log every row."""

from __future__ import annotations

import pandas as pd
import torch

from kernels import bench
from pipeline import io
from pipeline.stages.registry import stage

PARAMS = ("backend", "device", "dtype", "seq_len", "density", "batch", "heads", "head_dim", "kv_heads", "sink",
          "section")
METRICS = ("latency_ms_p50", "latency_ms_p20", "latency_ms_p80", "speedup_vs_dense", "speedup_vs_flex",
           "ideal_speedup", "fraction_of_ideal", "max_abs_err", "gflops", "attention_density", "kv_cache_mb", "kv_bytes_vs_density")


def log_row(ctx, row: dict) -> None:
    """One nested MLflow run per benchmark row, with the tracking contract's params and metrics."""
    name = f"{row['section']}:{row['backend']} N={row['seq_len']} d={row['density']}"
    with ctx.child_run(name, tags={"kind": "benchmark_row"}) as run:
        run.log_params({key: row[key] for key in PARAMS})
        run.log_metrics({key: float(row[key]) for key in METRICS if row[key] == row[key]})  # NaN: not applicable


@stage("benchmark", requires=(), config_keys=("benchmark", "sparse"), outputs=("bench/",),
       uses_model=False, device_bound=True)
def run_benchmark(ctx):
    """Benchmark sparse prefill and decode kernels against dense SDPA and compiled FlexAttention."""
    settings = ctx.settings.benchmark
    ctx.log_params({"bench_device": settings.device.type, "bench_dtype": str(settings.dtype),
                    "bench_threads": torch.get_num_threads()})
    rows = bench.prefill_rows(settings, lambda grid: ctx.progress(grid, desc="benchmark prefill"))
    rows += bench.decode_rows(settings, lambda grid: ctx.progress(grid, desc="benchmark decode"))
    for row in rows:
        log_row(ctx, row)
    path = ctx.artifacts.bench_csv
    io.write_csv(path, pd.DataFrame(rows))
    ctx.log_artifact(path)
    print(bench.format_table(rows), flush=True)
    sparse = [r for r in rows if r["section"] == "prefill" and r["backend"] in ("cpu", "triton")]
    best = max(sparse, key=lambda r: r["fraction_of_ideal"], default=None)
    return {"rows": len(rows), "csv": str(path),
            "best_fraction_of_ideal": best["fraction_of_ideal"] if best else None}
