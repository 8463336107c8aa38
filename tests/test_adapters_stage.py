"""stage=adapters on the tiny model: the Optuna search, the baselines, results.csv, MLflow, resume and bad input.

The tiny model is random, so its accuracies are near zero; these tests check the bookkeeping against independent
computations (the Pareto set by brute force, parameter counts from the model's shapes, Wilson intervals), not
the accuracies themselves. The SmolLM2 figures are in the README.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pandas as pd
import pytest
import torch
import yaml
from safetensors.torch import load_file

from pipeline.errors import UserError
from pipeline.evaluation.scoring import wilson_interval
from pipeline.run import main
from pipeline.search.space import DEFAULT_SPACE, load_space
from pipeline.settings import native_bfloat16
from pipeline.stages.adapters import COLUMNS
from tests.pipeline_helpers import run_stage

REPO = Path(__file__).resolve().parents[1]
TINY_TASKS = 2  # model=tiny: arithmetic and extraction
STAGE = ("stage=adapters", "adapters.plan=null")


@pytest.fixture(scope="module")
def adapters_run(tmp_path_factory):
    """One search of 3 trials whose second trial's loss turns NaN (training raises ``TrainingDiverged``)."""
    from pipeline.adapters.training import TrainingDiverged
    from pipeline.search import fitting

    real_train, calls = fitting.train, []

    def second_call_diverges(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise TrainingDiverged(3, float("nan"))
        return real_train(*args, **kwargs)

    run_dir = tmp_path_factory.mktemp("adapters")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(fitting, "train", second_call_diverges)
        outcome = run_stage(run_dir, *STAGE, "adapters.optuna.pruner=none")
    return run_dir, outcome


def _study(run_dir: Path) -> optuna.Study:
    storage = f"sqlite:///{run_dir}/optuna.db"
    names = [s.study_name for s in optuna.get_all_study_summaries(storage) if not s.study_name.endswith(":pruning")]
    assert len(names) == 1, names
    return optuna.load_study(study_name=names[0], storage=storage)


def test_results_have_every_trial_and_baseline(adapters_run):
    run_dir, outcome = adapters_run
    assert outcome == {"adapters": "ran"}
    frame = pd.read_csv(run_dir / "adapters" / "results.csv")
    assert tuple(frame.columns) == COLUMNS
    study = _study(run_dir)
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    finished = [t for t in study.trials if t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)]
    assert len(finished) == 3  # model=tiny asks for 3 trials
    searched = frame[frame["kind"].isin(["trial", "pareto"])]
    assert sorted(searched["name"]) == sorted(f"trial_{t.number}" for t in complete)
    assert set(frame.loc[frame["kind"] == "baseline", "name"]) == {"base", "lora", "moe_lora"}
    assert list(frame.loc[frame["kind"] == "final", "name"]) == ["final"]
    # The Pareto rows are the non-dominated completed trials by (validation accuracy up, parameters down).
    points = {f"trial_{t.number}": (t.values[0], t.values[1]) for t in complete}
    brute = {name for name, (a, p) in points.items()
             if not any(a2 >= a and p2 <= p and (a2 > a or p2 < p) for a2, p2 in points.values())}
    assert set(frame.loc[frame["kind"] == "pareto", "name"]) == brute
    for row in searched.itertuples():
        assert points[row.name] == (row.val_accuracy, row.trainable_params)


def test_a_new_study_runs_the_search_spaces_start_trials_first(adapters_run):
    run_dir, _ = adapters_run
    start = load_space().start
    assert start, "the packaged search space starts from at least one known composition"
    first = sorted(_study(run_dir).trials, key=lambda t: t.number)[: len(start)]
    assert [t.params for t in first] == [dict(p) for p in start]


def test_accuracies_carry_their_wilson_interval(adapters_run):
    run_dir, _ = adapters_run
    frame = pd.read_csv(run_dir / "adapters" / "results.csv")
    n = TINY_TASKS * 2  # adapters.test_examples=2 per task under model=tiny
    for row in frame.itertuples():
        correct = round(row.accuracy * n)
        assert row.accuracy == pytest.approx(correct / n)
        assert (row.acc_lo, row.acc_hi) == pytest.approx(wilson_interval(correct, n))


def _lora_params_per_rank(model, targets) -> int:
    shapes = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
              "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}
    total = 0
    for layer in model.model.layers:
        for target in targets:
            linear = layer.get_submodule(shapes[target])
            total += linear.in_features + linear.out_features
    return total


def test_baselines_have_the_sizes_they_claim(adapters_run):
    """Single LoRA: the smallest rank with at least the most accurate Pareto trial's parameters. MoE-LoRA: its
    experts plus one linear top-k router per layer, counted from the model's shapes."""
    from pipeline.models import load_model
    from pipeline.run import compose

    run_dir, _ = adapters_run
    cfg = compose(["model=tiny"])
    model = load_model(cfg.model).model
    frame = pd.read_csv(run_dir / "adapters" / "results.csv").set_index("name")
    pareto = frame[frame["kind"] == "pareto"]
    best = pareto.sort_values(["val_accuracy", "trainable_params"], ascending=[False, True]).iloc[0]
    per_rank = _lora_params_per_rank(model, cfg.adapters.baselines.lora_targets)
    lora = frame.loc["lora", "trainable_params"]
    assert lora % per_rank == 0
    rank = lora // per_rank
    assert lora >= best["trainable_params"] and (rank == 1 or (rank - 1) * per_rank < best["trainable_params"])
    b = cfg.adapters.baselines
    hidden, layers = model.config.hidden_size, model.config.num_hidden_layers
    experts = b.moe_lora_experts * b.moe_lora_rank * _lora_params_per_rank(model, b.moe_lora_targets)
    router = layers * (hidden * b.moe_lora_experts + b.moe_lora_experts)  # Linear(hidden, E) with bias
    assert frame.loc["moe_lora", "trainable_params"] in (experts + router, experts + router - layers * b.moe_lora_experts)
    assert frame.loc["base", "trainable_params"] == 0


def test_every_method_is_one_mlflow_run_with_its_metrics(adapters_run):
    from mlflow.tracking import MlflowClient

    run_dir, _ = adapters_run
    client = MlflowClient(f"sqlite:///{run_dir.resolve()}/mlflow.db")
    experiment = client.get_experiment_by_name("moa-autotune-adapters")
    runs = client.search_runs([experiment.experiment_id])
    frame = pd.read_csv(run_dir / "adapters" / "results.csv")
    by_name = {r.info.run_name: r for r in runs}
    for row in frame.itertuples():
        run = by_name[row.name]
        assert run.data.metrics["accuracy"] == pytest.approx(row.accuracy)
        assert run.data.metrics["trainable_params"] == row.trainable_params
        assert run.data.tags["run_dir"] == str(run_dir.resolve())
        if row.kind in ("trial", "pareto"):
            assert run.data.tags["pareto"] == str(row.kind == "pareto").lower()
    trial_runs = [r for r in runs if r.data.tags.get("kind") == "trial"]
    assert len(trial_runs) == len(_study(run_dir).trials)  # pruned trials too, none twice
    # The stage run records the dtype its frozen base computed in: adapters.dtype=auto resolved on this machine.
    stage_run = client.search_runs([client.get_experiment_by_name("moa-autotune").experiment_id],
                                   filter_string="tags.stage = 'adapters'")[0]
    expected = "bfloat16" if native_bfloat16(torch.device("cpu")) else "float32"
    assert stage_run.data.params["base_dtype"] == expected
    saved = sorted((run_dir / "adapters").glob("*/adapters.safetensors"))
    assert saved and {t.dtype for path in saved for t in load_file(path).values()} == {torch.float32}  # adapters


def test_the_final_comparison_retrains_the_most_accurate_pareto_composition_for_final_steps(adapters_run):
    """``final`` is the most accurate Pareto trial's composition (by validation accuracy, then fewer parameters,
    found here from the study) retrained at its learning rate; it and the lora and moe_lora baselines train for
    adapters.final_steps, the trials for adapters.steps. The oracle for the steps is each run's logged loss curve
    (one point per optimiser step), not the results' own column alone."""
    from mlflow.tracking import MlflowClient

    from pipeline.run import compose

    run_dir, _ = adapters_run
    cfg = compose(["model=tiny"]).adapters
    assert cfg.final_steps != cfg.steps  # model=tiny retrains, so the final row exists
    frame = pd.read_csv(run_dir / "adapters" / "results.csv").set_index("name")
    best = max(_study(run_dir).best_trials, key=lambda t: (t.values[0], -t.values[1]))
    assert frame.loc["final", "composition"] == frame.loc[f"trial_{best.number}", "composition"]
    assert frame.loc["final", "trainable_params"] == best.values[1]
    client = MlflowClient(f"sqlite:///{run_dir.resolve()}/mlflow.db")
    experiment = client.get_experiment_by_name("moa-autotune-adapters")
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    assert float(runs["final"].data.params["lr"]) == pytest.approx(best.params["lr"])
    expected = {"final": cfg.final_steps, "lora": cfg.final_steps, "moe_lora": cfg.final_steps, "base": 0,
                **{name: cfg.steps for name in frame.index if name.startswith("trial_")}}
    for name, steps in expected.items():
        assert frame.loc[name, "steps"] == steps, name
        logged = client.get_metric_history(runs[name].info.run_id, "train_loss")
        assert len(logged) == steps, name


def test_saved_adapters_load_onto_the_base_model_only(adapters_run):
    from pipeline.adapters import load_adapters
    from pipeline.models import load_model
    from pipeline.run import compose

    run_dir, _ = adapters_run
    loaded = load_model(compose(["model=tiny"]).model)
    adapter_set = load_adapters(loaded.model, run_dir / "adapters" / "moe_lora", base_fingerprint=loaded.info.fingerprint)
    frame = pd.read_csv(run_dir / "adapters" / "results.csv").set_index("name")
    assert adapter_set.num_trainable() == frame.loc["moe_lora", "trainable_params"]
    fresh = load_model(compose(["model=tiny"]).model)
    with pytest.raises(ValueError, match="fingerprint"):
        load_adapters(fresh.model, run_dir / "adapters" / "moe_lora", base_fingerprint="0" * 16)


def test_a_rerun_is_up_to_date(adapters_run, capsys):
    run_dir, _ = adapters_run
    assert run_stage(run_dir, *STAGE, "adapters.optuna.pruner=none") == {"adapters": "skipped"}


def test_a_diverging_trial_is_pruned_and_the_study_goes_on(adapters_run):
    run_dir, _ = adapters_run
    trials = _study(run_dir).trials
    states = [t.state.name for t in trials]
    assert states == ["COMPLETE", "PRUNED", "COMPLETE"], states
    assert "nan" in trials[1].user_attrs["failure"].lower()
    frame = pd.read_csv(run_dir / "adapters" / "results.csv")
    assert "trial_1" not in set(frame["name"])
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{run_dir.resolve()}/mlflow.db")
    experiment = client.get_experiment_by_name("moa-autotune-adapters")
    pruned = [r for r in client.search_runs([experiment.experiment_id]) if r.info.run_name == "trial_1"]
    assert [r.info.status for r in pruned] == ["FINISHED"] and pruned[0].data.tags["state"] == "pruned"
    later = [r for r in client.search_runs([experiment.experiment_id]) if r.info.run_name == "trial_2"]
    assert pruned[0].info.end_time <= later[0].info.start_time  # its end time is when it stopped


def test_the_search_starts_no_trial_past_its_time_budget(tmp_path, capsys):
    """A budget of 6 ms: the first trial starts (nothing is known yet), and takes longer, so no other one does."""
    budget = ("adapters.optuna.time_budget_min=0.0001", "adapters.final_steps=null")
    assert run_stage(tmp_path, *STAGE, *budget) == {"adapters": "ran"}
    assert [t.state.name for t in _study(tmp_path).trials] == ["COMPLETE"]
    assert "so 2 of the 3 trials were not run" in capsys.readouterr().out
    frame = pd.read_csv(tmp_path / "adapters" / "results.csv")
    assert list(frame.loc[frame["kind"].isin(["trial", "pareto"]), "name"]) == ["trial_0"]
    assert set(frame.loc[frame["kind"] == "baseline", "name"]) == {"base", "lora", "moe_lora"}


def _cli(run_dir: Path, *overrides: str) -> subprocess.Popen:
    env = {**os.environ, "MOA_NO_PROGRESS": "1"}
    return subprocess.Popen([sys.executable, "-m", "pipeline.run", "model=tiny", f"run_dir={run_dir}", *overrides],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_killed_mid_trial_the_study_resumes_without_redoing_a_finished_trial(tmp_path):
    overrides = (*STAGE, "adapters.steps=60", "adapters.optuna.heartbeat_s=1", "adapters.optuna.pruner=none")
    process = _cli(tmp_path, *overrides)
    deadline = time.monotonic() + 240
    before = None
    while time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.2)
        try:
            study = _study(tmp_path)
        except (AssertionError, KeyError, Exception):  # the database may not exist yet
            continue
        states = [t.state for t in study.trials]
        # Mid-trial: the running trial has its composition and its MLflow run (a trial killed before its first
        # suggestion has no composition; one killed before its run started has no run to end KILLED).
        if (optuna.trial.TrialState.COMPLETE in states and states[-1] == optuna.trial.TrialState.RUNNING
                and study.trials[-1].params and "mlflow_run_id" in study.trials[-1].user_attrs):
            before = {t.number: t.values for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE}
            process.send_signal(signal.SIGKILL)  # a worker dying mid-trial: no clean-up of any kind
            break
    process.wait(timeout=60)
    assert before, f"never saw a finished trial followed by a running one:\n{process.stdout.read()}"
    killed = max(t.number for t in _study(tmp_path).trials)
    time.sleep(2.5)  # past the heartbeat grace period (2 heartbeats), so the dead trial counts as stale
    rerun = _cli(tmp_path, *overrides)
    output, _ = rerun.communicate(timeout=600)
    assert rerun.returncode == 0, output
    study = _study(tmp_path)
    after = {t.number: t.values for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE}
    assert {n: after[n] for n in before} == before  # finished trials kept as they were, not redone
    assert len(after) == 3
    dead = study.trials[killed]
    assert dead.state == optuna.trial.TrialState.FAIL
    retries = [t for t in study.trials
               if optuna.storages.RetryHeartbeatStaleTrialCallback.retried_trial_number(t) == killed]
    assert len(retries) == 1 and retries[0].params == dead.params
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path.resolve()}/mlflow.db")
    experiment = client.get_experiment_by_name("moa-autotune-adapters")
    names = [r.info.run_name for r in client.search_runs([experiment.experiment_id])]
    for number in before:
        assert names.count(f"trial_{number}") == 1
    killed_run = [r for r in client.search_runs([experiment.experiment_id]) if r.info.run_name == f"trial_{killed}"]
    assert [r.info.status for r in killed_run] == ["KILLED"]


def _space_file(tmp_path: Path, mutate) -> Path:
    raw = yaml.safe_load(DEFAULT_SPACE.read_text())
    mutate(raw)
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.parametrize("mutate,needle", [
    (lambda raw: raw.update(experts={}), "experts is empty"),
    (lambda raw: raw["experts"]["lora"].update(size=[0]), "experts.lora.size"),
    (lambda raw: raw["experts"]["lora"].update(targets=[["q", "qkv"]]), "experts.lora.targets"),
], ids=["empty-composition", "rank-0", "unknown-target"])
def test_a_bad_search_space_fails_in_one_line_before_any_training(tmp_path, capsys, mutate, needle):
    space = _space_file(tmp_path, mutate)
    run_dir = tmp_path / "run"
    assert main(["model=tiny", f"run_dir={run_dir}", *STAGE, f"adapters.search_space={space}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: adapters.search_space: bad value") and needle in err and "\n" not in err
    assert not run_dir.exists() or not any(run_dir.iterdir())


def test_the_default_plan_needs_validate_or_says_how_to_run_without(tmp_path):
    with pytest.raises(UserError, match=r"run stage=validate first, or set adapters.plan=null"):
        run_stage(tmp_path, "stage=adapters")
