"""stage=adapters: search a heterogeneous Mixture of Adapters with Optuna; compare it with the baselines.

1. **Base**: the frozen model's validation and test accuracy on the procedurally generated tasks.
2. **Search**: a multi-objective Optuna study (maximise validation accuracy, minimise trainable parameters) over
   compositions from ``search_spaces/adapters.yaml``; each trial trains on the mixed tasks, may be pruned on its
   validation accuracy halfway, and is then scored on the test split. Its adapters are saved under
   ``adapters/trial_<n>/``; it is one MLflow run in ``<experiment>-adapters``. A loss that turns NaN prunes the
   trial. A rerun resumes the study from its RDB storage without redoing a finished trial. The search stops early
   when the next trial would pass ``adapters.optuna.time_budget_min`` minutes of trial time.
3. **Final comparison**, through the same harness and for ``adapters.final_steps`` optimiser steps each (a
   trial's ``adapters.steps`` is a short proxy): ``final`` (the most accurate Pareto composition, retrained at its
   trial's learning rate), ``lora`` (one LoRA, at least as many parameters as that composition) and ``moe_lora``
   (homogeneous LoRA experts under a top-k router). With ``final_steps`` equal to ``steps`` there is no ``final``
   row: the trial itself is the final model.
4. **With the sparse plan** (``adapters.plan``): the base model and the final model's own adapters, trained on
   dense attention, scored with the plan applied (``final@plan``, or ``trial_<n>@plan``), and with
   ``adapters.plan_training`` that composition retrained with the plan (``final+plan``).

Writes ``adapters/results.csv`` (``name, kind, composition, trainable_params, accuracy, acc_lo, acc_hi,
val_accuracy, train_s, latency_overhead, steps``; ``kind`` is ``trial``, ``pareto``, ``final`` or ``baseline``;
``train_s`` is the median seconds per optimiser step; ``latency_overhead`` is greedy generation time over the base
model's on dense attention, minus one; ``steps`` the optimiser steps the adapters trained for).
"""

from __future__ import annotations

import json
import math
import os
import socket
import time

import optuna
import pandas as pd

from pipeline import io
from pipeline.adapters import (
    Composition,
    ExpertSpec,
    RouterSpec,
    composition_from_dict,
    detach_adapters,
    load_adapters,
    save_adapters,
    validate_composition,
)
from pipeline.adapters.attach import adapter_dtype, decoder_layers, target_linear
from pipeline.adapters.training import TrainingDiverged
from pipeline.errors import UserError
from pipeline.plan import load_plan
from pipeline.search import fitting
from pipeline.search.space import every_choice, suggest
from pipeline.search.study import (
    MedianPruning,
    committed_trial_seconds,
    count,
    finished_trials,
    is_surplus,
    make_sampler,
    needs_trial,
    next_trial_fits,
    open_storage,
    open_study,
    pareto_numbers,
    typical_trial_seconds,
)
from pipeline.settings import DTYPES, budget_label
from pipeline.sparse_runtime import plan_applied_if
from pipeline.stages.registry import stage
from pipeline.tracking import Tracker

COLUMNS = ("name", "kind", "composition", "trainable_params", "accuracy", "acc_lo", "acc_hi", "val_accuracy",
           "train_s", "latency_overhead", "steps")
RESULT = "result"  # the trial's user attribute holding its results.csv row
WORKER_ID = f"{socket.gethostname()}:{os.getpid()}"


def _needs_plan(cfg) -> tuple[str, ...]:
    return ("validate",) if cfg.adapters.get("plan") == "selected" else ()


def _is_worker(cfg) -> bool:
    return bool(cfg.adapters.get("optuna", {}).get("worker", False))


@stage("adapters", config_keys=("adapters",), outputs=("adapters/",), requires_when=_needs_plan,
       requires_when_hint="set adapters.plan=null to search without the sparse plan",
       worker_when=_is_worker, hash_excludes=("adapters.optuna.worker",))
def run_adapters(ctx):
    """Optuna search of adapter compositions, against the frozen base, single LoRA and MoE-LoRA."""
    settings = ctx.settings.adapters
    worker = settings.optuna.worker
    dtype = settings.compute_dtype(ctx.settings.model.dtype, ctx.settings.run.torch_device())
    loaded = ctx.load_model(dtype)
    model, tokenizer, info = loaded.model, loaded.tokenizer, loaded.info
    kept = str(adapter_dtype(DTYPES[dtype])).removeprefix("torch.")
    print(f"adapters: frozen base in {dtype}, adapters in {kept}", flush=True)
    ctx.log_params({"base_dtype": dtype})
    plan = None if worker else _plan(ctx, settings, info)  # refuses a plan made for other weights before training
    _check_compositions(settings, model, info.num_layers)
    data = fitting.task_data(tokenizer, settings)
    runs = Tracker(ctx.tracker.uri, f"{ctx.settings.tracking.experiment}-adapters", ctx.run_dir)
    harness = _Harness(ctx, model, tokenizer, data, runs)

    base = None if worker else harness.cached("base", lambda: harness.measure("base", "baseline", None))
    study, storage = _study(ctx, settings)
    _search(ctx, harness, study, storage, base)
    if worker:  # the invocation that runs the stage itself scores the baselines and writes the results
        mine = [t.number for t in finished_trials(study) if t.user_attrs.get("worker") == WORKER_ID]
        print(f"worker {WORKER_ID}: finished trials {mine} of study {study.study_name}", flush=True)
        return {"worker": WORKER_ID, "trials": mine}
    pareto = pareto_numbers(study)
    trials = finished_trials(study)
    rows = [{**t.user_attrs[RESULT], "kind": "pareto" if t.number in pareto else "trial"}
            for t in trials if RESULT in t.user_attrs]
    best = _most_accurate([t for t in trials if t.number in pareto])
    final = _final(harness, settings, best)
    rows += [base, *([final] if final else []), *_baselines(harness, settings, best, info)]
    if plan is not None:
        rows += _with_plan(harness, plan, best, final)
    frame = pd.DataFrame(rows, columns=list(COLUMNS))
    io.write_csv(ctx.artifacts.adapter_results, frame)
    ctx.log_artifact(ctx.artifacts.adapter_results)
    _mark_pareto(runs, study, pareto)
    ctx.log_metrics(_summary(frame))
    print(_table(frame), flush=True)
    return {"trials": len(trials), "pareto": sorted(pareto), "rows": len(frame)}


class _Harness:
    """Trains and scores one method at a time, logs it as an MLflow run, and caches finished baselines."""

    def __init__(self, ctx, model, tokenizer, data, runs: Tracker):
        self.ctx, self.model, self.tokenizer, self.data, self.runs = ctx, model, tokenizer, data, runs
        self.settings = ctx.settings.adapters

    def cached(self, name: str, compute) -> dict:
        """A baseline's row, computed once per config (kept under ``adapters/.partial/<hash>/``)."""
        path = self.ctx.partial_dir / f"{name}.json"
        if path.is_file():
            return json.loads(path.read_text())
        row = compute()
        io.write_json(path, row)
        return row

    def measure(self, name: str, kind: str, composition: Composition | None, *, lr: float = 0.0, plan=None,
                steps: int | None = None, trial: optuna.Trial | None = None, pruning: MedianPruning | None = None,
                trained: str | None = None) -> dict:
        """Train ``composition`` (``None``: the frozen base) for ``steps`` (default: a trial's ``adapters.steps``)
        with ``plan`` applied, score it, save it, log it. With ``trained`` (an earlier method's name, trained for
        ``steps``), its saved adapters are loaded and scored instead: no training, nothing saved."""
        s, model = self.settings, self.model
        steps = 0 if composition is None else steps or s.steps
        tags = {"kind": kind, "run_dir": str(self.ctx.run_dir.resolve()), "plan": "none" if plan is None else "selected",
                "composition": composition.label() if composition else "base"}
        if trial is not None:
            tags.update({"trial": str(trial.number), "study": trial.study.study_name})
        with self.runs.run(name, tags=tags) as run:
            if trial is not None:
                trial.set_user_attr("mlflow_run_id", run.run_id)
            run.log_params({"lr": lr, "plan": tags["plan"], "steps": steps,
                            **({"composition": json.dumps(composition.to_dict())} if composition else {})})
            params, train_s, stats = 0, 0.0, {}
            try:
                with plan_applied_if(model, plan, backend=s.backend):
                    if trained is not None:
                        adapter_set = load_adapters(model, self.ctx.artifacts.adapter_weights(trained),
                                                    base_fingerprint=self.ctx.load_model().info.fingerprint)
                        params = adapter_set.num_trainable()
                        run.set_tags({"scored_from": trained})
                    elif composition is not None:
                        adapter_set, result = fitting.fit(model, composition, self.data, s, lr=lr, seed=s.seed,
                                                          steps=steps, on_step=self._on_step(run, trial, pruning))
                        params, train_s = adapter_set.num_trainable(), result.seconds_per_step
                        stats = adapter_set.router_stats()
                    val = fitting.score(model, self.tokenizer, self.data.val, s)
                    test = fitting.score(model, self.tokenizer, self.data.test, s)
                overhead = fitting.latency_overhead(model, self.tokenizer, self.data.test, s, plan=plan,
                                                    backend=s.backend)
                if composition is not None and trained is None:
                    digest = save_adapters(adapter_set, self.ctx.artifacts.adapter_weights(name),
                                           base_fingerprint=self.ctx.load_model().info.fingerprint)
                    run.set_tags({"adapter_digest": digest})
            finally:
                if getattr(model, "moa_adapters", None) is not None:
                    detach_adapters(model)
            lo, hi = test.interval
            row = {"name": name, "kind": kind, "composition": composition.label() if composition else "frozen base",
                   "trainable_params": params, "accuracy": test.accuracy, "acc_lo": lo, "acc_hi": hi,
                   "val_accuracy": val.accuracy, "train_s": train_s, "latency_overhead": overhead, "steps": steps}
            run.log_metrics({**{k: v for k, v in row.items() if isinstance(v, int | float)},
                             **{f"accuracy:{t}": a for t, a in test.per_task.items()},
                             **{f"router_{k}": v for k, v in stats.items()}})
        return row

    def _on_step(self, run, trial, pruning):
        """Log the loss; halfway, score validation accuracy and let the pruner stop the trial."""
        halfway = max(1, self.settings.steps // 2)

        def on_step(step: int, loss: float) -> None:
            run.log_metrics({"train_loss": loss}, step=step)
            if trial is None or step != halfway:
                return
            val = fitting.score(self.model, self.tokenizer, self.data.val, self.settings)
            run.log_metrics({"val_accuracy_halfway": val.accuracy}, step=step)
            if pruning is not None and pruning.should_prune(trial, step, val.accuracy):
                run.set_tags({"state": "pruned"})
                raise optuna.TrialPruned(f"validation accuracy {val.accuracy:.3f} at step {step}")

        return on_step


def _plan(ctx, settings, info):
    """The plan adapters also run with: validate's at the first budget, a given file, or none."""
    if settings.plan is None:
        return None
    path = (ctx.artifacts.selected_plan_at(budget_label(ctx.settings.optimize.budgets[0]))
            if settings.plan == "selected" else settings.plan)
    try:
        return load_plan(path, info)
    except ValueError as err:
        raise UserError(f"adapters.plan: {err}") from None


def _check_compositions(settings, model, num_layers: int) -> None:
    """Every choice of the search space and both baselines must fit the model: fail before any training."""
    checks = [("adapters.search_space", c) for c in every_choice(settings.search_space, num_layers)]
    checks += [("adapters.baselines", _lora(settings, 1)), ("adapters.baselines", _moe_lora(settings))]
    for key, composition in checks:
        try:
            validate_composition(composition, model)
        except ValueError as err:
            raise UserError(f"{key}: {err}") from None


def _study(ctx, settings):
    opt = settings.optuna
    url = opt.storage or f"sqlite:///{ctx.artifacts.optuna_db.resolve()}"
    try:
        storage = open_storage(url, opt.heartbeat_s)
    except ValueError as err:
        raise UserError(str(err)) from None
    name = f"{opt.study_name}-{ctx.config_hash}"  # another config is another study
    if ctx.force and not opt.worker:  # a worker joins the shared study; only the stage's own run may reset it
        for existing in (name, f"{name}:pruning"):
            try:
                optuna.delete_study(study_name=existing, storage=storage)
            except KeyError:
                pass
    study = open_study(storage, name, make_sampler(opt.sampler, opt.sampler_seed, opt.startup_trials))
    if not study.get_trials(deepcopy=False):  # a new study starts from the search space's known-good trials
        for params in settings.search_space.start:
            study.enqueue_trial(params, skip_if_exists=True)
    return study, storage


class SurplusTrial(Exception):
    """A trial asked in the same instant as another worker's, past the study's target: failed before any work."""


def _search(ctx, harness: _Harness, study, storage, base: dict) -> None:
    """Run trials until ``adapters.optuna.trials`` have finished (completed or pruned) in the study, counting the
    trials of every worker on the same storage, or until no further trial fits ``adapters.optuna.time_budget_min``
    (:func:`pipeline.search.study.next_trial_fits`). While the rest are running elsewhere this invocation waits,
    failing the trials of dead workers (their retries are then run here)."""
    settings = harness.settings
    opt = settings.optuna
    pruning = MedianPruning(storage, study.study_name, enabled=opt.pruner == "median",
                            startup_trials=opt.pruner_startup_trials)
    num_layers = ctx.load_model().info.num_layers

    def objective(trial: optuna.Trial):
        if is_surplus(study, trial.number, opt.trials):
            trial.set_user_attr("surplus", True)
            raise SurplusTrial(f"trial {trial.number} is past the target of {opt.trials}")
        composition, lr = suggest(trial, settings.search_space, num_layers)
        validate_composition(composition, harness.model)
        trial.set_user_attr("composition", composition.to_dict())
        trial.set_user_attr("worker", WORKER_ID)
        try:
            row = harness.measure(f"trial_{trial.number}", "trial", composition, lr=lr, trial=trial, pruning=pruning)
        except optuna.TrialPruned:
            pruning.finish(trial, None)
            raise
        except TrainingDiverged as err:
            trial.set_user_attr("failure", str(err))
            pruning.finish(trial, None)
            raise optuna.TrialPruned(f"diverged: {err}") from None
        pruning.finish(trial, row["val_accuracy"])
        trial.set_user_attr(RESULT, row)
        return row["val_accuracy"], row["trainable_params"]

    bar = ctx.progress(total=opt.trials, initial=min(len(finished_trials(study)), opt.trials), desc="adapter trials")
    waiting_said = False
    while len(finished_trials(study)) < opt.trials:
        fits = next_trial_fits(study, opt.time_budget_s)
        if not fits and not count(study, optuna.trial.TrialState.RUNNING):
            break
        if fits and needs_trial(study, opt.trials):
            study.optimize(objective, n_trials=1, catch=(SurplusTrial,), gc_after_trial=True)
        else:
            if not waiting_said:
                print(f"study {study.study_name}: the remaining trials are running in other workers; waiting",
                      flush=True)
                waiting_said = True
            time.sleep(opt.heartbeat_s)
            optuna.storages.fail_stale_trials(study)  # a dead worker's trial fails here and is retried once
        bar.n = min(len(finished_trials(study)), opt.trials)
        bar.refresh()
    bar.close()
    finished = len(finished_trials(study))
    base_note = "" if base is None else f", base validation accuracy {base['val_accuracy']:.3f}"
    print(f"study {study.study_name}: {finished} trials finished{base_note}", flush=True)
    if finished < opt.trials:
        print(f"study {study.study_name}: {committed_trial_seconds(study) / 60:.1f} min of trial time spent, and "
              f"a trial takes about {typical_trial_seconds(study) / 60:.1f} min: the next would end past the search "
              f"budget of {opt.time_budget_min:g} min, so {opt.trials - finished} of the {opt.trials} trials were not "
              "run (adapters.optuna.time_budget_min=null runs them all)", flush=True)


def _most_accurate(trials) -> optuna.trial.FrozenTrial | None:
    """The Pareto trial with the best validation accuracy (then the fewest parameters)."""
    if not trials:
        return None
    return max(trials, key=lambda t: (t.values[0], -t.values[1]))


def _lora(settings, rank: int) -> Composition:
    return Composition(experts=(ExpertSpec("lora", size=rank, alpha=2.0 * rank, targets=settings.lora_targets),),
                       router=RouterSpec(kind="none"))


def _moe_lora(settings) -> Composition:
    rank = settings.moe_lora_rank
    expert = ExpertSpec("lora", size=rank, alpha=2.0 * rank, targets=settings.moe_lora_targets,
                        count=settings.moe_lora_experts)
    return Composition(experts=(expert,), router=RouterSpec(kind="topk", top_k=settings.moe_lora_top_k))


def _final(harness: _Harness, settings, best) -> dict | None:
    """The most accurate Pareto composition retrained for ``adapters.final_steps`` at its trial's learning rate, as
    ``final``; None without a Pareto trial, or when ``final_steps`` equals a trial's steps (the trial is final)."""
    if best is None or settings.final_steps == settings.steps:
        return None
    composition = composition_from_dict(best.user_attrs["composition"])
    return harness.cached("final", lambda: harness.measure("final", "final", composition, lr=best.params["lr"],
                                                           steps=settings.final_steps))


def _baselines(harness: _Harness, settings, best, info) -> list[dict]:
    """Single LoRA with at least the best Pareto trial's parameters, and homogeneous MoE-LoRA, each trained for
    ``adapters.final_steps`` like the final composition."""
    target = best.values[1] if best is not None else 0
    rank = _matched_rank(settings, harness.model, target)
    lr = best.params.get("lr", settings.search_space.lr.low) if best is not None else settings.search_space.lr.low
    steps = settings.final_steps
    lora = harness.cached(f"lora_r{rank}", lambda: harness.measure("lora", "baseline", _lora(settings, rank), lr=lr,
                                                                   steps=steps))
    moe = harness.cached("moe_lora", lambda: harness.measure("moe_lora", "baseline", _moe_lora(settings), lr=lr,
                                                             steps=steps))
    return [lora, moe]


def _matched_rank(settings, model, params: float) -> int:
    """The smallest LoRA rank whose parameter count reaches ``params`` (rank 1 at least)."""
    per_rank = _lora_params_per_rank(settings, model)
    return max(1, math.ceil(params / per_rank))


def _lora_params_per_rank(settings, model) -> int:
    """A rank-1 LoRA's parameters on every target of every layer: ``in + out`` per projection."""
    return sum(target_linear(layer, t).in_features + target_linear(layer, t).out_features
               for layer in decoder_layers(model) for t in settings.lora_targets)


def _with_plan(harness: _Harness, plan, best, final: dict | None) -> list[dict]:
    """The base model and the final model (``final``, else the most accurate Pareto trial) scored with the plan
    applied: its dense-trained adapters, and with ``adapters.plan_training`` the composition retrained under the
    plan for as many steps."""
    rows = [harness.cached("base+plan", lambda: harness.measure("base+plan", "baseline", None, plan=plan))]
    if best is not None:
        composition = composition_from_dict(best.user_attrs["composition"])
        dense = "final" if final is not None else f"trial_{best.number}"
        kind, steps = ("final", final["steps"]) if final is not None else ("pareto", harness.settings.steps)
        if harness.settings.plan_training:
            name = f"{dense}+plan"
            rows.append(harness.cached(name, lambda: harness.measure(name, kind, composition, lr=best.params["lr"],
                                                                    plan=plan, steps=steps)))
        if harness.ctx.artifacts.adapter_weights(dense).is_dir():  # a trial run by another machine's worker: not here
            scored = f"{dense}@plan"  # the adapters trained on dense attention, scored under the plan
            rows.append(harness.cached(scored, lambda: harness.measure(scored, kind, composition, plan=plan,
                                                                      steps=steps, trained=dense)))
    return rows


def _mark_pareto(runs: Tracker, study, pareto: set[int]) -> None:
    """Tag every trial's MLflow run with whether it is on the Pareto front; runs of dead workers end KILLED."""
    for trial in study.get_trials(deepcopy=False):
        run_id = trial.user_attrs.get("mlflow_run_id")
        if run_id is None:
            continue
        runs.client.set_tag(run_id, "pareto", str(trial.number in pareto).lower())
        runs.client.set_tag(run_id, "state", trial.state.name.lower())
        info = runs.client.get_run(run_id).info
        if trial.state == optuna.trial.TrialState.FAIL and info.status == "RUNNING":
            runs.client.set_terminated(run_id, status="KILLED")  # its worker died mid-trial
        elif trial.state == optuna.trial.TrialState.PRUNED and info.status == "FAILED":
            # stopped by the pruner, not broken; it keeps the end time it had
            runs.client.set_terminated(run_id, status="FINISHED", end_time=info.end_time)


def _summary(frame: pd.DataFrame) -> dict[str, float]:
    metrics = {"trials": float(frame["name"].str.fullmatch(r"trial_\d+").sum())}
    for row in frame.itertuples():
        metrics[f"accuracy:{row.name}"] = row.accuracy
        metrics[f"trainable_params:{row.name}"] = row.trainable_params
    return metrics


def _table(frame: pd.DataFrame) -> str:
    shown = frame[["name", "kind", "steps", "trainable_params", "accuracy", "acc_lo", "acc_hi", "val_accuracy",
                   "train_s", "latency_overhead", "composition"]].copy()
    return "Adapters (test accuracy with 95% interval):\n" + shown.round(3).to_string(index=False)
