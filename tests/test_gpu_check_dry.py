"""The GPU check's CPU rehearsal: ``bash scripts/gpu_check.sh --dry`` runs every part at tiny shapes with Hydra,
OmegaConf, MLflow, PuLP, Optuna and psycopg unimportable (as on the GPU machine), and writes the CSVs the GPU run
writes, with the same columns, finite numbers and ``mode == "dry"``. Also: the compiled FlexAttention block masks
the benchmark relies on equal the eager ones."""

from __future__ import annotations

import csv
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow  # the whole script at tiny shapes: about 2 min on 2 cores

REPO = Path(__file__).resolve().parents[1]
ABSENT_ON_GPU_MACHINE = ("hydra", "omegaconf", "mlflow", "pulp", "optuna", "psycopg", "psycopg2")
COLUMNS = {
    "tests": ["mode", "test", "outcome", "seconds", "message"],
    "prefill": ["mode", "seq_len", "plan", "backend", "batch", "q_heads", "kv_heads", "head_dim", "sink", "dtype",
                "kept_pairs", "dense_pairs", "attention_density", "ms_median", "ms_min", "reps", "tflops",
                "speedup_vs_cudnn", "ideal_speedup", "fraction_of_ideal", "ratio_vs_flex", "max_abs_err",
                "lowp_ref_err", "err_ok", "err_rows", "status", "note"],
    "decode": ["mode", "seq_len", "batch", "kv_density", "backend", "q_heads", "kv_heads", "head_dim", "sink", "dtype",
               "kv_bytes", "ms_median", "ms_min", "reps", "tbps", "speedup_vs_dense", "ideal_speedup",
               "fraction_of_ideal", "max_abs_err", "lowp_ref_err", "err_ok", "status", "note"],
    "e2e": ["mode", "method", "layers", "prompt_len", "batch", "new_tokens", "kv_density", "prefill_s", "total_s",
            "tokens_per_s", "decode_tokens_per_s", "kv_cache_gib", "peak_mem_gib", "status", "note"],
}
FINITE = {  # columns that must hold a finite number in every row (ratio_vs_flex: in the Triton rows)
    "prefill": ["kept_pairs", "dense_pairs", "attention_density", "ms_median", "tflops", "speedup_vs_cudnn",
                "ideal_speedup", "fraction_of_ideal", "max_abs_err", "lowp_ref_err"],
    "decode": ["kv_bytes", "ms_median", "tbps", "speedup_vs_dense", "ideal_speedup", "fraction_of_ideal",
               "max_abs_err"],
    "e2e": ["kv_density", "prefill_s", "total_s", "tokens_per_s", "decode_tokens_per_s", "kv_cache_gib"],
}


def read(path: Path) -> tuple[list[str], list[dict]]:
    with path.open() as handle:
        reader = csv.DictReader(handle)
        return list(reader.fieldnames or []), list(reader)


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """One dry run of the shell script, with the GPU machine's missing packages blocked in every Python it starts."""
    out = tmp_path_factory.mktemp("gpu_check")
    block = tmp_path_factory.mktemp("block")
    (block / "sitecustomize.py").write_text(
        "import sys\n"
        f"for name in {ABSENT_ON_GPU_MACHINE!r}:\n"
        "    sys.modules[name] = None  # importing it raises ModuleNotFoundError\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "GPU_CHECK_DRY")}
    # Plugin autoload off: hydra-core is installed here and registers a pytest plugin, whose package pytest would
    # inspect in sys.modules; on the GPU machine hydra-core is not installed at all.
    env.update(OUT=str(out), PYTHON=sys.executable, PYTHONPATH=str(block), PYTEST_DISABLE_PLUGIN_AUTOLOAD="1")
    done = subprocess.run(["bash", "scripts/gpu_check.sh", "--dry"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    return out, done


def test_dry_run_succeeds_without_the_packages_the_gpu_machine_lacks(dry_run):
    out, done = dry_run
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    summary = (out / "summary.md").read_text()
    assert "DRY RUN" in summary and "parts failed: none" in summary and "incomplete (time budget): none" in summary


@pytest.mark.parametrize("part", list(COLUMNS))
def test_dry_run_csv_columns_and_numbers(dry_run, part):
    out, _ = dry_run
    columns, rows = read(out / f"{part}.csv")
    assert columns == COLUMNS[part]
    assert rows and all(r["mode"] == "dry" for r in rows)
    if part == "tests":  # without CUDA every gpu test is collected, then skipped
        assert all(r["outcome"] == "skipped" and "needs CUDA" in r["message"] for r in rows), rows
        return
    assert all(r["status"] == "ok" for r in rows), [r["status"] for r in rows]
    for row in rows:
        assert all(math.isfinite(float(row[c])) for c in FINITE[part]), row
    if part != "e2e":
        assert all(r["err_ok"] == "True" for r in rows), [(r["backend"], r["max_abs_err"]) for r in rows]
    if part == "prefill":
        assert {r["backend"] for r in rows} == {"cudnn", "flash", "triton", "flex"}
        assert {r["plan"] for r in rows} == {"dense", "uniform_n/4", "uniform_n/8", "mixed"}
        assert all(math.isfinite(float(r["ratio_vs_flex"])) for r in rows if r["backend"] == "triton")
    if part == "decode":
        eager = {"sdpa_dense", "packed_triton", "flex"}
        graphed = {"sdpa_dense_graph", "packed_triton_graph", "packed_triton_graph_separate", "packed_triton_graph_4sm",
                   "packed_triton_graph_8sm"}
        assert {r["backend"] for r in rows} == eager | graphed
        assert all(("CUDA" in r["note"]) == (r["backend"] in graphed) for r in rows), [r["note"] for r in rows]
    if part == "e2e":
        assert [r["method"] for r in rows] == ["dense", "moa_uniform"]


def test_compiled_block_masks_equal_eager():
    """``torch.compile(create_block_mask)`` (what large masks and CUDA use) builds the same blocks as the eager
    builder, for prefill and for one decode query."""
    from kernels.flex import sink_band_block_mask, sink_band_decode_block_mask

    spans = (40, 100, 7, 130)
    for build in (sink_band_block_mask, sink_band_decode_block_mask):
        eager, compiled = (build(130, spans, 4, "cpu", compiled=c) for c in (False, True))
        assert torch.equal(eager.to_dense(), compiled.to_dense())
        assert torch.equal(eager.kv_num_blocks, compiled.kv_num_blocks)
