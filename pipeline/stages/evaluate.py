"""stage=evaluate: every method x budget x task x length, through one runtime.

Methods: ``dense``; per budget of ``optimize.density_budget``, ``moa`` (validate's selection), ``binary``
(DuoAttention-style: each head full or streaming, optimize's two rules solved again at each length for the MoA
plan's KV density there, :func:`pipeline.optimize.baselines.binary_plan_at`) and ``uniform`` (one sink-plus-window
for every head, sized at each length to the MoA plan's KV density there). Per (method, budget, task, length) it records accuracy with its 95%
Wilson interval, agreement with dense's answers, KL from dense on dense's response tokens, held-out perplexity,
prefill and per-token decode latency and their speed-up over dense (paired by prompt), KV bytes and densities
(see :mod:`pipeline.evaluation.harness`).

Every method, dense included, runs in ``evaluate.dtype`` (``auto``: bfloat16 where the device has bf16 units, else
``model.dtype``); the plans were profiled and validated in ``model.dtype``.

Writes ``eval/results.csv`` and, per item, every method's response beside the gold answer and dense's response in
``eval/answers.csv``; each (method, budget) is also a nested MLflow run. Finished (method, budget, length)
cells are kept under ``evaluate/.partial/<config hash>/``, so a killed run resumes where it stopped.
"""

from __future__ import annotations

import json
from functools import partial

import pandas as pd

from pipeline import io
from pipeline.calibration.builder import end_token_ids
from pipeline.errors import UserError
from pipeline.evaluation.harness import (
    Method,
    answer_rows,
    eval_items,
    heldout_text,
    result_rows,
    run_method,
)
from pipeline.optimize.baselines import uniform_window_plan
from pipeline.plan import load_plan, plan_kv_density
from pipeline.settings import budget_label
from pipeline.stages.optimize import binary_builder
from pipeline.stages.registry import stage

COLUMNS = ("method", "budget", "plan_id", "task", "seq_len", "n", "accuracy", "acc_lo", "acc_hi", "agree_dense",
           "kl_dense", "ppl", "prefill_ms", "decode_ms_per_token", "kv_bytes", "kv_density", "attention_density",
           "prefill_speedup", "decode_speedup")
ANSWER_COLUMNS = ("method", "budget", "plan_id", "task", "seq_len", "item", "answer", "response", "correct",
                  "dense_response", "agrees_dense")
METRICS = COLUMNS[6:]
TASK_METRICS = ("accuracy", "acc_lo", "acc_hi", "agree_dense", "kl_dense")
LENGTH_METRICS = ("ppl", "prefill_ms", "decode_ms_per_token", "kv_bytes", "kv_density", "attention_density",
                  "prefill_speedup", "decode_speedup")


@stage("evaluate", requires=("validate",),
       config_keys=("sparse", "calibration", "profile", "optimize", "validate", "evaluate"), outputs=("eval/",))
def run_evaluate(ctx):
    """Accuracy, fidelity, perplexity and cost of dense, MoA and baseline plans at every length."""
    settings = ctx.settings.evaluate
    dtype = settings.compute_dtype(ctx.settings.model.dtype, ctx.settings.run.torch_device())
    loaded = ctx.load_model(dtype)  # every method, dense included, runs in this dtype
    print(f"evaluate: every method in {dtype}", flush=True)
    ctx.log_params({"eval_dtype": dtype})
    model, tokenizer, info = loaded.model, loaded.tokenizer, loaded.info
    plans = _budget_plans(ctx, info)  # refuses a wrong-model plan before any evaluation
    binary_at = binary_builder(ctx, info)
    eos_ids = end_token_ids(model, tokenizer)
    rows, answers = [], []

    def keep(path):
        cell = json.loads(path.read_text())  # {"rows": [...], "answers": [...]}
        rows.extend(cell["rows"])
        answers.extend(cell["answers"])

    for length in ctx.progress(settings.lengths, desc="evaluate lengths"):
        methods = _methods(plans, info, length, binary_at)
        cells = {m: ctx.partial_dir / f"{m.name}_{m.budget or 'all'}_{length}.json" for m in methods}
        if all(path.is_file() for path in cells.values()):
            for path in cells.values():
                keep(path)
            continue
        try:
            items = eval_items(tokenizer, settings.tasks, length, settings.samples, settings.max_new_tokens,
                               settings.seed)
        except ValueError as err:
            raise UserError(f"evaluate.lengths: {length} is too short ({err})") from None
        text = heldout_text(tokenizer, length, settings.seed)
        generate = partial(run_method, model, tokenizer, items=items, eos_ids=eos_ids,
                           max_new_tokens=settings.max_new_tokens, text=text, backend=settings.backend)
        dense_run = generate(methods[0])
        dense = dense_run.generations  # every other method is compared with dense's own answers
        for method in ctx.progress(methods, desc=f"methods N={length}", leave=False):
            if not cells[method].is_file():
                run = dense_run if method is methods[0] else generate(method, dense=dense)
                answers_here = answer_rows(tokenizer, method, length, items, run.generations, dense)
                io.write_json(cells[method], {
                    "rows": result_rows(model, method, length, answers_here, run.generations, dense, run.ppl,
                                        backend=settings.backend),
                    "answers": answers_here})
            keep(cells[method])
    frame = pd.DataFrame(rows, columns=list(COLUMNS))
    io.write_csv(ctx.artifacts.eval_results, frame)
    io.write_csv(ctx.artifacts.eval_answers, pd.DataFrame(answers, columns=list(ANSWER_COLUMNS)))
    ctx.log_artifact(ctx.artifacts.eval_results)
    ctx.log_artifact(ctx.artifacts.eval_answers)
    _log_methods(ctx, frame, dtype)
    print(_table(frame), flush=True)
    return {"rows": len(frame), "methods": sorted(set(zip(frame["method"], frame["budget"], strict=True)))}


def _budget_plans(ctx, info) -> dict[str, dict]:
    """Per budget label: the selected MoA plan and the binary baseline, each checked against the model."""
    plans = {}
    for budget in (budget_label(b) for b in ctx.settings.optimize.budgets):
        paths = {"moa": ctx.artifacts.selected_plan_at(budget), "binary": ctx.artifacts.binary_plan(budget)}
        try:
            plans[budget] = {name: (path.name, load_plan(path, info)) for name, path in paths.items()}
        except ValueError as err:
            raise UserError(f"evaluate: {err}") from None
    return plans


def _methods(plans: dict[str, dict], info, length: int, binary_at) -> list[Method]:
    """Dense first, then per budget: the MoA plan, and the binary baseline and a uniform window at the MoA plan's KV
    density at this length."""
    methods = [Method("dense", "", "dense", None)]
    for budget, chosen in plans.items():
        moa_id, moa = chosen["moa"]
        density = plan_kv_density(moa, length)
        binary = binary_at(chosen["binary"][1], length, density)
        uniform = uniform_window_plan(info, density, length, sink=moa.sink,
                                      min_span=moa.min_span, block_size=moa.block_size, granularity=moa.granularity)
        binary_id = f"binary_full{binary.solver['full_heads']}_window{binary.solver['streaming_window']}"
        methods += [Method("moa", budget, moa_id, moa), Method("binary", budget, binary_id, binary),
                    Method("uniform", budget, f"uniform_window_{uniform.solver['window']}", uniform)]
    return methods


def _log_methods(ctx, frame: pd.DataFrame, dtype: str) -> None:
    """One nested MLflow run per (method, budget), with every metric per task and length as ``<metric>:<task>:<N>``;
    the plans experiment's run of each gets the metrics and the tag ``eval_dtype``."""
    for (method, budget), rows in frame.groupby(["method", "budget"], sort=False):
        name = method if not budget else f"{method}@{budget}"
        tags = {"kind": "evaluation", "method": method, "budget": str(budget), "eval_dtype": dtype}
        with ctx.child_run(name, tags=tags) as run:
            run.log_params({"method": method, "budget": budget, "plans": sorted(set(rows["plan_id"]))})
            run.log_metrics(_per_task(rows))
        plan_run = _plan_run(ctx, method, budget)
        plan_run.log_metrics({**_per_task(rows, TASK_METRICS), **_per_length(rows)})
        plan_run.set_tags({"eval_dtype": dtype})


def _per_task(rows: pd.DataFrame, metrics=METRICS) -> dict[str, float]:
    return {f"{metric}@{row.task}:{row.seq_len}": getattr(row, metric) for row in rows.itertuples()
            for metric in metrics if getattr(row, metric) == getattr(row, metric)}  # NaN: not applicable


def _per_length(rows: pd.DataFrame) -> dict[str, float]:
    """Per length, the median over tasks of the cost columns (one value per length for the UI's columns)."""
    medians = rows.groupby("seq_len")[list(LENGTH_METRICS)].median()
    return {f"{metric}@{n}": value for n, row in medians.iterrows() for metric, value in row.items()
            if value == value}


def _plan_run(ctx, method: str, budget: str):
    if method == "moa":
        return ctx.plan_runs.for_file(ctx.artifacts.selected_plan_at(budget), method=method, budget=budget)
    return ctx.plan_runs.for_method(method, budget)  # binary and uniform: rebuilt per length


def _table(frame: pd.DataFrame) -> str:
    """Accuracy, and prefill and decode speed against dense, per method and length (over tasks)."""
    parts = []
    for value, aggfunc, title in (
            ("accuracy", "mean", "Accuracy (mean over tasks)"),
            ("prefill_speedup", "median", "Prefill speed-up over dense (median over tasks)"),
            ("decode_speedup", "median", "Decode speed-up over dense per token (median over tasks)")):
        shown = frame.pivot_table(index=["method", "budget"], columns="seq_len", values=value, aggfunc=aggfunc,
                                  sort=False)
        parts.append(f"{title} by length:\n" + shown.round(3).to_string())
    return "\n".join(parts)
