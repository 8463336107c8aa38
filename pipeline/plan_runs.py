"""The plans experiment: one top-level MLflow run per plan or method, so the UI compares them by column.

Stage runs nest plan candidates two levels down under ``pipeline:<stage>`` parents, where they are hard to
compare. Every plan (each front point, each binary baseline) and every method without a plan file (dense, the
uniform window of each budget) therefore also gets a top-level run in ``<tracking.experiment>-plans``, found again
by its tags, so that later stages add their metrics to the same run:

- tags ``method`` (dense, moa, binary, uniform), ``budget`` (a label such as ``0.5``; empty for dense),
  ``plan_key`` (the digest of the plan file, or ``<method>@<budget>``), ``plan_id`` (its file name),
  ``selected`` (``true`` for the validated choice of its budget), ``run_dir``, and ``eval_dtype`` (the dtype
  evaluate ran the model in);
- metrics ``kv_density:N``, ``attention_density:N``, ``influence_loss:N`` (optimize), ``val_ppl`` (validate),
  ``accuracy:<task>:<N>`` and the other evaluation metrics (evaluate).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from pipeline.tracking import RunLogger, Tracker


def plan_key(path: Path) -> str:
    """A plan file's identity across stages, copies and reruns: the digest of its content as canonical JSON."""
    canonical = json.dumps(json.loads(Path(path).read_text()), sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


class PlanRuns:
    """Find-or-create access to the plans experiment of one run directory."""

    def __init__(self, uri: str, experiment: str, run_dir: Path):
        self.run_dir = str(run_dir.resolve())
        self.tracker = Tracker(uri, f"{experiment}-plans", run_dir)

    def run(self, key: str, *, method: str, budget: str, plan_id: str) -> RunLogger:
        """The run of plan ``key`` in this run directory, created (and ended) on first use."""
        client, experiment = self.tracker.client, self.tracker.experiment_id
        found = client.search_runs([experiment], filter_string=f"tags.plan_key = '{key}' and tags.run_dir = "
                                                               f"'{self.run_dir}'", max_results=1)
        if found:
            return RunLogger(client, found[0].info.run_id)
        name = method if not budget else f"{method}@{budget}" if plan_id == method else f"{method}@{budget}:{plan_id}"
        created = client.create_run(experiment, run_name=name, tags={
            "method": method, "budget": budget, "plan_key": key, "plan_id": plan_id, "selected": "false",
            "run_dir": self.run_dir})
        client.set_terminated(created.info.run_id, status="FINISHED")
        return RunLogger(client, created.info.run_id)

    def for_file(self, path: Path, *, method: str, budget: str) -> RunLogger:
        return self.run(plan_key(path), method=method, budget=budget, plan_id=Path(path).name)

    def for_method(self, method: str, budget: str) -> RunLogger:
        """Dense, or a method rebuilt per length (the uniform window): one run per method and budget."""
        return self.run(f"{method}@{budget}", method=method, budget=budget, plan_id=method)
