"""stage=optimize: Pareto fronts of sparse-attention plans from ``rules/loss_table.parquet``, one per budget.

For every entry of ``optimize.density_budget`` it writes ``plans/plan_<i>.json`` (format ``moa-plan/1``, each
recording its budget) for every Pareto point of that budget's front, and the binary baseline
``plans/binary_<budget>.json`` (see :mod:`pipeline.optimize.baselines`); ``optimize/front.json`` holds the solver
settings and one summary per plan. Every plan is also a nested MLflow run with ``kv_density@N``,
``attention_density@N`` and ``influence_loss@N``; each front is logged as a figure.
"""

from __future__ import annotations

from functools import partial

import numpy as np

from pipeline.errors import UserError
from pipeline.io import write_json
from pipeline.optimize.baselines import binary_plan_at, binary_plan_choice
from pipeline.optimize.figures import front_figure
from pipeline.optimize.front import solve_front
from pipeline.optimize.gate_cost import planning_loss
from pipeline.plan import Plan, describe_model, package_version, save_plan, validate_plan
from pipeline.settings import budget_label
from pipeline.stages.registry import stage


def budget_group_size(granularity: str, info: dict) -> int:
    """Query heads whose rules share one KV head's cache: the group the KV budget counts once, at its widest span."""
    return info["num_heads"] // info["num_kv_heads"] if granularity == "head" else 1


def planning_table(ctx) -> dict:
    """The loss table with ``loss`` the MILP's cost (:func:`pipeline.optimize.gate_cost.planning_loss`: the gates'
    term added when ``optimize.gate_weight > 0``) and ``influence`` the table's own influence loss."""
    table = ctx.artifacts.load_loss_table()
    weight = ctx.settings.optimize.gate_weight
    gates = ctx.artifacts.load_head_gates() if weight else None
    if weight and gates is None:
        raise UserError(f"optimize.gate_weight={weight:g} needs the head gates of stage=profile "
                        f"({ctx.artifacts.head_gates} is missing): run stage=profile with profile.gate_steps > 0, "
                        f"or set optimize.gate_weight=0")
    try:
        loss = planning_loss(table["loss"], table["kv_density"], gates, weight)
    except ValueError as err:
        raise UserError(f"{ctx.artifacts.head_gates}: {err}; re-run stage=profile") from None
    return {**table, "influence": table["loss"], "loss": loss}


def binary_builder(ctx, info):
    """``(template, length, kv_density) -> Plan``: the binary baseline solved again at one length
    (:func:`pipeline.optimize.baselines.binary_plan_at`), with this run's loss table and solver settings."""
    opt = ctx.settings.optimize
    return partial(binary_plan_at, planning_table(ctx), solver=opt.solver, time_limit=opt.time_limit,
                   gap_rel=opt.gap_rel,
                   group_size=budget_group_size(ctx.settings.sparse.granularity, describe_model(info)))


@stage("optimize", requires=("rules", "profile"), config_keys=("sparse", "rules", "optimize"),
       outputs=("optimize/", "plans/"))
def run_optimize(ctx):
    """Solve the plan MILP's Pareto front over profile lengths for every budget; write one plan file per point."""
    opt = ctx.settings.optimize
    table = planning_table(ctx)
    lengths = table["lengths"]
    if list(opt.budgets[0]) != lengths:
        raise UserError(f"{ctx.artifacts.loss_table} covers lengths {lengths}, not the profile lengths "
                        f"{list(opt.budgets[0])}: re-run stage=rules")
    loaded = ctx.load_model()
    info = describe_model(loaded)
    group_size = budget_group_size(ctx.settings.sparse.granularity, info)
    fronts = {budget_label(b): (b, _front(ctx, table, b, group_size)) for b in opt.budgets}
    binaries = {label: _binary(ctx, table, b, group_size) for label, (b, _) in fronts.items()}

    plans_dir = ctx.artifacts.plans_dir
    plans_dir.mkdir(parents=True, exist_ok=True)
    for stale in [*plans_dir.glob("plan_*.json"), *plans_dir.glob("binary_*.json")]:
        stale.unlink()
    summaries, index = [], 0
    for label, (budget, front) in fronts.items():
        for candidate in front:
            plan = _plan(ctx, candidate, table, budget, info)
            summaries.append(_save_and_log(ctx, plan, candidate, ctx.artifacts.candidate_plan(index), label,
                                           f"plan_{index}", lengths, loaded, kind="plan_candidate"))
            index += 1
        candidate, rules, window = binaries[label]
        plan = _plan(ctx, candidate, table, budget, info, rules=rules, name="binary", window=window)
        summaries.append(_save_and_log(ctx, plan, candidate, ctx.artifacts.binary_plan(label), label,
                                       f"binary_{label}", lengths, loaded, kind="baseline"))
        ctx.log_figure(front_figure(front, lengths, [budget[n] for n in lengths]), f"pareto_front_{label}.png")
    write_json(ctx.artifacts.front, {
        "density_budget": [dict(b) for b in opt.budgets], "lower_bound_ratio": opt.lower_bound_ratio,
        "max_rules_per_layer": opt.max_rules_per_layer, "solver": opt.solver, "points": opt.points,
        "plans": summaries,
    })
    every = [c for _, front in fronts.values() for c in front]
    summary = {"plans": len(every), "budgets": len(fronts), "flagged": sum(c.flagged for c in every),
               "solve_seconds": float(sum(c.seconds for c in every))}
    ctx.log_metrics(summary)
    return summary


def _front(ctx, table, budget: dict, group_size: int):
    opt, lengths = ctx.settings.optimize, table["lengths"]
    try:
        return solve_front(
            table["loss"], table["kv_density"], [budget[n] for n in lengths], opt.max_rules_per_layer,
            group_size=group_size, solver=opt.solver, points=opt.points, time_limit=opt.time_limit,
            lower_bound_ratio=opt.lower_bound_ratio, gap_rel=opt.gap_rel, lengths=lengths,
        )
    except ValueError as err:
        raise UserError(f"optimize: budget {budget_label(budget)}: {err}") from None


def _binary(ctx, table, budget: dict, group_size: int):
    opt, lengths = ctx.settings.optimize, table["lengths"]
    try:
        return binary_plan_choice(
            table["loss"], table["kv_density"], np.array([budget[n] for n in lengths]), table["alphas"],
            table["betas"], window=opt.binary_window, group_size=group_size, solver=opt.solver,
            time_limit=opt.time_limit, gap_rel=opt.gap_rel, lengths=lengths,
        )
    except ValueError as err:
        raise UserError(f"optimize: binary baseline at budget {budget_label(budget)}: {err}") from None


def _save_and_log(ctx, plan: Plan, candidate, path, label: str, name: str, lengths, loaded, *, kind: str) -> dict:
    """Write one plan, log it as a nested run, and return its front.json summary."""
    save_plan(validate_plan(plan, loaded), path)
    metrics = {f"{key}@{n}": plan.expected[n][key] for n in lengths
               for key in ("kv_density", "attention_density", "influence_loss")}
    method = "binary" if kind == "baseline" else "moa"
    with ctx.child_run(name, tags={"kind": kind, "method": method, "budget": label}) as run:
        run.log_params({"solver": candidate.solver, "status": candidate.status, "gap": candidate.gap,
                        "primary_length": lengths[candidate.primary], "plan": str(path), "budget": label})
        run.log_metrics(metrics)
        run.log_artifact(path)
    ctx.plan_runs.for_file(path, method=method, budget=label).log_metrics(metrics)
    return {"plan": str(path.relative_to(ctx.run_dir)), "method": method, "budget": label,
            "mlflow_run_id": run.run_id, "status": candidate.status, "flagged": candidate.flagged,
            "gap": candidate.gap, "seconds": candidate.seconds, "primary_length": lengths[candidate.primary],
            "epsilon": {n: e for n, e in zip(lengths, candidate.epsilon, strict=True) if e is not None},
            **metrics}


def _plan(ctx, candidate, table, budget, info, *, rules=None, name: str | None = None, window=None) -> Plan:
    """The plan of a front point; ``rules`` maps a restricted table's rule indices back to the full table's."""
    choice = candidate.choice if rules is None else rules[candidate.choice]  # (L, H) indices into the full table
    layers, heads = choice.shape
    li, hi = np.arange(layers)[:, None], np.arange(heads)[None, :]
    attention = table["attention_density"][li, hi, choice].mean((0, 1))  # (T,)
    influence = table["influence"][li, hi, choice].sum((0, 1))  # (T,) without the gates' term
    lengths = table["lengths"]
    sparse = ctx.settings.sparse
    solver = {"name": name or candidate.solver, "status": candidate.status,
              "objective": float(candidate.objectives[candidate.primary]), "seconds": candidate.seconds,
              "gap": candidate.gap, "minimised_length": lengths[candidate.primary]}
    if window is not None:
        solver["streaming_window"] = int(window)
    return Plan(
        granularity=sparse.granularity, sink=sparse.sink, min_span=sparse.min_span, block_size=sparse.block_size,
        alphas=table["alphas"][choice].tolist(), betas=table["betas"][choice].tolist(),
        model=info, profile_lengths=lengths, density_budget=dict(budget),
        expected={n: {"kv_density": float(candidate.densities[t]), "attention_density": float(attention[t]),
                      "influence_loss": float(influence[t])} for t, n in enumerate(lengths)},
        solver=solver,
        created_with={"config_hash": ctx.config_hash, "version": package_version()},
    )
