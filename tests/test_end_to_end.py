"""The whole pipeline on the tiny model: stage=all, validation's choice, MLflow records, and the notebook."""

from __future__ import annotations

import json
import os
from pathlib import Path

import mlflow
import nbformat
import pandas as pd
import pytest
from nbclient import NotebookClient

from pipeline.plan import kv_density, load_plan
from tests.pipeline_helpers import run_stage

REPO = Path(__file__).resolve().parents[1]
QUICK_BENCH = ("benchmark.seq_lens=[512]", "benchmark.repeats=2", "benchmark.backends=[dense,cpu]", "benchmark.decode_repeats=3")


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("e2e") / "runs"
    outcome = run_stage(run_dir, "stage=all", *QUICK_BENCH)
    return run_dir, outcome


def test_stage_all_runs_every_implemented_stage_then_skips(full_run):
    run_dir, outcome = full_run
    for name in ("calibrate", "profile", "rules", "optimize", "validate", "benchmark"):
        assert outcome[name] == "ran", outcome
    assert all(v == "unavailable" for k, v in outcome.items() if k in ("evaluate", "adapters"))
    again = run_stage(run_dir, "stage=all", *QUICK_BENCH)
    assert {k: v for k, v in again.items() if v != "unavailable"} == dict.fromkeys(
        ("calibrate", "profile", "rules", "optimize", "validate", "benchmark"), "skipped")


def test_validation_selects_the_lowest_perplexity_candidate(full_run):
    run_dir, _ = full_run
    results = pd.read_csv(run_dir / "validate" / "results.csv")
    candidates = results[results["plan"].str.startswith("plan_")]
    assert len(candidates) == len(list((run_dir / "plans").glob("plan_*.json")))
    best = candidates.loc[candidates["val_ppl"].idxmin(), "plan"]
    selected = load_plan(run_dir / "plan.json")
    assert selected.to_dict() == load_plan(run_dir / "plans" / best).to_dict()
    length = int(results["length"].iloc[0])
    assert length not in selected.profile_lengths
    uniform = results[results["plan"].str.startswith("uniform")].iloc[0]
    assert abs(uniform["kv_density"] - kv_density(selected, length)) < 0.02  # baseline at the same density


def test_candidate_runs_carry_their_validation_perplexity(full_run):
    run_dir, _ = full_run
    mlflow.set_tracking_uri(f"sqlite:///{run_dir.resolve()}/mlflow.db")
    runs = mlflow.search_runs(experiment_names=["moa-autotune"], filter_string="tags.kind = 'plan_candidate'")
    front = json.loads((run_dir / "optimize" / "front.json").read_text())
    assert len(runs) == len(front["plans"])
    results = pd.read_csv(run_dir / "validate" / "results.csv").set_index("plan")
    for _, run in runs.iterrows():
        plan_name = Path(run["params.plan"]).name
        assert run["metrics.val_ppl"] == pytest.approx(results.loc[plan_name, "val_ppl"])
        assert any(c.startswith("metrics.influence_loss:") for c in runs.columns)


def test_fronts_notebook_executes_on_the_run(full_run, monkeypatch):
    run_dir, _ = full_run
    notebook = nbformat.read(REPO / "notebooks" / "fronts.ipynb", as_version=4)
    monkeypatch.setenv("MOA_RUN_DIR", str(run_dir))
    client = NotebookClient(notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(REPO / "notebooks")}})
    client.execute()
    text = "".join(o.get("text", "") for cell in notebook.cells if cell.cell_type == "code" for o in cell.get("outputs", []))
    assert "candidate plans at lengths" in text and "no plan candidates yet" not in text
    images = [o for cell in notebook.cells for o in cell.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(images) >= 3, "Pareto front, validation and benchmark figures"
    assert os.environ.get("MOA_RUN_DIR") == str(run_dir)
