"""The adapter search space (pipeline/search/space.py) and the study's storage and pruning (pipeline/search/study.py)."""

from __future__ import annotations

import datetime
import statistics
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from pipeline.adapters.composition import validate_composition
from pipeline.search.space import DEFAULT_SPACE, every_choice, layer_range, load_space, suggest
from pipeline.search.study import (
    MedianPruning,
    committed_trial_seconds,
    hide_password,
    next_trial_fits,
    open_storage,
    open_study,
    pareto_numbers,
    typical_trial_seconds,
)

optuna.logging.set_verbosity(optuna.logging.WARNING)
pytestmark = pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used with Study.optimize")


@pytest.fixture(scope="module")
def tiny_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return LlamaForCausalLM(config).eval()


def _space(tmp_path: Path, **changes) -> Path:
    raw = yaml.safe_load(DEFAULT_SPACE.read_text())
    for dotted, value in changes.items():
        node = raw
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node[key]
        if value is None:
            del node[leaf]
        else:
            node[leaf] = value
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_every_trial_of_the_default_space_is_a_valid_composition(tiny_model):
    space = load_space()
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=optuna.samplers.RandomSampler(seed=3))
    seen_kinds, seen_routers = set(), set()
    for _ in range(40):
        trial = study.ask()
        composition, lr = suggest(trial, space, num_layers=4)
        validate_composition(composition, tiny_model)
        assert space.lr.low <= lr <= space.lr.high
        first, last = composition.layers
        assert 0 <= first < last <= 4
        assert composition.router.kind in space.router_kinds
        if composition.router.kind != "sparse":
            assert "threshold_cap" not in trial.params  # conditional: only sparse routers have a threshold
        seen_kinds |= {e.kind for e in composition.experts}
        seen_routers.add(composition.router.kind)
        study.tell(trial, [0.0, 1.0])
    assert seen_kinds == set(space.experts) and seen_routers == set(space.router_kinds)


def test_every_choice_covers_each_size_target_and_layer_range():
    space = load_space()
    compositions = every_choice(space, num_layers=30)
    singles = {(c.experts[0].kind, c.experts[0].size, c.experts[0].targets) for c in compositions}
    for kind, choices in space.experts.items():
        for size in choices.sizes:
            for targets in choices.targets:
                assert (kind, size, targets) in singles
    assert {c.layers for c in compositions} >= {layer_range(a, b, 30) for a, b in space.layers}


@pytest.mark.parametrize("first,last,n,expected", [(0.0, 1.0, 30, (0, 30)), (0.5, 1.0, 30, (15, 30)),
                                                   (0.95, 1.0, 4, (3, 4)), (0.0, 0.01, 4, (0, 1))])
def test_layer_range_is_never_empty(first, last, n, expected):
    assert layer_range(first, last, n) == expected


@pytest.mark.parametrize("changes,message", [
    ({"experts": {}}, "experts is empty"),
    ({"experts.lora.size": [0, 8]}, "experts.lora.size"),
    ({"experts.lora.targets": [["q", "w"]]}, "experts.lora.targets"),
    ({"experts.lora.targets": [[]]}, "experts.lora.targets"),
    ({"experts.mixer": {"size": [4]}}, "unknown expert type 'mixer'"),
    ({"experts.parallel.targets": [["q"]]}, "takes no targets"),
    ({"router.kind": ["topk"]}, "router.kind"),
    ({"router.threshold_cap": {"low": 0.5, "high": 1.5}}, "router.threshold_cap"),
    ({"lr": {"low": 0.01, "high": 0.001}}, "lr"),
    ({"layers": [[0.5, 0.5]]}, "layers"),
    ({"extra": 1}, "unknown keys"),
    ({"start": {"experts": "lora"}}, "start must be a list"),
    ({"start": [{"experts": "lora", "lora_size": 8, "lora_targets": "q,v", "layers": "0.0-1.0",
                 "router": "soft", "router_hidden": 0}]}, r"start\[0\]: .*'lr' is not found"),
    ({"start": [{"experts": "lora", "lora_size": 12, "lora_targets": "q,v", "layers": "0.0-1.0",
                 "router": "soft", "router_hidden": 0, "lr": 0.004}]}, r"start\[0\]: '12' not in"),
    ({"start": [{"experts": "lora", "lora_size": 8, "lora_targets": "q,v", "layers": "0.0-1.0",
                 "router": "soft", "router_hidden": 0, "lr": 0.004, "prompt_size": 4}]},
     r"start\[0\]: parameters \['prompt_size'\] are not asked for"),
])
def test_bad_search_spaces_are_refused_in_one_line(tmp_path, changes, message):
    with pytest.raises(ValueError, match=message) as err:
        load_space(_space(tmp_path, **changes))
    assert "\n" not in str(err.value)


def test_median_pruning_is_optunas_median_rule(tmp_path):
    storage = open_storage(f"sqlite:///{tmp_path}/optuna.db", heartbeat_s=30)
    study = open_study(storage, "s", optuna.samplers.RandomSampler(seed=0))
    pruning = MedianPruning(storage, "s", enabled=True, startup_trials=3)
    halfway = [0.2, 0.6, 0.4]
    for value in halfway:
        trial = study.ask()
        assert not pruning.should_prune(trial, 5, value)  # still in the startup trials
        pruning.finish(trial, value)
        study.tell(trial, [value, 10.0])
    median = statistics.median(halfway)
    below, above = study.ask(), study.ask()
    assert pruning.should_prune(below, 5, median - 0.1)
    assert not pruning.should_prune(above, 5, median + 0.1)
    pruning.finish(below, None)
    twins = optuna.load_study(study_name="s:pruning", storage=storage).get_trials()
    assert [t.state.name for t in twins].count("PRUNED") == 1
    assert below.user_attrs["pruning_twin"] != above.user_attrs["pruning_twin"]


def test_disabled_pruning_never_prunes(tmp_path):
    storage = open_storage(f"sqlite:///{tmp_path}/optuna.db", heartbeat_s=30)
    study = open_study(storage, "s", optuna.samplers.RandomSampler(seed=0))
    pruning = MedianPruning(storage, "s", enabled=False, startup_trials=0)
    for value in (0.9, 0.9, 0.0):
        trial = study.ask()
        assert not pruning.should_prune(trial, 1, value)
        pruning.finish(trial, value)
        study.tell(trial, [value, 1.0])


def test_pareto_numbers_are_the_non_dominated_trials(tmp_path):
    storage = open_storage(f"sqlite:///{tmp_path}/optuna.db", heartbeat_s=30)
    study = open_study(storage, "s", optuna.samplers.RandomSampler(seed=0))
    points = [(0.5, 100), (0.6, 200), (0.4, 150), (0.6, 300), (0.7, 1000), (0.3, 50)]
    for accuracy, params in points:
        study.tell(study.ask(), [accuracy, params])
    brute = {i for i, (a, p) in enumerate(points)
             if not any(a2 >= a and p2 <= p and (a2 > a or p2 < p) for a2, p2 in points)}
    assert pareto_numbers(study) == brute


def _timed_trial(number: int, state: TrialState, seconds: float, start: datetime.datetime):
    """A finished trial that ran ``seconds`` (a running one, without an end), as a FrozenTrial to add."""
    finished = state != TrialState.RUNNING
    return optuna.trial.FrozenTrial(
        number=number, state=state, value=None, values=[0.5, 10.0] if state == TrialState.COMPLETE else None,
        datetime_start=start, datetime_complete=start + datetime.timedelta(seconds=seconds) if finished else None,
        params={}, distributions={}, user_attrs={}, system_attrs={}, intermediate_values={}, trial_id=number)


def test_the_time_budget_counts_finished_trials_and_a_typical_trial_for_each_running_and_the_next(tmp_path):
    storage = open_storage(f"sqlite:///{tmp_path}/optuna.db", heartbeat_s=30)
    study = open_study(storage, "s", optuna.samplers.RandomSampler(seed=0))
    assert next_trial_fits(study, 1.0)  # nothing known yet: the first trial always starts
    start = datetime.datetime(2026, 1, 1, 12, 0, 0)
    spec = [(TrialState.COMPLETE, 300.0), (TrialState.PRUNED, 120.0), (TrialState.COMPLETE, 340.0),
            (TrialState.COMPLETE, 320.0), (TrialState.FAIL, 500.0), (TrialState.RUNNING, 0.0)]
    for number, (state, seconds) in enumerate(spec):
        study.add_trial(_timed_trial(number, state, seconds, start))
    typical = statistics.median([300.0, 340.0, 320.0])  # completed trials only: pruned ones stop early
    committed = 300 + 120 + 340 + 320 + typical  # a failed trial is redone, so its time does not count
    assert typical_trial_seconds(study) == pytest.approx(typical)
    assert committed_trial_seconds(study) == pytest.approx(committed)
    assert next_trial_fits(study, committed + typical)
    assert not next_trial_fits(study, committed + typical - 1)
    assert next_trial_fits(study, None)


def test_an_unreachable_database_is_named_with_its_password_hidden():
    url = "postgresql://moa:s3cret@127.0.0.1:9/optuna"
    with pytest.raises(ValueError) as err:
        open_storage(url, heartbeat_s=5)
    message = str(err.value)
    assert "postgresql://moa:***@127.0.0.1:9/optuna" in message and "s3cret" not in message
    assert "\n" not in message
    assert hide_password("sqlite:////tmp/x.db") == "sqlite:////tmp/x.db"
