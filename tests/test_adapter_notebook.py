"""notebooks/adapter_search.ipynb on a synthetic run directory.

The run directory holds a real MLflow SQLite store written through ``pipeline.tracking.Tracker`` with the adapters
experiment (``moa-autotune-adapters``) as ``stage=adapters`` logs it: search trials ``trial_<n>`` (one pruned, with
only its loss curve), the ``final`` model (the best Pareto composition retrained), the baselines ``base``, ``lora``
and ``moe_lora``, and the sparse-plan runs ``base+plan``, ``trial_<n>+plan`` and ``final@plan``, tagged ``kind``,
``pareto``, ``state``, ``plan``, ``composition``, ``run_dir``, ``trial`` and ``study``, with random but known
metrics. Beside them sit runs the notebook must leave out: a run of another run directory (the newest ``trial_1``),
a trial of an older study and an older ``lora`` run. The notebook runs headless
through papermill (as ``make notebooks`` runs it) with ``tests.test_eval_notebooks``' recorder cell first; the tests
check every plotted point, ring, error bar, bar and loss curve against the store, and the printed targets against an
oracle here.
"""

from __future__ import annotations

import math
import re
import time
from pathlib import Path
from types import SimpleNamespace

import nbformat
import numpy as np
import pytest

from tests.test_eval_notebooks import assert_no_empty_plot, close, execute, non_dominated, wilson

NOTEBOOK = "adapter_search.ipynb"
TASKS = ("arithmetic", "extraction", "long_context")
PER_TASK = 20  # test examples per task
VAL = 30  # validation examples
STUDY = "adapters-0123abcd"
STEPS = 8
RING = "Pareto trial (study front)"
STYLE = {"trial": "search trial", "lora": "lora (single LoRA baseline)", "moe_lora": "moe_lora (MoE-LoRA baseline)",
         "plan": "with sparse plan"}
# trial number -> (composition label, trainable params or None when pruned, skill)
TRIALS = {
    0: ("lora4[q,v]|soft", 2_048, 0.55),
    1: ("lora8[q,v]+parallel16|soft|L0-2", 6_144, 0.72),
    2: ("parallel32|sparse", 9_216, 0.5),
    3: ("lora16[q,k,v,o]+prompt4|soft", None, 0.3),
    4: ("lora4[q,v]+ia3[k,v,down]|sparse-h32|L1-2", 3_072, 0.66),
    5: ("lora16[q,k,v,o,gate,up,down]+parallel64|soft", 30_000, 0.8),
}


# ---------------------------------------------------------------------------------------------------------------
# the synthetic run directory
# ---------------------------------------------------------------------------------------------------------------
def scores(rng: np.random.Generator, skill: float, params: float) -> dict[str, float]:
    """The metrics ``_Harness.measure`` logs for a scored method."""
    correct = {task: int(rng.binomial(PER_TASK, skill)) for task in TASKS}
    k, n = sum(correct.values()), PER_TASK * len(TASKS)
    low, high = wilson(k, n)
    return {"trainable_params": float(params), "accuracy": k / n, "acc_lo": low, "acc_hi": high,
            "val_accuracy": int(rng.binomial(VAL, skill)) / VAL,
            "train_s": float(rng.uniform(0.05, 0.4)) if params else 0.0,
            "latency_overhead": float(rng.uniform(0.0, 0.3)) if params else 0.0,
            **{f"accuracy:{task}": c / PER_TASK for task, c in correct.items()},
            **({"router_specialisation": float(rng.uniform(0, 1))} if params else {})}


def losses(rng: np.random.Generator, skill: float, steps: int) -> list[tuple[int, float]]:
    return [(step, float(3.0 * math.exp(-0.25 * skill * step) + rng.uniform(0, 0.1))) for step in range(1, steps + 1)]


def write_run_dir(run_dir: Path) -> SimpleNamespace:
    """The synthetic run directory; returns what the tests check against (this run dir's current runs)."""
    from pipeline.tracking import Tracker, default_uri

    run_dir.mkdir(parents=True)
    uri = default_uri(run_dir)
    tracker = Tracker(uri, "moa-autotune-adapters", run_dir)
    rng = np.random.default_rng(11)
    mine = str(run_dir.resolve())

    def log(name, tags, metrics=None, curve=(), where=mine):
        with tracker.run(name, tags={"run_dir": where, "plan": "none", **tags}) as run:
            for step, loss in curve:
                run.log_metrics({"train_loss": loss}, step=step)
            if curve and metrics is None:
                run.log_metrics({"val_accuracy_halfway": 0.1}, step=STEPS // 2)
            if metrics is not None:
                run.log_metrics(metrics)
        time.sleep(0.005)  # distinct start times: the notebook keeps the newest run of a name
        return run.run_id

    # what the notebook must leave out: an older study's trial and an older lora run (and, below, a newer run of
    # another run directory)
    log("trial_7", {"kind": "trial", "composition": "lora4[q,v]|soft", "trial": "7", "study": "adapters-older",
                    "state": "complete", "pareto": "true"}, scores(rng, 0.97, 5_000), losses(rng, 0.9, STEPS))
    log("lora", {"kind": "baseline", "composition": "lora1[q,v]|none"}, scores(rng, 0.97, 1_000))

    runs, curves = {}, {}
    runs["base"] = scores(rng, 0.25, 0)
    log("base", {"kind": "baseline", "composition": "base"}, runs["base"])
    for number, (composition, params, skill) in TRIALS.items():
        name = f"trial_{number}"
        curves[name] = losses(rng, skill, STEPS if params else STEPS // 2)
        tags = {"kind": "trial", "composition": composition, "trial": str(number), "study": STUDY}
        if params is not None:
            runs[name] = scores(rng, skill, params)
        runs_id = log(name, tags, runs.get(name), curves[name])
        runs.setdefault("_ids", {})[name] = runs_id
    ids = runs.pop("_ids")
    complete = {f"trial_{n}" for n, (_, params, _) in TRIALS.items() if params is not None}
    front = non_dominated([(runs[n]["trainable_params"], runs[n]["val_accuracy"]) for n in complete])
    pareto = {n for n in complete if (runs[n]["trainable_params"], runs[n]["val_accuracy"]) in front}
    for name, run_id in ids.items():  # as _mark_pareto tags them after the study
        tracker.client.set_tag(run_id, "pareto", str(name in pareto).lower())
        tracker.client.set_tag(run_id, "state", "complete" if name in complete else "pruned")
    best = max(pareto, key=lambda n: (runs[n]["val_accuracy"], -runs[n]["trainable_params"]))
    runs["lora"] = scores(rng, 0.45, runs[best]["trainable_params"])  # as many params as the best Pareto trial
    runs["moe_lora"] = scores(rng, 0.9, 8_192)
    runs["base+plan"] = scores(rng, 0.22, 0)
    runs[f"{best}+plan"] = scores(rng, 0.6, runs[best]["trainable_params"])
    log("lora", {"kind": "baseline", "composition": "lora3[q,v]|none"}, runs["lora"])
    log("moe_lora", {"kind": "baseline", "composition": "lora4[q,v]x4|top2"}, runs["moe_lora"])
    log("base+plan", {"kind": "baseline", "composition": "base", "plan": "selected"}, runs["base+plan"])
    best_composition = TRIALS[int(best.split("_")[1])][0]
    log(f"{best}+plan", {"kind": "pareto", "composition": best_composition, "plan": "selected"}, runs[f"{best}+plan"])
    # the best composition retrained for adapters.final_steps, and its adapters scored under the plan
    runs["final"] = scores(rng, 0.95, runs[best]["trainable_params"])
    runs["final@plan"] = scores(rng, 0.7, runs[best]["trainable_params"])
    log("final", {"kind": "final", "composition": best_composition}, runs["final"])
    log("final@plan", {"kind": "final", "composition": best_composition, "plan": "selected"}, runs["final@plan"])
    log("trial_1", {"kind": "trial", "composition": "lora4[q,v]|soft", "trial": "1", "study": STUDY,
                    "state": "complete", "pareto": "true"}, scores(rng, 0.97, 100), losses(rng, 0.9, STEPS),
        where=str(run_dir.parent / "another-run"))  # the newest trial_1, of the same study, in another run dir
    # the stage's own run, in the pipeline experiment: not read
    stage = Tracker(uri, "moa-autotune", run_dir)
    with stage.run("adapters", tags={"run_dir": mine}) as run:
        run.log_metrics({f"accuracy:{name}": 0.5 for name in runs})
    Tracker(uri, "empty-adapters", run_dir)  # an adapters experiment without a run
    return SimpleNamespace(run_dir=run_dir, runs=runs, curves=curves, pareto=pareto, pruned={"trial_3"},
                           trials={f"trial_{n}" for n in TRIALS}, best=best)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return write_run_dir(tmp_path_factory.mktemp("adapter_notebook") / "run")


@pytest.fixture(scope="module")
def executed(synthetic, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("adapter_executed")
    figures = execute(NOTEBOOK, workdir, run_dir=str(synthetic.run_dir))
    notebook = nbformat.read(workdir / f"executed_{NOTEBOOK}", as_version=4)
    text = "".join(o.get("text", "") + o.get("data", {}).get("text/plain", "") for c in notebook.cells
                   if c.cell_type == "code" for o in c.outputs)
    return SimpleNamespace(figures=figures, text=text)


def panel(executed, title: str) -> dict:
    [ax] = [ax for figure in executed.figures for ax in figure["axes"] if ax["title"].startswith(title)]
    return ax


def point(metrics: dict) -> tuple[float, float]:
    return metrics["trainable_params"], metrics["accuracy"]


def dense_trials(synthetic) -> list[str]:
    return sorted(n for n in synthetic.runs if n.startswith("trial_") and not n.endswith("+plan"))


# ---------------------------------------------------------------------------------------------------------------
# the figures
# ---------------------------------------------------------------------------------------------------------------
def test_accuracy_plot_places_every_measured_run_once_with_its_interval(synthetic, executed):
    assert_no_empty_plot(executed.figures)
    ax = panel(executed, "Test accuracy against trainable parameters")
    assert "parameters" in ax["xlabel"] and "accuracy" in ax["ylabel"]
    runs = synthetic.runs
    expected = {STYLE["trial"]: dense_trials(synthetic), STYLE["lora"]: ["lora"], STYLE["moe_lora"]: ["moe_lora"],
                "final": ["final"], STYLE["plan"]: [f"{synthetic.best}+plan", "final@plan"]}
    plotted = {b["label"]: b for b in ax["errorbars"]}
    assert set(plotted) == set(expected), "trials, the final model, the two baselines and the plan runs; nothing else"
    every_point = []
    for label, names in expected.items():
        bars = plotted[label]
        assert len(bars["xy"]) == len(names), label
        shown, wanted = sorted(map(tuple, bars["xy"])), sorted(point(runs[n]) for n in names)
        assert close([v for p in shown for v in p], [v for p in wanted for v in p]), label
        for name in names:
            x, y = point(runs[name])
            bounds = (x, x, runs[name]["acc_lo"], runs[name]["acc_hi"])
            ends = [sorted(s, key=lambda p: p[1]) for s in bars["segments"] if math.isclose(s[0][0], x)]
            matching = [e for e in ends if close((e[0][0], e[1][0], e[0][1], e[1][1]), bounds)]
            assert len(matching) == 1, name  # one bar at its x spans its interval (runs may share an x)
        every_point += [tuple(p) for p in bars["xy"]]
    measured = [point(m) for n, m in runs.items() if m["trainable_params"] > 0]
    assert sorted(every_point) == sorted(measured), "every plotted point is exactly one run's metrics"
    assert not synthetic.pruned & set(runs), "the pruned trial has no accuracy to place"

    [ring] = [s for s in ax["scatter"] if s["label"] == RING]
    assert sorted(map(tuple, ring["xy"])) == sorted(point(runs[n]) for n in synthetic.pareto)
    assert 0 < len(synthetic.pareto) < len(dense_trials(synthetic)), "some trial must be off the front"

    lines = {line["label"]: line["xy"] for line in ax["lines"] if not line["label"].startswith("_")}
    assert set(lines) == {"frozen base", "frozen base, with sparse plan"}
    for label, name in (("frozen base", "base"), ("frozen base, with sparse plan", "base+plan")):
        assert {y for _, y in lines[label]} == {runs[name]["accuracy"]}, label


def test_per_task_bars_are_the_runs_task_accuracies(synthetic, executed):
    ax = panel(executed, "Per-task test accuracy")
    shown = {"base", "lora", "moe_lora", "base+plan", f"{synthetic.best}+plan", "final", "final@plan",
             *synthetic.pareto}
    bars = {b["label"]: b["bars"] for b in ax["bars"]}
    assert set(bars) == shown
    for name, rectangles in bars.items():
        heights = [h for _, h in sorted(rectangles)]
        assert close(heights, [synthetic.runs[name][f"accuracy:{task}"] for task in sorted(TASKS)]), name


def test_loss_curves_are_every_trials_history_with_pruned_ones_marked(synthetic, executed):
    ax = panel(executed, "Training loss of every trial")
    lines = {line["label"]: line["xy"] for line in ax["lines"]}

    def label(name):
        return f"{name} (pruned)" if name in synthetic.pruned else f"{name} (Pareto)" if name in synthetic.pareto \
            else name

    assert set(lines) == {label(name) for name in synthetic.trials}
    for name in synthetic.trials:
        assert close([v for p in lines[label(name)] for v in p], [v for p in synthetic.curves[name] for v in p]), name
    assert len(lines[label("trial_3")]) == STEPS // 2


# ---------------------------------------------------------------------------------------------------------------
# the printed table and targets
# ---------------------------------------------------------------------------------------------------------------
def expected_target(synthetic, baseline: str, share: float):
    """(verdict, Pareto composition, accuracy gain, intervals apart) from the synthetic runs: the candidates are the
    Pareto trials and the final model (the best of them retrained longer)."""
    runs = synthetic.runs
    rival = runs[baseline]
    within = [n for n in (*synthetic.pareto, "final")
              if runs[n]["trainable_params"] <= share * rival["trainable_params"]]
    if not within:
        return "NO", None, None, None
    best = max(within, key=lambda n: (runs[n]["accuracy"], -runs[n]["trainable_params"]))
    gain = runs[best]["accuracy"] - rival["accuracy"]
    apart = runs[best]["acc_lo"] > rival["acc_hi"] or runs[best]["acc_hi"] < rival["acc_lo"]
    return "YES" if gain > 0 else "NO", best, gain, apart


def test_targets_are_computed_from_the_runs(synthetic, executed):
    verdicts = []
    for number, baseline, share in ((1, "lora", 1.0), (2, "moe_lora", 0.5)):
        [line] = [line for line in executed.text.splitlines() if line.startswith(f"target {number} ")]
        verdict, best, gain, apart = expected_target(synthetic, baseline, share)
        verdicts.append(verdict)
        assert f"): {verdict}: " in line, line
        if best is not None:
            assert f"{verdict}: {best} (" in line and f": {gain:+.3f} " in line, line
            assert ("intervals apart" if apart else "intervals overlap") in line, line
        else:
            assert "no Pareto composition has at most" in line, line
    assert sorted(verdicts) == ["NO", "YES"], "the synthetic data should answer one target yes and one no"
    assert expected_target(synthetic, "lora", 1.0)[1] == "final", "the final model must count as a candidate"
    runs = synthetic.runs
    assert runs["lora"]["trainable_params"] == runs[synthetic.best]["trainable_params"], "'no more' includes equal"
    assert expected_target(synthetic, "moe_lora", 1.0)[1] != expected_target(synthetic, "moe_lora", 0.5)[1], \
        "the half budget must change the answer"

    plan_lines = [line for line in executed.text.splitlines() if line.startswith("target 3 ")]
    found = {m[1]: (m[2], float(m[3])) for line in plan_lines
             if (m := re.match(r"target 3 \(sparse plan\): (\S+) .* vs (\S+) dense .*: ([+-]\d+\.\d{3})$", line))}
    expected = {f"{synthetic.best}+plan": synthetic.best, "base+plan": "base", "final@plan": "final"}
    assert len(plan_lines) == len(found) == len(expected), plan_lines
    for name, dense in expected.items():
        assert found[name][0] == dense
        assert math.isclose(found[name][1], round(runs[name]["accuracy"] - runs[dense]["accuracy"], 3), abs_tol=1e-9)


def test_table_lists_every_run_by_accuracy_and_says_how_many_were_pruned(synthetic, executed):
    assert re.search(r"^1 pruned trial \(trial_3\): no test accuracy", executed.text, re.M), executed.text[:2000]
    table = executed.text.split("All runs by test accuracy")[1].split("target 1")[0]
    names = [line.split()[0] for line in table.splitlines()[2:] if line.strip()]
    measured = sorted(synthetic.runs, key=lambda n: (-synthetic.runs[n]["accuracy"],
                                                     synthetic.runs[n]["trainable_params"]))
    assert names == measured + sorted(synthetic.pruned), "this run dir's current runs, by accuracy; pruned last"


# ---------------------------------------------------------------------------------------------------------------
# an empty experiment (a mistyped run directory: tests/test_eval_notebooks.py, for every notebook)
# ---------------------------------------------------------------------------------------------------------------
def test_an_empty_experiment_is_a_clear_error(synthetic, tmp_path):
    from papermill.exceptions import PapermillExecutionError

    store = synthetic.run_dir / "mlflow.db"
    with pytest.raises(PapermillExecutionError, match=r"LookupError") as error:
        execute(NOTEBOOK, tmp_path, run_dir=str(synthetic.run_dir), experiment="empty")
    assert str(store) in str(error.value) and "'empty-adapters' has no run" in str(error.value)
    assert "run stage=adapters" in str(error.value)
