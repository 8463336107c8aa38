"""The Optuna study of stage=adapters: storage, sampler, pruning and the Pareto set.

- **Storage** is an RDB (``sqlite:///<run_dir>/optuna.db`` by default, or PostgreSQL for many workers) with
  heartbeats: a trial whose worker died is failed once its heartbeat is two intervals old, and
  ``RetryHeartbeatStaleTrialCallback`` (Optuna's ``RetryFailedTrialCallback`` under its current name) enqueues
  it again once, with the same parameters. Finished trials are never redone: a rerun loads the study
  (``load_if_exists``) and runs only what is missing.
- **Many workers** share one study: each asks for a new trial only while the finished, running and waiting
  trials fall short of the target (:func:`needs_trial`), and a trial asked in the same instant by two workers is
  recognised by its number (:func:`is_surplus`) and failed before any work, so the target is met exactly.
- **Sampler**, pinned explicitly with its seed: TPE (multi-objective, ``n_startup_trials`` random trials
  first) or NSGA-II.
- **Objectives**: maximise validation accuracy, minimise trainable parameters.
- **Time budget**, optional: no new trial starts once the trial time the study has committed (finished trials,
  plus a typical trial for each running one) and a typical trial would pass it
  (:func:`next_trial_fits`). Trial time is summed over workers, so W workers spend it about W times as fast.
- **Pruning.** Optuna does not take intermediate values in multi-objective studies (``Trial.report`` raises),
  so each trial also has a twin in a single-objective study ``<name>:pruning`` in the same storage. The twin
  reports the intermediate validation accuracy and asks Optuna's ``MedianPruner``; the pruning decision is
  Optuna's, over the twins of earlier trials.
"""

from __future__ import annotations

import contextlib
import re
import statistics
import warnings

import optuna
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState

DIRECTIONS = ("maximize", "minimize")  # validation accuracy, trainable parameters
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
PRUNING_TWIN = "pruning_twin"


def hide_password(url: str) -> str:
    """``postgresql://user:secret@host/db`` shown as ``postgresql://user:***@host/db``."""
    return re.sub(r"(://[^:/@]+:)[^@]*@", r"\1***@", url)


def open_storage(url: str, heartbeat_s: int) -> RDBStorage:
    """The RDB storage at ``url``, with heartbeats and one retry of a trial whose worker died.

    An unreachable or unusable database raises a one-line ``ValueError`` naming the URL (password hidden)."""
    import sqlalchemy.exc

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        with _quiet_experimental():
            return RDBStorage(url, heartbeat_interval=heartbeat_s, grace_period=2 * heartbeat_s,
                              heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=1),
                              engine_kwargs=_engine_kwargs(url))
    except (sqlalchemy.exc.SQLAlchemyError, ImportError, ValueError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"optuna storage {hide_password(url)}: cannot open it ({reason})") from None


def _engine_kwargs(url: str) -> dict:
    if url.startswith("postgresql"):
        return {"connect_args": {"connect_timeout": 10}, "pool_pre_ping": True}
    return {}


@contextlib.contextmanager
def _quiet_experimental():
    """Optuna's heartbeats, retry callback and grouped TPE are marked experimental: chosen on purpose here, so
    their warnings would only be noise in every run's output."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        yield


def make_sampler(kind: str, seed: int, startup_trials: int) -> optuna.samplers.BaseSampler:
    if kind == "tpe":
        with _quiet_experimental():
            return optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup_trials, multivariate=True,
                                              group=True, constant_liar=True)
    if kind == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=max(2, startup_trials))
    raise ValueError(f"unknown sampler {kind!r} (expected tpe or nsga2)")


def open_study(storage: RDBStorage, name: str, sampler) -> optuna.Study:
    """The composition study ``name`` (created, or loaded to resume)."""
    return optuna.create_study(study_name=name, storage=storage, sampler=sampler, directions=list(DIRECTIONS),
                               load_if_exists=True)


def finished_trials(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """Completed and pruned trials: those that count towards the requested number."""
    return study.get_trials(deepcopy=False, states=FINISHED)


ACTIVE = (TrialState.RUNNING, TrialState.WAITING)


def typical_trial_seconds(study: optuna.Study) -> float:
    """Median duration of the study's completed trials (pruned ones stop early, so they would understate it);
    0 before the first completes."""
    durations = [t.duration.total_seconds() for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                 if t.duration is not None]
    return statistics.median(durations) if durations else 0.0


def committed_trial_seconds(study: optuna.Study) -> float:
    """Trial time the study has used or is bound to use: the durations of its finished trials, plus a typical
    trial's for each running one (a running trial's own clock would also count the downtime of a killed worker
    whose trial is not yet failed)."""
    finished = sum(t.duration.total_seconds() for t in finished_trials(study) if t.duration is not None)
    return finished + count(study, TrialState.RUNNING) * typical_trial_seconds(study)


def next_trial_fits(study: optuna.Study, budget_s: float | None) -> bool:
    """Whether a new trial is expected to end within ``budget_s`` seconds of trial time: the committed time plus a
    typical trial's. Always true without a budget (``None``)."""
    if budget_s is None:
        return True
    return committed_trial_seconds(study) + typical_trial_seconds(study) <= budget_s


def count(study: optuna.Study, *states: TrialState) -> int:
    return len(study.get_trials(deepcopy=False, states=states))


def needs_trial(study: optuna.Study, target: int) -> bool:
    """Whether this worker should run a trial now: a retry is waiting, or the finished and running trials (of
    every worker) fall short of ``target``."""
    return count(study, TrialState.WAITING) > 0 or count(study, *FINISHED, TrialState.RUNNING) < target


def is_surplus(study: optuna.Study, number: int, target: int) -> bool:
    """Whether trial ``number`` goes past ``target``: ``target`` live trials (finished, running or waiting) have
    smaller numbers. Failed trials do not count; their retries do."""
    live = study.get_trials(deepcopy=False, states=(*FINISHED, *ACTIVE))
    return sum(t.number < number for t in live) >= target


def pareto_numbers(study: optuna.Study) -> set[int]:
    """Numbers of the completed trials on the accuracy / parameter front."""
    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        return set()
    return {t.number for t in study.best_trials}


class MedianPruning:
    """Optuna's ``MedianPruner`` on intermediate validation accuracy, through single-objective twin trials."""

    def __init__(self, storage: RDBStorage, name: str, *, enabled: bool, startup_trials: int):
        self.enabled = enabled
        twins = RDBStorage(storage.url, engine_kwargs=_engine_kwargs(storage.url))  # asked and told by hand: no heartbeat
        self.study = optuna.create_study(
            study_name=f"{name}:pruning", storage=twins, direction="maximize", load_if_exists=True,
            sampler=optuna.samplers.RandomSampler(seed=0),
            pruner=optuna.pruners.MedianPruner(n_startup_trials=startup_trials, n_warmup_steps=0))
        self._twins: dict[int, optuna.Trial] = {}

    def should_prune(self, trial: optuna.Trial, step: int, val_accuracy: float) -> bool:
        """Report ``val_accuracy`` at ``step`` for ``trial``; whether Optuna's pruner stops it."""
        twin = self._twin(trial)
        twin.report(val_accuracy, step)
        return self.enabled and twin.should_prune()

    def finish(self, trial: optuna.Trial, val_accuracy: float | None) -> None:
        """Close ``trial``'s twin: completed with its final validation accuracy, or pruned (``None``)."""
        twin = self._twins.pop(trial.number, None)
        if twin is None:
            return
        if val_accuracy is None:
            self.study.tell(twin, state=TrialState.PRUNED)
        else:
            self.study.tell(twin, val_accuracy)

    def _twin(self, trial: optuna.Trial) -> optuna.Trial:
        if trial.number not in self._twins:
            twin = self.study.ask()
            trial.set_user_attr(PRUNING_TWIN, twin.number)
            self._twins[trial.number] = twin
        return self._twins[trial.number]
