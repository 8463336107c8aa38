"""stage=benchmark end to end at a tiny size: the CSV, one MLflow run per row, and config errors."""

from __future__ import annotations

import mlflow
import pandas as pd
import pytest
import torch

from kernels import bench
from kernels.pattern import kept_pairs
from kernels.reference import moa_attention_reference
from pipeline.errors import UserError
from pipeline.run import compose, main
from pipeline.settings import bench_settings
from tests.pipeline_helpers import run_stage

QUICK = ("stage=benchmark", "benchmark.seq_lens=[200]", "benchmark.densities=[0.25,0.5]", "benchmark.repeats=2",
         "benchmark.decode_repeats=3", "benchmark.error_rows=16", "benchmark.heads=4", "benchmark.kv_heads=2",
         "benchmark.head_dim=16", "sparse.sink=4")


def test_benchmark_stage_writes_csv_and_logs_every_row(tmp_path):
    assert run_stage(tmp_path, *QUICK, "benchmark.backends=[dense,cpu]") == {"benchmark": "ran"}
    rows = pd.read_csv(tmp_path / "bench" / "kernels.csv")
    prefill = rows[rows.section == "prefill"]
    assert sorted(prefill.backend) == ["cpu", "cpu", "dense"]
    sparse = prefill[prefill.backend == "cpu"]
    assert (sparse.max_abs_err < 1e-5).all()  # vs dense masked attention on sampled rows
    for _, row in sparse.iterrows():
        span = max(1, round(row.density * 200))
        pairs = kept_pairs(200, span, 4)
        assert row.ideal_speedup == pytest.approx(200 * 201 / 2 / pairs)
        assert row.fraction_of_ideal == pytest.approx(row.speedup_vs_dense / row.ideal_speedup)
        assert row.latency_ms_p20 <= row.latency_ms_p50 <= row.latency_ms_p80
    decode = rows[rows.section == "decode"]
    assert list(decode.backend) == ["decode-torch-dense", "decode-torch", "decode-torch"]
    assert (decode.max_abs_err < 1e-5).all()
    # KV bytes: sum over KV heads of min(sink + span, N) * head_dim * 2 (K and V) * 4 bytes
    assert decode.kv_cache_mb.iloc[1] * 2**20 == 2 * (4 + 50) * 16 * 2 * 4
    # the real per-head cache allocates the plan's KV density times the dense bytes (target: within 2%)
    assert ((decode.kv_bytes_vs_density - 1).abs() < 0.02).all()

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments, filter_string="params.section = 'prefill'")
    assert len(runs) == len(prefill)
    for run in runs:
        assert {"backend", "device", "dtype", "seq_len", "density", "batch", "heads", "head_dim"} <= run.data.params.keys()
        assert {"latency_ms_p50", "latency_ms_p20", "latency_ms_p80", "speedup_vs_dense"} <= run.data.metrics.keys()
        # the dense row has no error (NaN is not logged); the sparse rows do
        assert ("max_abs_err" in run.data.metrics) == (run.data.params["backend"] != "dense")


@pytest.mark.parametrize("override,key", [
    ("benchmark.backends=[dense,warp]", "benchmark.backends"),
    ("benchmark.densities=[2.0]", "benchmark.densities"),
    ("benchmark.dtype=int8", "benchmark.dtype"),
    ("benchmark.kv_heads=3", "benchmark.heads"),
])
def test_benchmark_bad_values_name_the_key(override, key):
    with pytest.raises(UserError, match=key):
        bench_settings(compose(["model=tiny", *QUICK, override]))


def test_benchmark_bad_value_exits_2_with_one_line(tmp_path, capsys):
    assert main(["model=tiny", f"run_dir={tmp_path}", *QUICK, "benchmark.backends=[warp]"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "benchmark.backends" in err[0]


def test_timing_percentiles_are_ordered_and_rows_reference_is_exact():
    stats = bench.time_ms(lambda: torch.ones(10).sum(), warmup=1, repeats=7, device=torch.device("cpu"))
    assert stats["latency_ms_p20"] <= stats["latency_ms_p50"] <= stats["latency_ms_p80"]
    q, k, v = torch.randn(1, 4, 90, 16), torch.randn(1, 2, 90, 16), torch.randn(1, 2, 90, 16)
    spans, rows = torch.tensor([3, 90, 20, 1]), torch.tensor([0, 5, 44, 89])
    expected = moa_attention_reference(q, k, v, spans, 5)[:, :, rows]
    torch.testing.assert_close(bench.masked_rows_reference(q, k, v, spans, 5, rows), expected)
    assert bench.uniform_spans(100, 0.004, 2).tolist() == [1, 1]  # never a zero span


@pytest.mark.slow
def test_benchmark_stage_with_compiled_flex(tmp_path):
    """FlexAttention compiles for ~1 minute on CPU: same mask, so its error must be small too."""
    assert run_stage(tmp_path, *QUICK, "benchmark.backends=[dense,flex,cpu]") == {"benchmark": "ran"}
    rows = pd.read_csv(tmp_path / "bench" / "kernels.csv")
    flex = rows[rows.backend == "flex"]
    assert len(flex) == 2 and (flex.max_abs_err < 1e-4).all()
    assert rows[rows.backend == "cpu"].speedup_vs_flex.notna().all()


def test_prefill_speedups_are_medians_of_per_round_ratios(monkeypatch):
    """A fake clock and scripted backends: dense and cpu alternate each round, and speed-ups are the median of the
    per-round ratios (2.0 here), not the ratio of the medians (1.0), which load drifting between rounds skews."""
    durations = {"dense": [10.0, 20.0, 10.0, 40.0, 10.0], "cpu": [7.0, 5.0, 20.0, 2.0, 10.0, 10.0]}  # cpu: +error
    clock, calls = [0.0], []

    def fake_prefill_fn(backend, q, k, v, spans, sink):
        out = moa_attention_reference(q, k, v, spans, sink) if spans is not None else q

        def call():
            calls.append(backend)
            clock[0] += durations[backend][calls.count(backend) - 1] / 1e3
            return out
        return call

    monkeypatch.setattr(bench, "_prefill_fn", fake_prefill_fn)
    monkeypatch.setattr(bench, "time", type("FakeTime", (), {"perf_counter": staticmethod(lambda: clock[0])}))
    s = bench_settings(compose(["model=tiny", *QUICK, "benchmark.backends=[dense,cpu]", "benchmark.warmup=0",
                               "benchmark.repeats=5", "benchmark.densities=[0.25]"]))
    dense, cpu = bench.prefill_rows(s)
    assert calls == ["cpu"] + ["dense", "cpu"] * 5  # error check, then round-robin
    assert cpu["speedup_vs_dense"] == pytest.approx(2.0)  # ratios 2, 1, 5, 4, 1
    assert cpu["latency_ms_p50"] == pytest.approx(10.0) and dense["latency_ms_p50"] == pytest.approx(10.0)
    assert cpu["fraction_of_ideal"] == pytest.approx(2.0 / cpu["ideal_speedup"])
    assert dense["speedup_vs_dense"] == 1.0 and cpu["max_abs_err"] < 1e-6


def test_kv_bytes_vs_density_measures_the_cache_against_the_formula(monkeypatch):
    """``kv_bytes_vs_density`` divides the cache's allocated bytes by the KV density formula's bytes, computed from
    the spans alone: 1 for the real cache, and (sink + S + 8) / (sink + S) for one that keeps 8 spare slots per KV
    head."""
    s = bench_settings(compose(["model=tiny", *QUICK, "benchmark.densities=[0.25]", "benchmark.warmup=0",
                               "benchmark.decode_repeats=1"]))
    dense, sparse = bench.decode_rows(s)
    assert dense["kv_bytes_vs_density"] == pytest.approx(1.0) and sparse["kv_bytes_vs_density"] == pytest.approx(1.0)

    class Padded(bench.PerHeadLayer):
        def __init__(self, query_spans, kv_spans, *args, **kwargs):
            super().__init__(query_spans, kv_spans + 8, *args, **kwargs)

    monkeypatch.setattr(bench, "PerHeadLayer", Padded)
    dense, sparse = bench.decode_rows(s)
    assert dense["kv_bytes_vs_density"] == pytest.approx(1.0)  # capped at the total length either way
    assert sparse["kv_bytes_vs_density"] == pytest.approx((4 + 50 + 8) / (4 + 50))


def test_decode_times_dense_and_sparse_caches_side_by_side(monkeypatch):
    """Every decode timing call holds the dense cache and the sparse ones, so their ratio is measured round-robin."""
    calls = []
    real = bench.interleaved_ms

    def recording(fns, *args):
        calls.append(sorted(fns))
        return real(fns, *args)

    monkeypatch.setattr(bench, "interleaved_ms", recording)
    s = bench_settings(compose(["model=tiny", *QUICK, "benchmark.densities=[0.25,0.5]", "benchmark.warmup=0",
                               "benchmark.decode_repeats=2"]))
    rows = bench.decode_rows(s)
    assert calls == [[0.25, 0.5, 1.0]] * len(s.decode_seq_lens) * len(s.decode_backends)
    assert len(rows) == 3 * len(s.decode_seq_lens) * len(s.decode_backends)
