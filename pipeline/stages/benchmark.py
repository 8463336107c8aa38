"""stage=benchmark: time the sparse kernels against dense attention and FlexAttention; log every row."""

from __future__ import annotations

import pandas as pd
import torch

from kernels import bench
from pipeline import io
from pipeline.errors import UserError
from pipeline.stages.registry import stage

CPU_SEQ_LENS = (1024, 2048, 4096, 8192, 16384)
GPU_SEQ_LENS = (1024, 4096, 16384, 65536, 131072)
PARAMS = ("backend", "device", "dtype", "seq_len", "density", "batch", "heads", "head_dim", "kv_heads", "sink",
          "section")
METRICS = ("latency_ms_p50", "latency_ms_p20", "latency_ms_p80", "speedup_vs_dense", "speedup_vs_flex",
           "ideal_speedup", "fraction_of_ideal", "max_abs_err", "gflops", "attention_density", "kv_cache_mb", "kv_bytes_vs_density")


def settings_from(cfg) -> bench.BenchSettings:
    """Validate ``cfg.benchmark`` and resolve its device-dependent defaults."""
    b = cfg.benchmark
    device = torch.device("cuda" if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("device: cuda requested but CUDA is not available")
    seq_lens = tuple(int(n) for n in (b.seq_lens or (GPU_SEQ_LENS if device.type == "cuda" else CPU_SEQ_LENS)))
    if not seq_lens or min(seq_lens) < 1:
        raise UserError(f"benchmark.seq_lens: bad value {list(seq_lens)} (expected positive integers)")
    densities = tuple(float(f) for f in b.densities)
    if not densities or not all(0 < f < 1 for f in densities):
        raise UserError(f"benchmark.densities: bad value {list(densities)} (expected fractions in (0, 1))")
    dtype = {"auto": torch.bfloat16 if device.type == "cuda" else torch.float32, "float32": torch.float32,
             "float16": torch.float16, "bfloat16": torch.bfloat16}.get(str(b.dtype))
    if dtype is None:
        raise UserError(f"benchmark.dtype: bad value {b.dtype!r} (expected auto, float32, float16 or bfloat16)")
    if int(b.heads) < 1 or int(b.kv_heads) < 1 or int(b.heads) % int(b.kv_heads):
        raise UserError(f"benchmark.heads: {b.heads} must be a positive multiple of benchmark.kv_heads ({b.kv_heads})")
    for key in ("batch", "head_dim", "repeats", "decode_repeats", "error_rows"):
        if int(b[key]) < 1:
            raise UserError(f"benchmark.{key}: bad value {b[key]!r} (expected an integer >= 1)")
    try:
        backends = bench.available_backends(b.backends, device, bench.PREFILL_BACKENDS)
        decode_backends = bench.available_backends(b.decode_backends, device, bench.DECODE_BACKENDS)
    except ValueError as err:
        raise UserError(f"benchmark.backends: {err}") from None
    return bench.BenchSettings(
        seq_lens=seq_lens, densities=densities, backends=backends,
        decode_seq_lens=tuple(int(n) for n in (b.decode_seq_lens or seq_lens)), decode_backends=decode_backends,
        batch=int(b.batch), heads=int(b.heads), kv_heads=int(b.kv_heads), head_dim=int(b.head_dim),
        sink=int(cfg.sparse.sink), dtype=dtype, device=device, warmup=int(b.warmup), repeats=int(b.repeats),
        decode_repeats=int(b.decode_repeats), error_rows=int(b.error_rows), seed=int(cfg.seed),
    )


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
    settings = settings_from(ctx.cfg)
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
