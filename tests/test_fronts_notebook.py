"""notebooks/fronts.ipynb on a synthetic run directory: every plotted point is one measured row, on one device.

The run directory holds a real MLflow SQLite store (an optimize run with nested plan-candidate runs, as
``stage=optimize`` and ``stage=validate`` log them), ``validate/results.csv`` and a ``bench/kernels.csv`` with
rows from two devices whose latencies differ. A cell prepended to the notebook records, from matplotlib itself,
every data-coordinate point of every figure the notebook renders; the test then matches each point to the rows
it was built from.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import mlflow
import nbformat
import pandas as pd
import pytest
from nbclient import NotebookClient

REPO = Path(__file__).resolve().parents[1]
PROFILE_LENGTHS = (512, 1024)
VALIDATION_LENGTH = 768

# (kv_density, attention_density, influence_loss) per profile length, then val_ppl and kv_density at 768
CANDIDATES = [
    {"kv_density:512": 0.91, "attention_density:512": 0.83, "influence_loss:512": 0.011,
     "kv_density:1024": 0.62, "attention_density:1024": 0.47, "influence_loss:1024": 0.052,
     "val_ppl": 3.17, f"kv_density:{VALIDATION_LENGTH}": 0.733},
    {"kv_density:512": 0.71, "attention_density:512": 0.59, "influence_loss:512": 0.043,
     "kv_density:1024": 0.44, "attention_density:1024": 0.31, "influence_loss:1024": 0.137,
     "val_ppl": 3.41, f"kv_density:{VALIDATION_LENGTH}": 0.538},
    {"kv_density:512": 0.53, "attention_density:512": 0.41, "influence_loss:512": 0.109,
     "kv_density:1024": 0.29, "attention_density:1024": 0.19, "influence_loss:1024": 0.318,
     "val_ppl": 4.06, f"kv_density:{VALIDATION_LENGTH}": 0.377},
]
VALIDATION = [
    {"plan": "dense", "length": VALIDATION_LENGTH, "kv_density": 1.0, "val_ppl": 2.98, "ppl_ratio_vs_dense": 1.0},
    *({"plan": f"plan_{i}.json", "length": VALIDATION_LENGTH, "kv_density": c[f"kv_density:{VALIDATION_LENGTH}"],
       "val_ppl": c["val_ppl"], "ppl_ratio_vs_dense": c["val_ppl"] / 2.98} for i, c in enumerate(CANDIDATES)),
    {"plan": "uniform@best_density", "length": VALIDATION_LENGTH, "kv_density": 0.741, "val_ppl": 5.23,
     "ppl_ratio_vs_dense": 5.23 / 2.98},
]


def bench_rows(device: str, dtype: str, sparse_backend: str, seq_lens, scale: float, offset: float) -> list[dict]:
    """Prefill rows of dense, flex and one sparse backend on one device, with device-specific latencies."""
    rows = []
    for n in seq_lens:
        dense_ms = scale * (n / 1024) ** 2 + offset
        for backend, fraction in [("dense", 1.0)] + [(b, f) for b in ("flex", sparse_backend) for f in (0.125, 0.25)]:
            attention = 1.0 if backend == "dense" else round(fraction * (2 - fraction) + 64 / n, 6)
            ms = dense_ms * (1.0 if backend == "dense" else attention * (1.3 if backend == "flex" else 1.1)) + offset / 7
            rows.append({
                "section": "prefill", "backend": backend, "device": device, "dtype": dtype, "seq_len": n,
                "density": fraction, "span": int(fraction * n), "sink": 64, "batch": 1, "heads": 8, "kv_heads": 2,
                "head_dim": 64, "attention_density": attention, "latency_ms_p50": ms, "latency_ms_p20": ms * 0.97,
                "latency_ms_p80": ms * 1.05, "speedup_vs_dense": dense_ms / ms, "speedup_vs_flex": float("nan"),
                "ideal_speedup": 1 / attention, "fraction_of_ideal": dense_ms / ms * attention, "max_abs_err": 1e-6,
                "gflops": 1.0 + ms, "kv_cache_mb": float("nan"), "kv_bytes_vs_density": float("nan"),
            })
    return rows


CPU_ROWS = bench_rows("cpu", "float32", "cpu", (1024, 2048), scale=40.0, offset=3.1)
CUDA_ROWS = bench_rows("cuda", "bfloat16", "triton", (1024, 4096, 16384), scale=0.21, offset=0.017)

# Which row column an axis label claims (the first matching phrase wins).
AXIS_COLUMNS = [
    ("kv density", r"kv_density(:\d+)?"), ("attention density", r"attention_density(:\d+)?"),
    ("influence loss", r"influence_loss(:\d+)?"), ("perplexity", r"val_ppl"), ("latency", r"latency_ms_p\d+"),
    ("speed-up", r"speedup_vs_dense"), ("sequence length", r"seq_len"),
]

RECORDER = '''
import json as _json
import math as _math
from matplotlib.backend_bases import FigureCanvasBase as _Canvas

_print_figure = _Canvas.print_figure


def _record_and_print(self, *args, **kwargs):
    fig = self.figure
    suptitle = fig._suptitle.get_text() if fig._suptitle is not None else ""
    with open({path!r}, "a") as out:
        for ax in fig.axes:
            artists = [(line, line.get_xydata(), line.get_transform()) for line in ax.lines]
            artists += [(c, c.get_offsets(), c.get_offset_transform()) for c in ax.collections]
            for artist, points, transform in artists:
                if transform is not ax.transData:
                    continue  # reference lines in axes coordinates (axhline)
                for x, y in points:
                    if _math.isfinite(float(x)) and _math.isfinite(float(y)):
                        out.write(_json.dumps({{"title": ax.get_title(), "suptitle": suptitle, "xlabel": ax.get_xlabel(),
                                                "ylabel": ax.get_ylabel(), "label": str(artist.get_label()),
                                                "x": float(x), "y": float(y)}}) + "\\n")
    return _print_figure(self, *args, **kwargs)


_Canvas.print_figure = _record_and_print
'''


def write_run_dir(run_dir: Path) -> None:
    """The synthetic run: MLflow store with plan-candidate runs, validation results, two-device kernel rows."""
    (run_dir / "validate").mkdir(parents=True)
    (run_dir / "bench").mkdir()
    mlflow.set_tracking_uri(f"sqlite:///{run_dir}/mlflow.db")
    experiment = mlflow.create_experiment("moa-autotune", artifact_location=(run_dir / "mlartifacts").as_uri())
    with mlflow.start_run(experiment_id=experiment, run_name="pipeline"):
        with mlflow.start_run(experiment_id=experiment, run_name="optimize", nested=True):
            for i, metrics in enumerate(CANDIDATES):
                with mlflow.start_run(experiment_id=experiment, run_name=f"plan_{i}", nested=True):
                    mlflow.set_tags({"kind": "plan_candidate", "plan_index": str(i)})
                    mlflow.log_params({"plan": str(run_dir / "plans" / f"plan_{i}.json")})
                    mlflow.log_metrics(metrics)
    pd.DataFrame(VALIDATION).to_csv(run_dir / "validate" / "results.csv", index=False)
    pd.DataFrame(CPU_ROWS + CUDA_ROWS).to_csv(run_dir / "bench" / "kernels.csv", index=False)


def execute_notebook(run_dir: Path, points_path: Path, monkeypatch, device: str | None) -> list[dict]:
    """Run the notebook on ``run_dir`` with the recorder cell first; the recorded points."""
    notebook = nbformat.read(REPO / "notebooks" / "fronts.ipynb", as_version=4)
    notebook.cells.insert(0, nbformat.v4.new_code_cell(RECORDER.format(path=str(points_path))))
    monkeypatch.setenv("MOA_RUN_DIR", str(run_dir))
    if device is None:
        monkeypatch.delenv("MOA_DEVICE", raising=False)
    else:
        monkeypatch.setenv("MOA_DEVICE", device)
    monkeypatch.delenv("MOA_DTYPE", raising=False)
    client = NotebookClient(notebook, timeout=120, kernel_name="python3",
                            resources={"metadata": {"path": str(REPO / "notebooks")}})
    client.execute()
    return [json.loads(line) for line in points_path.read_text().splitlines()] if points_path.is_file() else []


def measured_rows() -> list[tuple[str | None, dict]]:
    """Every measured row as (device or None, {column: number})."""
    rows = [(None, dict(c)) for c in CANDIDATES]
    rows += [(None, {k: v for k, v in r.items() if isinstance(v, int | float)}) for r in VALIDATION]
    rows += [(r["device"], {k: v for k, v in r.items() if isinstance(v, int | float)}) for r in CPU_ROWS + CUDA_ROWS]
    return rows


def claimed_column(label: str) -> str:
    for phrase, pattern in AXIS_COLUMNS:
        if phrase in label.lower():
            return pattern
    raise AssertionError(f"axis label {label!r} names no measured column")


def matches(point: dict, rows) -> list[str | None]:
    """Devices of the rows holding the point's x and y in the columns its axis labels claim."""
    x_col, y_col = claimed_column(point["xlabel"]), claimed_column(point["ylabel"])

    def has(row, pattern, value):
        return any(re.fullmatch(pattern, k) and math.isclose(v, value, rel_tol=1e-9, abs_tol=1e-12)
                   for k, v in row.items() if v == v)

    return [device for device, row in rows if has(row, x_col, point["x"]) and has(row, y_col, point["y"])]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("fronts") / "runs"
    write_run_dir(path)
    return path


@pytest.mark.parametrize(("device", "shown", "dtype"), [(None, "cuda", "bfloat16"), ("cpu", "cpu", "float32")])
def test_fronts_plot_only_measured_rows_of_one_device(run_dir, tmp_path, monkeypatch, device, shown, dtype):
    points = execute_notebook(run_dir, tmp_path / "points.jsonl", monkeypatch, device)
    assert points, "the notebook rendered no figure"
    rows = measured_rows()
    measured = [p for p in points if not p["label"].startswith("derived:")]
    for point in measured:
        devices = matches(point, rows)
        assert devices, f"plotted point is no measured row (interpolated or mislabelled axis): {point}"
        assert None in devices or shown in devices, f"point from another device than {shown}: {point}"

    kernel_points = [p for p in measured if any(d is not None for d in matches(p, rows))]
    chosen = [r for r in (CPU_ROWS + CUDA_ROWS) if r["device"] == shown]
    for point in kernel_points:
        assert shown in point["title"] and dtype in point["title"], f"title must name device and dtype: {point}"
    sparse = [r for r in chosen if r["backend"] not in ("dense",)]
    speedups = {(p["x"], p["y"]) for p in kernel_points if "speed-up" in p["ylabel"].lower()}
    assert {(float(r["seq_len"]), r["speedup_vs_dense"]) for r in sparse} <= speedups, "every measured speed-up is shown"
    assert len({p["title"] for p in kernel_points}) >= 2, "speed-up and latency figures"

    plan_points = {(p["x"], p["y"]) for p in measured if "influence loss" in p["ylabel"].lower()}
    assert {(c[f"kv_density:{n}"], c[f"influence_loss:{n}"]) for c in CANDIDATES for n in PROFILE_LENGTHS} == plan_points
