"""The whole pipeline on the tiny model: stage=all, validation's choice, MLflow records, and the notebook."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import mlflow
import nbformat
import pandas as pd
import pytest
import torch
from nbclient import NotebookClient
from safetensors.torch import load_file

from kernels.pattern import span_at
from pipeline.plan import load_plan, plan_kv_density
from pipeline.report import final_summary
from pipeline.run import compose
from pipeline.settings import native_bfloat16
from tests.pipeline_helpers import run_stage

REPO = Path(__file__).resolve().parents[1]
QUICK_BENCH = ("benchmark.seq_lens=[512]", "benchmark.repeats=2", "benchmark.backends=[dense,cpu]", "benchmark.decode_repeats=3")
# Calibrated at three lengths but profiled at two: the unseen validation length (the midpoint of the two longest
# profile lengths, 1152) is a calibration length, so held-out and calibration samples of one length exist side by side.
LENGTHS = ("calibration.lengths=[768,1152,1536]", "profile.lengths=[768,1536]", "evaluate.lengths=[768]",
           "evaluate.samples=1", "evaluate.max_new_tokens=4", "adapters.optuna.trials=2")
STAGES = ("calibrate", "profile", "rules", "optimize", "validate", "evaluate", "benchmark", "adapters")
VALIDATION_LENGTH = 1152
EVAL_DTYPE = "bfloat16" if native_bfloat16(torch.device("cpu")) else "float32"
"""What evaluate.dtype=auto resolves to here, from the CPU's capability alone."""


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("e2e") / "runs"
    outcome = run_stage(run_dir, "stage=all", *LENGTHS, *QUICK_BENCH)
    return run_dir, outcome


def test_stage_all_runs_every_implemented_stage_then_skips(full_run):
    run_dir, outcome = full_run
    assert outcome == dict.fromkeys(STAGES, "ran"), outcome
    again = run_stage(run_dir, "stage=all", *LENGTHS, *QUICK_BENCH)
    assert again == dict.fromkeys(STAGES, "skipped")


def test_adapters_run_with_the_selected_plan_beside_dense(full_run):
    """adapters.plan=selected (the default): the base model and the final model (the most accurate Pareto
    composition, retrained for adapters.final_steps) are also scored with validate's plan of the first budget
    applied; model=tiny also retrains that composition with the plan."""
    import json

    import optuna
    import pandas as pd

    run_dir, _ = full_run
    frame = pd.read_csv(run_dir / "adapters" / "results.csv").set_index("name")
    assert "base+plan" in frame.index and frame.loc["base+plan", "kind"] == "baseline"
    assert frame.loc["final", "kind"] == "final"
    for name in ("final+plan", "final@plan"):
        assert frame.loc[name, "composition"] == frame.loc["final", "composition"]
        assert frame.loc[name, "trainable_params"] == frame.loc["final", "trainable_params"]
        assert frame.loc[name, "steps"] == frame.loc["final", "steps"]
    storage = f"sqlite:///{run_dir}/optuna.db"
    name = next(s.study_name for s in optuna.get_all_study_summaries(storage) if not s.study_name.endswith(":pruning"))
    pareto = optuna.load_study(study_name=name, storage=storage).best_trials
    best = max(pareto, key=lambda t: (t.values[0], -t.values[1]))
    assert frame.loc["final", "composition"] == frame.loc[f"trial_{best.number}", "composition"]
    for name in ("final", "final+plan"):
        config = json.loads((run_dir / "adapters" / name / "adapter_config.json").read_text())
        assert config["composition"] == best.user_attrs["composition"]
    scored = "final@plan"  # the dense-trained adapters themselves, scored under the plan: not retrained
    assert frame.loc[scored, "train_s"] == 0.0
    assert not (run_dir / "adapters" / scored).exists()  # nothing saved: the weights are the final model's


def test_evaluation_covers_every_method_budget_task_and_length(full_run):
    run_dir, _ = full_run
    frame = pd.read_csv(run_dir / "eval" / "results.csv", dtype={"budget": str}).fillna({"budget": ""})
    assert list(frame.columns) == ["method", "budget", "plan_id", "task", "seq_len", "n", "accuracy", "acc_lo",
                                   "acc_hi", "agree_dense", "kl_dense", "ppl", "prefill_ms", "decode_ms_per_token",
                                   "kv_bytes", "kv_density", "attention_density", "prefill_speedup",
                                   "decode_speedup"]
    cells = {(r.method, r.budget, r.task, r.seq_len) for r in frame.itertuples()}
    methods = {("dense", "")} | {(m, b) for m in ("moa", "binary", "uniform") for b in ("0.5", "0.25")}
    tasks = ("passkey", "var_tracking", "multi_doc_qa")
    assert cells == {(m, b, t, n) for m, b in methods for t in tasks for n in (768,)}
    assert ((frame["acc_lo"] <= frame["accuracy"]) & (frame["accuracy"] <= frame["acc_hi"])).all()
    dense = frame[frame["method"] == "dense"]
    assert (dense["agree_dense"] == 1).all() and (dense["kl_dense"] == 0).all() and (dense["kv_density"] == 1).all()
    assert (dense["prefill_speedup"] == 1).all()  # dense against itself, prompt by prompt
    assert (frame["prefill_speedup"] > 0).all() and (frame["decode_speedup"].dropna() > 0).all()
    for (method, budget, n), rows in frame[frame["method"] != "dense"].groupby(["method", "budget", "seq_len"]):
        selected = load_plan(run_dir / "validate" / f"selected_{budget}.json")
        if method == "moa":  # densities recomputed from the plan file
            assert rows["plan_id"].iloc[0] == f"selected_{budget}.json"
            assert rows["kv_density"].iloc[0] == pytest.approx(plan_kv_density(selected, n))
        moa = frame[(frame["method"] == "moa") & (frame["budget"] == budget) & (frame["seq_len"] == n)]
        gap = moa["kv_density"].iloc[0] - rows["kv_density"].iloc[0]
        if method == "uniform":  # a single window at the MoA plan's KV density at this length
            assert abs(gap) < 2 / n
        if method == "binary":  # solved at this length: as many full heads as the MoA plan's density leaves room for
            full, window = map(int, re.fullmatch(r"binary_full(\d+)_window(\d+)", rows["plan_id"].iloc[0]).groups())
            assert (full, rows["kv_density"].iloc[0]) == pytest.approx(
                _most_full_heads(selected, window, n, moa["kv_density"].iloc[0]))
        assert (rows["kl_dense"] >= 0).all()
    # Dense's KV bytes are its cache's: K and V for every layer and KV head, of the prompt and the fed response
    # tokens, in the dtype evaluate.dtype=auto resolves to on this machine (bfloat16 where the CPU has bf16 units).
    tiny = compose(["model=tiny"]).model
    itemsize = getattr(torch, EVAL_DTYPE).itemsize
    per_token = 2 * tiny.num_layers * tiny.num_kv_heads * (tiny.hidden_size // tiny.num_heads) * itemsize
    for row in dense.itertuples():
        assert row.kv_bytes % per_token == 0 and row.seq_len - 64 <= row.kv_bytes // per_token <= row.seq_len
    # KV bytes are what the cache held: a plan's bytes against dense's follow its KV density.
    for row in frame[frame["method"] == "moa"].itertuples():
        dense_bytes = dense[(dense["task"] == row.task) & (dense["seq_len"] == row.seq_len)]["kv_bytes"].iloc[0]
        assert row.kv_bytes / dense_bytes == pytest.approx(row.kv_density, rel=0.05)


def test_validation_selects_per_budget_from_a_shortlist_by_perplexity_within_a_tie_tolerance(full_run):
    run_dir, _ = full_run
    results = pd.read_csv(run_dir / "validate" / "results.csv", dtype={"budget": str})
    front = json.loads((run_dir / "optimize" / "front.json").read_text())["plans"]
    budgets = sorted({e["budget"] for e in front}, key=float, reverse=True)
    assert budgets == ["0.5", "0.25"]
    length = int(results["length"].iloc[0])
    assert length == VALIDATION_LENGTH
    tolerance = float(compose(["model=tiny"]).validate.tie_tolerance)
    for budget in budgets:
        moa_front = [e for e in front if e["budget"] == budget and e["method"] == "moa"]
        # Oracle for the shortlist: the 3 front plans whose worst loss ratio to the front's best at each length is least.
        least = {n: min(e[f"influence_loss@{n}"] for e in moa_front) for n in (768, 1536)}
        expected = sorted(moa_front, key=lambda e: (max(e[f"influence_loss@{n}"] / least[n] for n in least),
                                                    sum(e[f"influence_loss@{n}"] / least[n] for n in least)))[:3]
        rows = results[results["budget"] == budget]
        moa = rows[rows["method"] == "moa"]
        assert sorted(moa["plan"]) == sorted(Path(e["plan"]).name for e in expected)
        # Oracle for the choice: in compromise order, the first plan within the default tie tolerance of the least
        # perplexity.
        ppl = dict(zip(moa["plan"], moa["val_ppl"], strict=True))
        bound = (1 + tolerance) * min(ppl.values())
        best = next(name for name in (Path(e["plan"]).name for e in expected) if ppl[name] <= bound)
        assert list(rows.loc[rows["selected"], "plan"]) == [best]
        selected = load_plan(run_dir / "validate" / f"selected_{budget}.json")
        assert selected.to_dict() == load_plan(run_dir / "plans" / best).to_dict()
        assert length not in selected.profile_lengths
        assert all(plan_kv_density(selected, n) <= float(budget) + 1e-9 for n in selected.profile_lengths)
        uniform = rows[rows["method"] == "uniform"].iloc[0]
        assert abs(uniform["kv_density"] - plan_kv_density(selected, length)) < 0.02  # baseline at the same density
        binary = load_plan(run_dir / "plans" / f"binary_{budget}.json")
        assert {(a, b) for la, lb in zip(binary.alphas, binary.betas, strict=True)
                for a, b in zip(la, lb, strict=True)} <= {(0.0, 1.0), (float(binary.solver["streaming_window"]), 0.0)}
        scored_binary = rows[rows["method"] == "binary"]
        assert scored_binary["plan"].tolist() == [f"binary_{budget}"]  # optimize's split, solved again at `length`
        _, density = _most_full_heads(selected, binary.solver["streaming_window"], length,
                                      plan_kv_density(selected, length))
        assert scored_binary["kv_density"].iloc[0] == pytest.approx(density)
    first = load_plan(run_dir / "validate" / f"selected_{budgets[0]}.json")
    assert load_plan(run_dir / "plan.json").to_dict() == first.to_dict()


def test_answers_list_every_item_and_account_for_accuracy_and_agreement(full_run):
    """eval/answers.csv: one row per method, budget, task, length and item; its correctness and agreement,
    recomputed here from the texts, add up to results.csv's accuracy and agree_dense."""
    from pipeline.evaluation.scoring import is_correct, stated_answer

    run_dir, _ = full_run
    results = pd.read_csv(run_dir / "eval" / "results.csv", dtype={"budget": str}).fillna({"budget": ""})
    answers = pd.read_csv(run_dir / "eval" / "answers.csv", dtype={"budget": str, "answer": str}, keep_default_na=False)
    keys = ["method", "budget", "task", "seq_len"]
    assert len(answers) == int(results["n"].sum())
    for row in answers.itertuples():
        assert str(row.correct) == str(is_correct(row.response, row.answer))
        assert str(row.agrees_dense) == str(stated_answer(row.response) == stated_answer(row.dense_response))
    dense = answers[answers["method"] == "dense"].set_index(["task", "seq_len", "item"])["response"]
    for row in answers.itertuples():
        assert row.dense_response == dense.loc[(row.task, row.seq_len, row.item)]
    answers["correct"] = answers["correct"].astype(str) == "True"
    answers["agrees_dense"] = answers["agrees_dense"].astype(str) == "True"
    totals = answers.groupby(keys)[["correct", "agrees_dense"]].mean()
    for row in results.itertuples():
        total = totals.loc[(row.method, row.budget, row.task, row.seq_len)]
        assert (total["correct"], total["agrees_dense"]) == pytest.approx((row.accuracy, row.agree_dense))


def test_killed_evaluation_resumes_per_method_and_length(full_run, tmp_path, monkeypatch):
    """A kill during stage=evaluate keeps every finished (method, length) cell: the rerun generates only dense's
    reference answers again and the methods not yet done, and ends with the same results and answers as an
    uninterrupted run."""
    import shutil

    import pipeline.stages.evaluate as evaluate_stage

    source, _ = full_run
    run_dir = tmp_path / "runs"
    shutil.copytree(source, run_dir, ignore=shutil.ignore_patterns("eval", "evaluate", "mlflow.db", "mlartifacts", "adapters"))
    real, calls = evaluate_stage.run_method, []

    def run_then_kill(*args, **kwargs):
        calls.append(args[2].name)  # the Method
        if len(calls) == 4:  # dense, moa@0.5 and binary@0.5 are done
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(evaluate_stage, "run_method", run_then_kill)
    with pytest.raises(KeyboardInterrupt):
        run_stage(run_dir, "stage=evaluate", *LENGTHS)
    cells = sorted(p.name for p in (run_dir / "evaluate" / ".partial").rglob("*.json"))
    assert cells == ["binary_0.5_768.json", "dense_all_768.json", "moa_0.5_768.json"]
    assert not (run_dir / "eval" / "results.csv").exists() and not (run_dir / "evaluate" / ".done.json").exists()
    assert not [p for d in ("eval", "evaluate") for p in (run_dir / d).rglob("*") if p.name.endswith(".tmp")]

    calls.clear()
    monkeypatch.setattr(evaluate_stage, "run_method", lambda *a, **k: calls.append(a[2].name) or real(*a, **k))
    assert run_stage(run_dir, "stage=evaluate", *LENGTHS) == {"evaluate": "ran"}
    assert calls == ["dense", "uniform", "moa", "binary", "uniform"]  # the 0.25 budget's methods are the rest
    keys = ["method", "budget", "task", "seq_len"]
    resumed, whole = (pd.read_csv(d / "eval" / "results.csv", dtype={"budget": str}).fillna({"budget": ""})
                      .sort_values(keys).reset_index(drop=True) for d in (run_dir, source))
    exact = [*keys, "plan_id", "n", "accuracy", "agree_dense", "kv_bytes", "kv_density", "attention_density"]
    pd.testing.assert_frame_equal(resumed[exact], whole[exact])
    assert resumed["kl_dense"].to_numpy() == pytest.approx(whole["kl_dense"].to_numpy(), rel=1e-6, abs=1e-9)
    answers = [pd.read_csv(d / "eval" / "answers.csv", dtype=str, keep_default_na=False).sort_values([*keys, "item"])
               .reset_index(drop=True) for d in (run_dir, source)]
    pd.testing.assert_frame_equal(*answers)


def _most_full_heads(plan, window: int, n: int, kv_density: float) -> tuple[int, float]:
    """The binary baseline at ``n`` within ``kv_density``: full attention loses nothing, so the least-loss split
    makes as many heads full as fit. Returns that count and the KV density it gives (``plan``'s heads, sink and
    minimum span)."""
    heads = len(plan.alphas) * len(plan.alphas[0])
    streaming = min(plan.sink + span_at(window, 0.0, n, plan.min_span), n) / n
    full = max(0, math.floor((kv_density - streaming) / ((1 - streaming) / heads) + 1e-9))
    return full, streaming + full * (1 - streaming) / heads


def _prompts(data: dict) -> list[tuple[int, ...]]:
    """Each sample's prompt tokens: everything before its first response (loss-mask) token."""
    starts = data["loss_mask"].argmax(dim=1)
    return [tuple(row[:start].tolist()) for row, start in zip(data["input_ids"], starts, strict=True)]


def test_no_held_out_sample_is_a_calibration_sample(full_run):
    run_dir, _ = full_run
    heldout = _prompts(load_file(run_dir / "validate" / f"heldout_{VALIDATION_LENGTH}.safetensors"))
    calibration = _prompts(load_file(run_dir / "calibrate" / f"calibration_{VALIDATION_LENGTH}.safetensors"))
    assert heldout and calibration
    assert not set(heldout) & set(calibration)


def test_stage_all_ends_with_a_summary_of_the_selected_plan(full_run, capsys):
    run_dir, _ = full_run
    results = pd.read_csv(run_dir / "validate" / "results.csv", dtype={"budget": str}).set_index("plan")
    moa = results[results["method"] == "moa"]
    best = moa[(moa["budget"] == "0.5") & moa["selected"]].index[0]  # the choice itself is checked against an oracle
    run_stage(run_dir, "stage=all", *LENGTHS, *QUICK_BENCH)
    printed = capsys.readouterr().out
    summary = final_summary(compose(["model=tiny", f"run_dir={run_dir}"]), run_dir)
    assert summary.strip() in printed
    assert f"({best})" in summary and str(run_dir / "plan.json") in summary
    for plan, row in results.iterrows():  # every scored plan, named beside its perplexity; the selection per budget
        assert any(plan in line and f"{row['val_ppl']:.4f}" in line for line in summary.splitlines()), plan
    for budget in ("0.5", "0.25"):
        chosen = moa[(moa["budget"] == budget) & moa["selected"]].index[0]
        assert f"budget {budget}: selected {chosen} " in summary
    assert f"make ui RUN_DIR={run_dir}" in summary
    adapters = pd.read_csv(run_dir / "adapters" / "results.csv")
    for row in adapters[adapters["kind"] != "trial"].itertuples():  # the Pareto set and every baseline
        assert f"{row.name:<16} {row.kind:<8} {row.accuracy:.3f} [{row.acc_lo:.3f}, {row.acc_hi:.3f}]" in summary
    _check_evaluation_lines(summary, run_dir)
    assert f"make notebooks RUN_DIR={run_dir}" in summary and "moa-autotune-plans" in summary


def _check_evaluation_lines(summary: str, run_dir: Path) -> None:
    """Every (method, budget) of eval/results.csv has a line with its correct answers of n per length, summed over
    the tasks, and (dense aside) the share of its answers equal to dense's, in length order."""
    frame = pd.read_csv(run_dir / "eval" / "results.csv", dtype={"budget": str}, keep_default_na=False)
    lines = summary.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("Evaluation ("))
    end = next(i for i, line in enumerate(lines) if line.startswith("Prefill / decode speed-up"))
    assert set(frame["method"]) >= {"dense", "moa", "binary", "uniform"}
    for (method, budget), rows in frame.groupby(["method", "budget"]):
        line = next(line for line in lines[start:end] if line.startswith(f"  {method:<8} {budget:<6} "))
        correct, agree = [], []
        for _, cell in sorted(rows.groupby("seq_len")):
            n = int(cell["n"].sum())
            correct.append(f"{sum(round(a * k) for a, k in zip(cell['accuracy'], cell['n'], strict=True))}/{n}")
            agree.append(f"[{sum(a * k for a, k in zip(cell['agree_dense'], cell['n'], strict=True)) / n:.2f}]")
        assert re.findall(r"\b\d+/\d+\b", line) == correct, (line, correct)
        assert re.findall(r"\[[\d.]+\]", line) == ([] if method == "dense" else agree), (line, agree)


def test_candidate_runs_carry_their_validation_perplexity(full_run):
    run_dir, _ = full_run
    mlflow.set_tracking_uri(f"sqlite:///{run_dir.resolve()}/mlflow.db")
    runs = mlflow.search_runs(experiment_names=["moa-autotune"], filter_string="tags.kind = 'plan_candidate'")
    front = json.loads((run_dir / "optimize" / "front.json").read_text())
    assert len(runs) == sum(e["method"] == "moa" for e in front["plans"])
    results = pd.read_csv(run_dir / "validate" / "results.csv").set_index("plan")
    scored = runs[runs["metrics.val_ppl"].notna()]
    assert sorted(Path(p).name for p in scored["params.plan"]) == sorted(results[results["method"] == "moa"].index)
    for _, run in scored.iterrows():
        assert run["metrics.val_ppl"] == pytest.approx(results.loc[Path(run["params.plan"]).name, "val_ppl"])
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
    mlflow.set_tracking_uri(f"sqlite:///{run_dir.resolve()}/mlflow.db")
    count = len(mlflow.search_runs(experiment_names=["moa-autotune"]))
    assert f"{run_dir.resolve()} {count} runs" in text, "the notebook must read this run's store"


def test_plans_experiment_has_one_top_level_run_per_plan_with_every_stage_metric(full_run):
    run_dir, _ = full_run
    mlflow.set_tracking_uri(f"sqlite:///{run_dir.resolve()}/mlflow.db")
    runs = mlflow.search_runs(experiment_names=["moa-autotune-plans"])
    assert "tags.mlflow.parentRunId" not in runs.columns or runs["tags.mlflow.parentRunId"].isna().all()
    plan_files = [*(run_dir / "plans").glob("plan_*.json"), *(run_dir / "plans").glob("binary_*.json")]
    # every plan file, dense, and each budget's baselines rebuilt per length (the binary split, the uniform window)
    assert len(runs) == len(plan_files) + 1 + 2 * 2
    from_files = runs["tags.method"].isin(["moa", "binary"]) & (runs["tags.plan_id"] != runs["tags.method"])
    assert sorted(runs.loc[from_files, "tags.plan_id"]) == sorted(p.name for p in plan_files)
    frame = pd.read_csv(run_dir / "eval" / "results.csv", dtype={"budget": str}).fillna({"budget": ""})
    selected = runs[runs["tags.selected"] == "true"]
    assert sorted(selected["tags.budget"]) == ["0.25", "0.5"]
    for _, run in selected.iterrows():
        assert run["metrics.kv_density:768"] <= float(run["tags.budget"]) + 1e-9  # from optimize
        assert run["metrics.val_ppl"] > 0  # from validate
        row = frame[(frame["method"] == "moa") & (frame["budget"] == run["tags.budget"])
                    & (frame["task"] == "passkey") & (frame["seq_len"] == 768)].iloc[0]
        assert run["metrics.accuracy:passkey:768"] == pytest.approx(row["accuracy"])  # from evaluate
    dense = runs[runs["tags.method"] == "dense"].iloc[0]
    assert dense["metrics.val_ppl"] > 0 and dense["metrics.kv_density:768"] == 1.0
    evaluated = runs[runs["metrics.accuracy:passkey:768"].notna()]  # every method x budget evaluate ran
    assert len(evaluated) == len(set(zip(frame["method"], frame["budget"], strict=True)))
    assert set(evaluated["tags.eval_dtype"]) == {EVAL_DTYPE}


@pytest.mark.parametrize("name", ["accuracy_latency_front.ipynb", "compare_plans.ipynb"])
def test_evaluation_notebooks_execute_on_the_run(full_run, tmp_path, name):
    """The notebooks run headless on a real tiny run, with no error cell and no empty figure."""
    import papermill

    run_dir, _ = full_run
    executed = tmp_path / name
    papermill.execute_notebook(str(REPO / "notebooks" / name), str(executed), parameters={"run_dir": str(run_dir)},
                               cwd=str(REPO / "notebooks"), kernel_name="python3", progress_bar=False)
    notebook = nbformat.read(executed, as_version=4)
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    assert [o for o in outputs if "image/png" in o.get("data", {})], "no figure"
    if name == "accuracy_latency_front.ipynb":  # it says which precision the points were measured in
        assert f"the model ran in {EVAL_DTYPE} (evaluate.dtype)" in "".join(o.get("text", "") for o in outputs)


def test_plan_latency_script_times_every_selected_plan_beside_dense(full_run):
    """scripts/plan_latency.py on the tiny run: one row per (method, length), dense against itself exactly 1, the
    plans' densities those of their files, the CSV and one MLflow run; a length beyond the model is one line, exit 2."""
    import subprocess
    import sys

    run_dir, _ = full_run
    overrides = ["--", "model=tiny", f"run_dir={run_dir}", *LENGTHS]
    script = [sys.executable, str(REPO / "scripts" / "plan_latency.py")]
    done = subprocess.run([*script, "--lengths", "256", "512", "--new", "4", "--rounds", "1", *overrides],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    frame = pd.read_csv(run_dir / "latency" / "plan_latency.csv", dtype={"budget": str}).fillna({"budget": ""})
    assert sorted(zip(frame["budget"], frame["seq_len"], strict=True)) == [
        (b, n) for b in ("", "0.25", "0.5") for n in (256, 512)]
    dense = frame[frame["method"] == "dense"]
    assert (dense["prefill_speedup"] == 1).all() and (dense["decode_speedup"] == 1).all()
    assert set(frame["dtype"]) == {EVAL_DTYPE}  # evaluate's
    for row in frame[frame["method"] == "moa"].itertuples():
        plan = load_plan(run_dir / "validate" / f"selected_{row.budget}.json")
        assert row.kv_density == pytest.approx(plan_kv_density(plan, row.seq_len))
        assert row.prefill_speedup > 0 and row.decode_speedup > 0
    mlflow.set_tracking_uri(f"sqlite:///{run_dir.resolve()}/mlflow.db")
    runs = mlflow.search_runs(experiment_names=["moa-autotune-latency"],
                              filter_string="attributes.run_name = 'plan_latency'")
    assert len(runs) == 1 and runs["metrics.prefill_speedup:dense:512"].iloc[0] == 1.0
    bad = subprocess.run([*script, "--lengths", "99999", *overrides], cwd=REPO, capture_output=True, text=True,
                         timeout=600)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith("error: --lengths: 99999")


def test_gate_script_scores_the_gate_split_beside_the_plan(full_run):
    """The profile's head gates are in the run ([L, Hkv] in [0, 1]); scripts/gate_heads.py trains its own, builds
    the full-or-streaming split within the selected plan's KV density and scores every method on the items."""
    import subprocess
    import sys

    run_dir, _ = full_run
    profiled = json.loads((run_dir / "profile" / "gates.json").read_text())
    gates = torch.tensor(profiled["gates"])
    assert gates.shape == (2, 2) and gates.min() >= 0 and gates.max() <= 1
    assert profiled["settings"]["length"] == 768  # the middle profile length, the shorter of two
    script = [sys.executable, str(REPO / "scripts" / "gate_heads.py"), "--train-length", "768", "--train-samples",
              "2", "--steps", "2", "--lengths", "768", "--items", "1", "--", "model=tiny", f"run_dir={run_dir}",
              *LENGTHS]
    done = subprocess.run(script, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    frame = pd.read_csv(run_dir / "gates" / "gate_eval.csv")
    assert list(frame["method"]) == ["dense", "moa", "binary", "gates"]
    moa = load_plan(run_dir / "validate" / "selected_0.5.json")
    split = load_plan(run_dir / "gates" / "gate_plan_0.5_768.json")
    assert plan_kv_density(split, 768) <= plan_kv_density(moa, 768) + 1e-9
    rules = {(a, b) for row_a, row_b in zip(split.alphas, split.betas, strict=True)
             for a, b in zip(row_a, row_b, strict=True)}
    assert rules <= {(0.0, 1.0), (float(split.solver["streaming_window"]), 0.0)}
