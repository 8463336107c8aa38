"""notebooks/accuracy_latency_front.ipynb and notebooks/compare_plans.ipynb on a synthetic run directory.

The run directory holds a real MLflow SQLite store with the plans experiment (``moa-autotune-plans``: one top-level
run per plan or method, tagged and named as ``pipeline.plan_runs`` logs them, with optimize, validate and evaluate
metrics), plan files written by ``pipeline.plan.save_plan`` and a small profile influence tensor. Each notebook runs
headless through papermill (as ``make notebooks`` runs it) with a cell prepended that records, from matplotlib
itself, every figure it renders: each axes' lines, scatter offsets, error-bar segments, images and bars. The tests
then check the figures against the synthetic store: every figure has data, every plotted point is one run's
metrics, the Pareto rings are exactly the non-dominated points, the error bars are the Wilson intervals, the span
heat-maps are ``spans_for`` of the plan files, the bars are the runs' accuracies.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import nbformat
import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / "notebooks"
FRONT, COMPARE = "accuracy_latency_front.ipynb", "compare_plans.ipynb"
TASKS = ("passkey", "var_tracking")
EVAL_LENGTHS = (512, 1024)
PROFILE_LENGTHS = (256, 512)
VALIDATION_LENGTH = 768
SAMPLES = 4
BLOCK = 64
MODEL = SimpleNamespace(name="tiny-eval", num_layers=3, num_heads=4, num_kv_heads=2, head_dim=16,
                        fingerprint="0123456789abcdef")
RING = "Pareto front (non-dominated)"

RECORDER = '''
import json as _json
import math as _math
import numpy as _np
from matplotlib.backend_bases import FigureCanvasBase as _Canvas
from matplotlib.collections import LineCollection as _LineCollection
from matplotlib.container import BarContainer as _Bars, ErrorbarContainer as _Errorbars

_print_figure = _Canvas.print_figure


def _finite(points):
    return [[float(x), float(y)] for x, y in points if _math.isfinite(float(x)) and _math.isfinite(float(y))]


def _record_and_print(self, *args, **kwargs):
    fig = self.figure
    axes = []
    for ax in fig.axes:
        record = {"title": ax.get_title(), "xlabel": ax.get_xlabel(), "ylabel": ax.get_ylabel(),
                  "colorbar": ax.get_label() == "<colorbar>", "lines": [], "scatter": [], "images": [], "bars": [],
                  "errorbars": []}
        for line in ax.lines:
            record["lines"].append({"label": str(line.get_label()), "xy": _finite(line.get_xydata())})
        for c in ax.collections:
            if c.get_offset_transform() is ax.transData and not isinstance(c, _LineCollection):
                record["scatter"].append({"label": str(c.get_label()), "xy": _finite(c.get_offsets())})
        for image in ax.images:
            array = _np.ma.asarray(image.get_array(), dtype=float).filled(_np.nan)
            record["images"].append({"array": array.tolist()})
        for container in ax.containers:
            if isinstance(container, _Bars):
                record["bars"].append({"label": container.get_label(),
                                       "bars": [[r.get_x() + r.get_width() / 2, r.get_height()] for r in container]})
            elif isinstance(container, _Errorbars):
                data, _, bars = container.lines
                record["errorbars"].append({
                    "label": container.get_label(), "xy": [] if data is None else _finite(data.get_xydata()),
                    "segments": [seg.tolist() for lc in bars for seg in lc.get_segments()]})
        axes.append(record)
    suptitle = fig._suptitle.get_text() if fig._suptitle is not None else ""
    with open(__POINTS__, "a") as out:
        out.write(_json.dumps({"figure": id(fig), "suptitle": suptitle, "axes": axes}) + "\\n")
    return _print_figure(self, *args, **kwargs)


_Canvas.print_figure = _record_and_print
'''


# ---------------------------------------------------------------------------------------------------------------
# the synthetic run directory
# ---------------------------------------------------------------------------------------------------------------
def varied_plan(betas_by_layer, alpha=0.0):
    """A kv_head plan of MODEL with per-layer, per-head span fractions (Plan.uniform, then its rules changed)."""
    from pipeline.plan import Plan, plan_attention_density, plan_kv_density

    plan = Plan.uniform(MODEL, 0.5, lengths=PROFILE_LENGTHS)
    plan.betas = [list(map(float, row)) for row in betas_by_layer]
    plan.alphas = [[float(alpha)] * len(row) for row in betas_by_layer]
    plan.expected = {n: {"kv_density": plan_kv_density(plan, n), "attention_density": plan_attention_density(plan, n),
                         "influence_loss": 0.1} for n in PROFILE_LENGTHS}
    return plan


PLANS = {  # file under plans/ -> (method, budget, rules)
    "plan_0.json": ("moa", "0.5", [[0.9, 0.3], [0.6, 0.2], [0.4, 0.7]]),
    "plan_1.json": ("moa", "0.5", [[1.0, 0.25], [0.5, 0.125], [0.25, 0.75]]),
    "plan_2.json": ("moa", "0.25", [[0.5, 0.0625], [0.25, 0.125], [0.125, 0.375]]),
    "binary_0.5.json": ("binary", "0.5", [[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]),
    "binary_0.25.json": ("binary", "0.25", [[1.0, 0.0], [0.0, 0.0], [0.0, 0.0]]),
}
SELECTED = {"0.5": "plan_1.json", "0.25": "plan_2.json"}


def plan_digest(path: Path) -> str:
    try:
        from pipeline.plan_runs import plan_key
    except ImportError:
        return hashlib.sha256(json.dumps(json.loads(path.read_text()), sort_keys=True).encode()).hexdigest()[:16]
    return plan_key(path)


def wilson(k: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return centre - half, centre + half


def eval_metrics(rng: np.random.Generator, method: str, kv: dict[int, float], attention: dict[int, float]
                 ) -> dict[str, float]:
    """Evaluate's metrics of one method: per task and length, then per length (as pipeline.stages.evaluate logs)."""
    skill = {"dense": 0.8, "moa": 0.65, "binary": 0.5, "uniform": 0.4}[method]
    metrics = {}
    for n in EVAL_LENGTHS:
        for task in TASKS:
            k = int(rng.binomial(SAMPLES, skill))
            low, high = wilson(k, SAMPLES)
            metrics |= {f"accuracy:{task}:{n}": k / SAMPLES, f"acc_lo:{task}:{n}": low, f"acc_hi:{task}:{n}": high,
                        f"agree_dense:{task}:{n}": 1.0 if method == "dense" else float(rng.uniform(0.5, 1)),
                        f"kl_dense:{task}:{n}": 0.0 if method == "dense" else float(rng.uniform(0, 0.3))}
        dense_ms = 4.0 + n / 256
        ms = dense_ms * (1.0 if method == "dense" else 0.45 + 0.6 * kv[n] + float(rng.uniform(-0.05, 0.05)))
        metrics |= {f"ppl:{n}": 3 + float(rng.uniform(0, 1)), f"prefill_ms:{n}": 10 * ms,
                    f"decode_ms_per_token:{n}": round(ms, 4), f"kv_bytes:{n}": 1e5 * kv[n],
                    f"kv_density:{n}": kv[n], f"attention_density:{n}": attention[n]}
    return metrics


def write_run_dir(run_dir: Path) -> dict:
    """The synthetic run directory; returns what the tests check against (the current runs' metrics and ids)."""
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient
    from safetensors.torch import save_file

    from pipeline.optimize.baselines import uniform_window_plan
    from pipeline.plan import load_plan, plan_attention_density, plan_kv_density, save_plan

    for sub in ("plans", "validate", "profile"):
        (run_dir / sub).mkdir(parents=True)
    plans = {}
    for name, (_, _, rules) in PLANS.items():
        save_plan(varied_plan(rules), run_dir / "plans" / name)
        plans[name] = load_plan(run_dir / "plans" / name)
    for budget, name in SELECTED.items():
        shutil.copyfile(run_dir / "plans" / name, run_dir / "validate" / f"selected_{budget}.json")
    shutil.copyfile(run_dir / "plans" / SELECTED["0.5"], run_dir / "plan.json")

    generator = torch.Generator().manual_seed(7)
    nb = 512 // BLOCK
    influence = torch.rand(MODEL.num_layers, MODEL.num_kv_heads, nb, nb, generator=generator).tril()
    influence[1, 0] *= torch.linspace(0, 1, nb)[None, :].flip(-1)  # one head that looks far back
    save_file({"influence": influence.float().contiguous()}, str(run_dir / "profile" / "influence_512.safetensors"),
              metadata={"block_size": str(BLOCK), "samples": "2"})

    uri = f"sqlite:///{run_dir.resolve()}/mlflow.db"
    client = MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("moa-autotune-plans", artifact_location=(run_dir / "mlartifacts").as_uri())
    client.create_experiment("moa-autotune", artifact_location=(run_dir / "mlartifacts").as_uri())
    rng = np.random.default_rng(3)
    clock = [1_700_000_000_000]
    current = {}

    def create(name, method, budget, key, plan_id, selected, metrics):
        clock[0] += 1000
        run = client.create_run(experiment, start_time=clock[0], run_name=name, tags={
            "method": method, "budget": budget, "plan_key": key, "plan_id": plan_id,
            "selected": "true" if selected else "false", "run_dir": str(run_dir.resolve())})
        client.log_batch(run.info.run_id, metrics=[Metric(k, float(v), clock[0], 0) for k, v in metrics.items()])
        client.set_terminated(run.info.run_id, status="FINISHED", end_time=clock[0] + 1)
        return run.info.run_id

    # a stale run: plan_1.json as an earlier optimize wrote it (another digest), selected and evaluated then
    stale = eval_metrics(rng, "moa", *[dict.fromkeys(EVAL_LENGTHS, 0.2)] * 2) | {"accuracy:passkey:512": 0.987}
    create("moa@0.5:plan_1.json", "moa", "0.5", "0" * 16, "plan_1.json", True, stale)

    dense = {"val_ppl": 3.0, f"kv_density:{VALIDATION_LENGTH}": 1.0,
             **eval_metrics(rng, "dense", *[dict.fromkeys(EVAL_LENGTHS, 1.0)] * 2)}
    current["dense"] = (create("dense", "dense", "", "dense@", "dense", False, dense), dense)
    for name, (method, budget, _) in PLANS.items():
        plan = plans[name]
        metrics = {f"{m}:{n}": value for n in PROFILE_LENGTHS for m, value in plan.expected[n].items()}
        metrics |= {"val_ppl": 3.2 + rng.uniform(0, 1), f"kv_density:{VALIDATION_LENGTH}": plan_kv_density(
            plan, VALIDATION_LENGTH), f"attention_density:{VALIDATION_LENGTH}": plan_attention_density(
            plan, VALIDATION_LENGTH)}
        selected = SELECTED.get(budget) == name
        if selected:
            metrics |= eval_metrics(rng, method, {n: plan_kv_density(plan, n) for n in EVAL_LENGTHS},
                                    {n: plan_attention_density(plan, n) for n in EVAL_LENGTHS})
        run_id = create(f"{method}@{budget}:{name}", method, budget, plan_digest(run_dir / "plans" / name), name,
                        selected, metrics)
        current[f"{method}@{budget}" if selected else name] = (run_id, metrics)
    for budget, name in SELECTED.items():
        moa = plans[name]  # the uniform window is sized to the MoA plan's KV density at each length
        window = {n: uniform_window_plan(MODEL, plan_kv_density(moa, n), n, sink=moa.sink, min_span=moa.min_span,
                                         block_size=moa.block_size) for n in EVAL_LENGTHS}
        metrics = eval_metrics(rng, "uniform", {n: plan_kv_density(p, n) for n, p in window.items()},
                               {n: plan_attention_density(p, n) for n, p in window.items()})
        current[f"uniform@{budget}"] = (create(f"uniform@{budget}", "uniform", budget, f"uniform@{budget}", "uniform",
                                               False, metrics), metrics)
        # the binary split as validate and evaluate run it: solved again per length, at the MoA plan's density there
        metrics = {"val_ppl": 3.5, **eval_metrics(rng, "binary", {n: plan_kv_density(moa, n) for n in EVAL_LENGTHS},
                                                  {n: plan_attention_density(moa, n) for n in EVAL_LENGTHS})}
        current[f"binary@{budget}"] = (create(f"binary@{budget}", "binary", budget, f"binary@{budget}", "binary",
                                              False, metrics), metrics)
    return {"current": current, "plans": plans, "influence": influence}


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("eval_notebooks") / "run"
    facts = write_run_dir(run_dir)
    return SimpleNamespace(run_dir=run_dir, **facts)


def execute(name: str, workdir: Path, **parameters) -> list[dict]:
    """Run notebook ``name`` through papermill with the recorder cell first; the recorded figures."""
    import papermill

    points = workdir / f"{name}.figures.jsonl"
    points.unlink(missing_ok=True)
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    notebook.cells.insert(0, nbformat.v4.new_code_cell(RECORDER.replace("__POINTS__", repr(str(points)))))
    source = workdir / f"input_{name}"
    nbformat.write(notebook, source)
    papermill.execute_notebook(str(source), str(workdir / f"executed_{name}"), parameters=parameters,
                               cwd=str(NOTEBOOKS), kernel_name="python3", progress_bar=False)
    return [json.loads(line) for line in points.read_text().splitlines()] if points.is_file() else []


def has_data(ax: dict) -> bool:
    return (any(line["xy"] for line in ax["lines"]) or any(s["xy"] for s in ax["scatter"])
            or any(any(v == v for row in im["array"] for v in row) for im in ax["images"])
            or any(b["bars"] for b in ax["bars"]))


def assert_no_empty_plot(figures: list[dict]) -> None:
    assert figures, "the notebook rendered no figure"
    for figure in figures:
        assert any(has_data(ax) for ax in figure["axes"]), f"figure {figure['suptitle']!r} has no data"
        for ax in figure["axes"]:
            if not ax["colorbar"]:
                assert has_data(ax), f"empty plot {ax['title']!r} in figure {figure['suptitle']!r}"


def non_dominated(points: list[tuple[float, float]]) -> set[tuple[float, float]]:
    """(cost, accuracy) points that no other point beats (lower cost and higher accuracy, one strictly): a sweep over
    cost groups, written independently of the notebook's pairwise test."""
    front, best_below = set(), -math.inf
    for cost in sorted({c for c, _ in points}):
        top = max(a for c, a in points if c == cost)
        if top > best_below:
            front.add((cost, top))
        best_below = max(best_below, top)
    return front


def close(a, b) -> bool:
    return all(math.isclose(x, y, rel_tol=1e-9, abs_tol=1e-12) for x, y in zip(a, b, strict=True))


# ---------------------------------------------------------------------------------------------------------------
# accuracy_latency_front.ipynb
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def front_figures(synthetic, tmp_path_factory):
    return execute(FRONT, tmp_path_factory.mktemp("front"), run_dir=str(synthetic.run_dir))


def front_panels(figures, cost_word):
    return {ax["title"]: ax for figure in figures for ax in figure["axes"]
            if ax["title"].count(", N = ") == 1 and cost_word in ax["xlabel"].lower()}


@pytest.mark.parametrize(("cost", "word"), [("decode_ms_per_token", "latency"), ("kv_density", "kv density")])
def test_front_plots_every_measured_point_with_its_wilson_interval(synthetic, front_figures, cost, word):
    assert_no_empty_plot(front_figures)
    panels = front_panels(front_figures, word)
    assert set(panels) == {f"{t}, N = {n}" for t in TASKS for n in EVAL_LENGTHS}
    evaluated = {label: m for label, (_, m) in synthetic.current.items() if "accuracy:passkey:512" in m}
    for task in TASKS:
        for n in EVAL_LENGTHS:
            panel = panels[f"{task}, N = {n}"]
            assert n != EVAL_LENGTHS[0] or "accuracy" in panel["ylabel"].lower()  # the shared y axis, labelled once
            plotted = {b["label"]: b for b in panel["errorbars"]}
            assert set(plotted) == set(evaluated), "one marker per evaluated run; no stale run, no unevaluated plan"
            for label, metrics in evaluated.items():
                [(x, y)] = plotted[label]["xy"]
                assert close((x, y), (metrics[f"{cost}:{n}"], metrics[f"accuracy:{task}:{n}"])), (label, task, n)
                [segment] = plotted[label]["segments"]
                (x0, lo), (x1, hi) = sorted(segment, key=lambda p: p[1])
                assert close((x0, x1, lo, hi), (x, x, metrics[f"acc_lo:{task}:{n}"], metrics[f"acc_hi:{task}:{n}"]))


@pytest.mark.parametrize(("cost", "word"), [("decode_ms_per_token", "latency"), ("kv_density", "kv density")])
def test_front_rings_exactly_the_non_dominated_points(synthetic, front_figures, cost, word):
    panels = front_panels(front_figures, word)
    evaluated = [m for _, m in synthetic.current.values() if "accuracy:passkey:512" in m]
    dominated_somewhere = False
    for task in TASKS:
        for n in EVAL_LENGTHS:
            points = [(m[f"{cost}:{n}"], m[f"accuracy:{task}:{n}"]) for m in evaluated]
            expected = non_dominated(points)
            dominated_somewhere |= len(expected) < len(set(points))
            [ring] = [s for s in panels[f"{task}, N = {n}"]["scatter"] if s["label"] == RING]
            ringed = {(x, y) for x, y in ring["xy"]}
            assert len(ring["xy"]) == sum(p in expected for p in points), "every non-dominated run gets a ring"
            assert ringed == expected, f"{task} N={n} ({cost}): ringed {sorted(ringed)}, expected {sorted(expected)}"
    assert dominated_somewhere, "the synthetic data must have dominated points"


def test_front_span_and_influence_heat_maps_come_from_the_files(synthetic, front_figures):
    from pipeline.plan import spans_for
    from pipeline.profile.stats import long_range_fraction

    [spans] = [f for f in front_figures if "spans" in f["suptitle"]]
    assert spans["suptitle"].startswith("derived:") and f"N = {max(EVAL_LENGTHS)}" in spans["suptitle"]
    images = [ax["images"][0]["array"] for ax in spans["axes"] if not ax["colorbar"]]
    for image, budget in zip(images, ("0.5", "0.25"), strict=True):  # the largest budget first
        plan = synthetic.plans[SELECTED[budget]]
        expected = torch.stack([spans_for(plan, layer, max(EVAL_LENGTHS)) for layer in range(plan.num_layers)])
        assert np.array_equal(np.array(image), expected.numpy()), budget
    [influence] = [f for f in front_figures if "influence" in f["suptitle"].lower()]
    share, block_map = [ax for ax in influence["axes"] if not ax["colorbar"]]
    assert share["title"].startswith("derived:") and block_map["title"].startswith("derived:")
    expected_share = long_range_fraction(synthetic.influence.double(), BLOCK, 0.25 * 512).numpy()
    assert np.allclose(np.array(share["images"][0]["array"]), expected_share, rtol=1e-6)
    mean = synthetic.influence.double().mean((0, 1)).numpy()
    shown = np.array(block_map["images"][0]["array"], dtype=float)
    assert np.allclose(shown[mean > 0], np.log10(mean[mean > 0])) and np.isnan(shown[mean == 0]).all()


# ---------------------------------------------------------------------------------------------------------------
# compare_plans.ipynb
# ---------------------------------------------------------------------------------------------------------------
def check_comparison(synthetic, figures, expected: dict[str, str | None]) -> None:
    """``expected``: {shown label: key in synthetic.current, or None for a plan file without a run}."""

    assert_no_empty_plot(figures)
    with_runs = {label: synthetic.current[key][1] for label, key in expected.items() if key is not None}
    [bars] = [ax for f in figures for ax in f["axes"] if ax["bars"]]
    assert {b["label"] for b in bars["bars"]} == {label for label, m in with_runs.items() if "accuracy:passkey:512" in m}
    for b in bars["bars"]:
        heights = sorted(h for _, h in b["bars"])
        wanted = sorted(with_runs[b["label"]][f"accuracy:{t}:{n}"] for t in TASKS for n in EVAL_LENGTHS)
        assert close(heights, wanted), b["label"]
    [densities] = [f for f in figures if "Densities" in f["suptitle"]]
    kv_axis = next(ax for ax in densities["axes"] if ax["ylabel"] == "KV density")
    for label, metrics in with_runs.items():
        [line] = [line for line in kv_axis["lines"] if line["label"] == label]
        recorded = sorted((int(k.split(":")[1]), v) for k, v in metrics.items() if k.startswith("kv_density:"))
        assert close([v for p in line["xy"] for v in p], [float(v) for p in recorded for v in p]), label
    for label in (label for label, key in expected.items() if key is None):
        assert any(line["label"] == f"derived: {label} (from the plan file)" for line in kv_axis["lines"])


def span_images(figures):
    [spans] = [f for f in figures if "spans" in f["suptitle"]]
    return {ax["title"].split("\n")[0]: np.array(ax["images"][0]["array"]) for ax in spans["axes"] if ax["images"]
            and not ax["colorbar"]}


def test_compare_defaults_to_the_selected_plans_of_the_first_two_budgets(synthetic, tmp_path):
    from pipeline.plan import spans_for

    figures = execute(COMPARE, tmp_path, run_dir=str(synthetic.run_dir))
    check_comparison(synthetic, figures, {"moa@0.5": "moa@0.5", "moa@0.25": "moa@0.25"})
    images = span_images(figures)
    for label, budget in (("moa@0.5", "0.5"), ("moa@0.25", "0.25")):
        plan = synthetic.plans[SELECTED[budget]]
        expected = torch.stack([spans_for(plan, layer, max(EVAL_LENGTHS)) for layer in range(plan.num_layers)])
        assert np.array_equal(images[label], expected.numpy()), label
    executed = nbformat.read(tmp_path / f"executed_{COMPARE}", as_version=4)
    text = "".join(o.get("data", {}).get("text/plain", "") + o.get("text", "") for c in executed.cells
                   if c.cell_type == "code" for o in c.outputs)
    assert "accuracy:var_tracking:1024" in text and "B - A" in text, "the metrics table of both runs"


def test_compare_takes_a_run_id_a_method_at_budget_or_a_plan_file(synthetic, tmp_path):
    # binary@0.5 names two runs: optimize's plan file and the baseline as evaluated; the evaluated one is meant
    figures = execute(COMPARE, tmp_path, run_dir=str(synthetic.run_dir), plan_a="binary@0.5",
                      plan_b="plans/plan_2.json")
    check_comparison(synthetic, figures, {"binary@0.5": "binary@0.5", "moa@0.25: plan_2.json": "moa@0.25"})

    orphan = tmp_path / "orphan.json"
    from pipeline.plan import save_plan

    save_plan(varied_plan([[0.3, 0.3], [0.3, 0.3], [0.3, 0.3]]), orphan)  # a plan file no run knows
    uniform_id = synthetic.current["uniform@0.25"][0]
    figures = execute(COMPARE, tmp_path, run_dir=str(synthetic.run_dir), plan_a=uniform_id, plan_b=str(orphan))
    check_comparison(synthetic, figures, {"uniform@0.25": "uniform@0.25", "orphan.json": None})
    assert set(span_images(figures)) == {"orphan.json"}, "the uniform window has no plan file"


# ---------------------------------------------------------------------------------------------------------------
# a mistyped run directory
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", [FRONT, COMPARE, "adapter_search.ipynb"])
def test_a_run_dir_without_a_store_is_a_clear_error_and_creates_none(name, tmp_path):
    from papermill.exceptions import PapermillExecutionError

    missing = tmp_path / "runs" / "smolm2"
    with pytest.raises(PapermillExecutionError, match=f"run directory {missing} does not exist"):
        execute(name, tmp_path, run_dir=str(missing))
    assert not missing.exists()
    empty = tmp_path / "empty-run"
    empty.mkdir()
    with pytest.raises(PapermillExecutionError, match=f"no MLflow store {empty / 'mlflow.db'}"):
        execute(name, tmp_path, run_dir=str(empty))
    assert list(empty.iterdir()) == [], "no mlflow.db (nor anything else) is created"


# ---------------------------------------------------------------------------------------------------------------
# make notebooks
# ---------------------------------------------------------------------------------------------------------------
def make_target(target: str, run_dir: Path, variable: str = "RUN_DIR") -> subprocess.CompletedProcess:
    """``make <target> <variable>=<run_dir>`` in the repository, with this interpreter's venv as the set-up one."""
    make = shutil.which("make")
    if make is None:
        pytest.skip("no make")
    return subprocess.run([make, "-s", "-o", f"{sys.prefix}/.installed", f"VENV={sys.prefix}", target,
                           f"{variable}={run_dir}"], cwd=REPO, capture_output=True, text=True, timeout=600)


def make_notebooks(run_dir: Path) -> subprocess.CompletedProcess:
    return make_target("notebooks", run_dir)


@pytest.mark.parametrize(("target", "variable", "store"), [
    ("notebooks", "RUN_DIR", "mlflow.db"),
    ("notebooks", "NOTEBOOKS_RUN_DIR", "mlflow.db"),  # the older name
    ("ui", "RUN_DIR", "mlflow.db"),
    ("dashboard", "RUN_DIR", "optuna.db"),
])
def test_make_targets_refuse_a_mistyped_run_dir_in_one_line(tmp_path, target, variable, store):
    for run_dir in (tmp_path / "runs" / "smolm2", tmp_path):
        result = make_target(target, run_dir, variable)
        assert result.returncode != 0
        lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
        assert len(lines) == 1 and str(run_dir / store) in lines[0], lines
        assert not (run_dir / store).exists() and not (run_dir / "notebooks").exists()


@pytest.mark.slow  # three kernels in a row: about 35 s
def test_make_notebooks_writes_the_executed_copies_beside_the_run(synthetic):
    result = make_notebooks(synthetic.run_dir)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for name in ("fronts.ipynb", FRONT, COMPARE):
        executed = nbformat.read(synthetic.run_dir / "notebooks" / name, as_version=4)
        errors = [o for c in executed.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
        assert not errors, (name, errors)
        images = [o for c in executed.cells if c.cell_type == "code" for o in c.outputs
                  if "image/png" in o.get("data", {})]
        assert images or name == "fronts.ipynb", f"{name}: no figure"  # fronts.ipynb reads the stage runs only
