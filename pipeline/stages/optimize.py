"""stage=optimize: the Pareto front of sparse-attention plans from ``rules/loss_table.parquet``.

Writes ``plans/plan_<i>.json`` (format ``moa-plan/1``) for every Pareto point and ``optimize/front.json``
(the solver settings and one summary per plan). Every plan is also a nested MLflow run with ``kv_density@N``,
``attention_density@N`` and ``influence_loss@N``; the front itself is logged as a figure.
"""

from __future__ import annotations

import numpy as np

from pipeline.errors import UserError
from pipeline.io import write_json
from pipeline.optimize.figures import front_figure
from pipeline.optimize.front import solve_front
from pipeline.plan import Plan, describe_model, package_version, save_plan, validate_plan
from pipeline.stages.registry import stage


def budget_group_size(granularity: str, info: dict) -> int:
    """Query heads whose rules share one KV head's cache: the group the KV budget counts once, at its widest span."""
    return info["num_heads"] // info["num_kv_heads"] if granularity == "head" else 1


@stage("optimize", requires=("rules",), config_keys=("sparse", "rules", "optimize"),
       outputs=("optimize/", "plans/"))
def run_optimize(ctx):
    """Solve the plan MILP's Pareto front over profile lengths and write one plan file per point."""
    opt = ctx.settings.optimize
    table = ctx.artifacts.load_loss_table()
    lengths = table["lengths"]
    if list(opt.density_budget) != lengths:
        raise UserError(f"{ctx.artifacts.loss_table} covers lengths {lengths}, not the profile lengths "
                        f"{list(opt.density_budget)}: re-run stage=rules")
    budgets = opt.density_budget
    ratio = opt.lower_bound_ratio
    loaded = ctx.load_model()
    info = describe_model(loaded)
    try:
        front = solve_front(
            table["loss"], table["kv_density"], [budgets[n] for n in lengths], opt.max_rules_per_layer,
            group_size=budget_group_size(ctx.settings.sparse.granularity, info), solver=opt.solver,
            points=opt.points, time_limit=opt.time_limit, lower_bound_ratio=ratio, gap_rel=opt.gap_rel,
            lengths=lengths,
        )
    except ValueError as err:
        raise UserError(f"optimize: {err}") from None
    plans_dir = ctx.artifacts.plans_dir
    plans_dir.mkdir(parents=True, exist_ok=True)
    for stale in plans_dir.glob("plan_*.json"):
        stale.unlink()
    summaries = []
    for i, candidate in enumerate(front):
        plan = _plan(ctx, candidate, table, budgets, info)
        path = ctx.artifacts.candidate_plan(i)
        save_plan(validate_plan(plan, loaded), path)
        metrics = {f"{key}@{n}": plan.expected[n][key] for n in lengths
                   for key in ("kv_density", "attention_density", "influence_loss")}
        with ctx.child_run(f"plan_{i}", tags={"kind": "plan_candidate", "plan_index": str(i)}) as candidate_run:
            candidate_run.log_params({"solver": candidate.solver, "status": candidate.status, "gap": candidate.gap,
                                      "primary_length": lengths[candidate.primary], "plan": str(path)})
            candidate_run.log_metrics(metrics)
            candidate_run.log_artifact(path)
        summaries.append({"plan": str(path.relative_to(ctx.run_dir)), "mlflow_run_id": candidate_run.run_id,
                          "status": candidate.status,
                          "flagged": candidate.flagged, "gap": candidate.gap, "seconds": candidate.seconds,
                          "primary_length": lengths[candidate.primary],
                          "epsilon": {n: e for n, e in zip(lengths, candidate.epsilon, strict=True) if e is not None},
                          **metrics})
    write_json(ctx.artifacts.front, {
        "density_budget": budgets, "lower_bound_ratio": ratio, "max_rules_per_layer": opt.max_rules_per_layer,
        "solver": opt.solver, "points": opt.points, "plans": summaries,
    })
    ctx.log_figure(front_figure(front, lengths, [budgets[n] for n in lengths]), "pareto_front.png")
    summary = {"plans": len(front), "flagged": sum(c.flagged for c in front),
               "solve_seconds": float(sum(c.seconds for c in front))}
    ctx.log_metrics(summary)
    return summary


def _plan(ctx, candidate, table, budgets, info) -> Plan:
    layers, heads = candidate.choice.shape
    li, hi = np.arange(layers)[:, None], np.arange(heads)[None, :]
    attention = table["attention_density"][li, hi, candidate.choice].mean((0, 1))  # (T,)
    lengths = table["lengths"]
    primary = lengths[candidate.primary]
    sparse = ctx.settings.sparse
    return Plan(
        granularity=sparse.granularity, sink=sparse.sink, min_span=sparse.min_span, block_size=sparse.block_size,
        alphas=table["alphas"][candidate.choice].tolist(), betas=table["betas"][candidate.choice].tolist(),
        model=info, profile_lengths=lengths, density_budget=budgets,
        expected={n: {"kv_density": float(candidate.densities[t]), "attention_density": float(attention[t]),
                      "influence_loss": float(candidate.objectives[t])} for t, n in enumerate(lengths)},
        solver={"name": candidate.solver, "status": candidate.status,
                "objective": float(candidate.objectives[candidate.primary]), "seconds": candidate.seconds,
                "gap": candidate.gap, "minimised_length": primary},
        created_with={"config_hash": ctx.config_hash, "version": package_version()},
    )
