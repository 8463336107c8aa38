"""Many workers on one adapter-composition study, on a real PostgreSQL (the ``postgres_db`` fixture).

Two ``stage=adapters adapters.optuna.worker=true`` processes share the study; one is killed mid-trial. The study
must end with exactly the requested number of finished trials, the dead trial failed and retried once with the
same parameters, and each finished trial one MLflow run. The stage's own run then finds the search done and
scores the baselines.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import optuna
import pandas as pd
import pytest
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState
from sqlalchemy.pool import NullPool

from pipeline.run import compose
from pipeline.runner import stage_hash
from pipeline.search.study import FINISHED, is_surplus, needs_trial
from pipeline.stages.registry import registered

REPO = Path(__file__).resolve().parents[1]
TRIALS = 4
KILL_BEFORE_S = 0.7  # the victim is killed within this long of its trial's start; a trial takes about 1.5 s or more
SEARCH = ("stage=adapters", "adapters.plan=null", "adapters.steps=120", "adapters.optuna.heartbeat_s=1",
          "adapters.optuna.pruner=none", f"adapters.optuna.trials={TRIALS}", "adapters.optuna.startup_trials=4")


def _cli(run_dir: Path, *overrides: str) -> subprocess.Popen:
    env = {**os.environ, "MOA_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "pipeline.run", "model=tiny", f"run_dir={run_dir}", *overrides],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _the_study(url: str) -> optuna.Study | None:
    """The workers' study, or None before they made it. Each call opens its own storage without a connection pool:
    the test polls ten times a second, and each discarded storage's pooled connection would stay open until the
    server ran out of connection slots."""
    try:
        storage = optuna.storages.RDBStorage(url, engine_kwargs={"poolclass": NullPool})
        names = [s.study_name for s in optuna.get_all_study_summaries(storage) if not s.study_name.endswith(":pruning")]
    except Exception:  # noqa: BLE001 - tables not created yet
        return None
    return optuna.load_study(study_name=names[0], storage=storage) if names else None


def test_a_worker_flag_leaves_the_study_name_unchanged():
    stages = registered()
    plain = compose(["model=tiny", *SEARCH])
    worker = compose(["model=tiny", *SEARCH, "adapters.optuna.worker=true"])
    other = compose(["model=tiny", *SEARCH, "adapters.steps=41"])
    assert stage_hash(worker, "adapters", stages) == stage_hash(plain, "adapters", stages)
    assert stage_hash(other, "adapters", stages) != stage_hash(plain, "adapters", stages)


def test_surplus_and_need_count_every_workers_trials(tmp_path):
    """Against the definitions, written out on a study whose trial states are set by hand."""
    study = optuna.create_study(storage=f"sqlite:///{tmp_path}/s.db", directions=["maximize", "minimize"])
    distribution = {"x": optuna.distributions.FloatDistribution(0, 1)}
    states = [TrialState.COMPLETE, TrialState.FAIL, TrialState.PRUNED, TrialState.WAITING]
    for state in states:
        values = [0.5, 1.0] if state == TrialState.COMPLETE else None
        study.add_trial(optuna.create_trial(state=state, params={"x": 0.1}, distributions=distribution,
                                            values=values))
    # live trials 0, 2, 3: trial 4 is the 4th live one, trial 3 the 3rd (the failed trial 1 does not count)
    assert not is_surplus(study, 4, target=4) and is_surplus(study, 4, target=3)
    assert not is_surplus(study, 3, target=3) and is_surplus(study, 3, target=2)
    assert needs_trial(study, target=1)  # a retry is waiting, whatever the count
    study.ask()  # takes the waiting trial: now RUNNING
    assert needs_trial(study, target=4) and not needs_trial(study, target=3)


@pytest.mark.distributed
@pytest.mark.slow
def test_two_workers_record_every_trial_exactly_once_after_one_is_killed(tmp_path, postgres_db):
    storage = f"adapters.optuna.storage={postgres_db}"
    workers = [_cli(tmp_path, *SEARCH, storage, "adapters.optuna.worker=true") for _ in range(2)]
    victim, survivor = workers
    killed_at = None
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and victim.poll() is None:
        time.sleep(0.1)
        study = _the_study(postgres_db)
        if study is None:
            continue
        trials = study.get_trials(deepcopy=False)
        # Mid-trial: its composition is suggested, so training is under way; and young enough that it cannot have
        # finished by the time the signal lands (a trial seen late in its life might, and then none is killed).
        mine = [t for t in trials if t.state == TrialState.RUNNING and t.user_attrs.get("worker", "").endswith(
            f":{victim.pid}") and t.params and (datetime.now() - t.datetime_start).total_seconds() < KILL_BEFORE_S]
        if mine and any(t.state == TrialState.COMPLETE for t in trials):
            killed_at = mine[0].number
            victim.send_signal(signal.SIGKILL)  # no clean-up of any kind
            break
    victim.wait(timeout=60)
    assert killed_at is not None, f"the victim never ran a trial after one finished:\n{victim.stdout.read()}"
    output, _ = survivor.communicate(timeout=400)
    assert survivor.returncode == 0, output

    study = _the_study(postgres_db)
    durations = [(t.datetime_complete - t.datetime_start).total_seconds() for t in study.trials
                 if t.state == TrialState.COMPLETE]
    assert min(durations) > KILL_BEFORE_S, durations  # so the kill above landed mid-trial
    finished = study.get_trials(deepcopy=False, states=FINISHED)
    assert len(finished) == TRIALS, [(t.number, t.state) for t in study.trials]
    dead = study.trials[killed_at]
    assert dead.state == TrialState.FAIL
    retries = [t for t in study.trials if RetryHeartbeatStaleTrialCallback.retried_trial_number(t) == killed_at]
    assert len(retries) == 1 and retries[0].params == dead.params and retries[0].state in FINISHED
    others = [t for t in study.trials if t.state == TrialState.FAIL and t.number != killed_at]
    assert all(t.user_attrs.get("surplus") for t in others)  # only trials refused before any work
    assert not study.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.WAITING))
    run_ids = [t.user_attrs["mlflow_run_id"] for t in finished]
    assert len(set(run_ids)) == TRIALS
    assert not (tmp_path / "adapters" / ".done.json").exists()  # workers leave the stage to its own run

    stage = _cli(tmp_path, *SEARCH, storage)
    output, _ = stage.communicate(timeout=400)
    assert stage.returncode == 0, output
    results = pd.read_csv(tmp_path / "adapters" / "results.csv")
    trial_rows = results[results["kind"].isin(["trial", "pareto"])]  # not the baselines or the final model
    assert sorted(trial_rows["name"]) == sorted(f"trial_{t.number}" for t in finished)
    assert len(_the_study(postgres_db).get_trials(deepcopy=False, states=FINISHED)) == TRIALS  # no new trial
