"""Typed settings (pipeline/settings.py): every config key rejects a bad value up front, in one line, exit 2.

The bad-value table must cover every key of the composed config (default and ``model=tiny``): a key added to
``pipeline/conf`` without an entry here fails :func:`test_every_config_key_has_bad_values`.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import DictConfig

from pipeline.errors import UserError
from pipeline.run import compose, main
from pipeline.settings import DTYPES, check_all, density_budgets

REPO = Path(__file__).resolve().parents[1]
FILE, MISSING = "<file>", "<missing>"  # placeholders: an existing plain file, a path that does not exist

BAD: dict[str, tuple[str | tuple[str, str], ...]] = {
    # key: bad values as written on the command line; (value, shown) where the message shows a part of it
    "stage": ("nope", "1"),
    "run_dir": (FILE, "''"),
    "force": ("maybe", "1"),
    "lock_wait": ("soon",),
    "seed": ("-1", "1.5", "true"),
    "device": ("tpu", "[cpu]"),
    "model.name": ("''", "[a]"),
    "model.source": ("bogus",),
    "model.path": (MISSING, FILE),
    "model.cache_dir": (FILE, "''"),
    "model.dtype": ("int8", "float"),
    "model.max_positions": ("0", "abc"),
    "model.seed": ("-1",),
    "model.vocab_size": ("0",),
    "model.hidden_size": ("0", "66"),
    "model.intermediate_size": ("abc",),
    "model.num_layers": ("0",),
    "model.num_heads": ("0",),
    "model.num_kv_heads": ("3", "0"),
    "calibration.lengths": ("[0]", "512", "[]", "[768,768]", "[768,abc]"),
    "calibration.samples_per_length": ("0", "true"),
    "calibration.tasks": ("[bogus]", "kv_lines", "[]"),
    "calibration.max_new_tokens": ("0",),
    "calibration.seed": ("-3",),
    "profile.lengths": ("[1024]", "[]", "768"),
    "profile.checkpoint_every": ("0",),
    "profile.dtype": ("float16",),
    "profile.long_range": ("1.5", "0", "nan"),
    "profile.collective_timeout_s": ("0", "-5", "abc"),
    "rules.grid": (MISSING, "''"),
    "rules.coverages": ("0.9", "[]", "[0.9,1.5]"),
    "rules.report_coverage": ("0.5", "2"),
    "rules.local_beta": ("-0.1", "abc"),
    "rules.influence": ("signed", "1"),
    "optimize.density_budget": ("2", "0", "abc", "true", "[]", ("[0.5,2]", "[1]: bad value 2"), "[0.5,0.5]", "{768: 0.5}", ("[{768: 0.5, 1536: 2}]", "[0][1536]: bad value 2"),
                                "{768: 0.5, 1536: 0.5, 3072: 0.5}"),
    "optimize.lower_bound_ratio": ("0", "1.5"),
    "optimize.max_rules_per_layer": ("0", "true"),
    "optimize.solver": ("gurobi",),
    "optimize.points": ("-1", "2.5"),
    "optimize.time_limit": ("0", "-5", "abc"),
    "optimize.gap_rel": ("-0.1", "1"),
    "optimize.binary_window": ("0", "abc", "true"),
    "validate.length": ("768", "8", "abc"),
    "validate.samples": ("0", "true"),
    "validate.backend": ("warp",),
    "validate.shortlist": ("0", "abc"),
    "validate.tie_tolerance": ("-0.01", "1", "abc"),
    "profile.answer_weight": ("-1", "abc", "true"),
    "profile.gate_steps": ("-1", "2.5"),
    "profile.gate_length": ("1024", "abc", "true"),
    "profile.gate_lr": ("0", "abc"),
    "profile.gate_l1": ("-0.1",),
    "optimize.gate_weight": ("-1", "abc"),
    "evaluate.tasks": ("[bogus]", "[]", "passkey"),
    "evaluate.lengths": ("[0]", "[]", ("[99999]", "99999")),
    "evaluate.samples": ("0", "true"),
    "evaluate.max_new_tokens": ("0", "abc"),
    "evaluate.seed": ("-1",),
    "evaluate.backend": ("warp",),
    "evaluate.dtype": ("float64", "half"),
    "benchmark.seq_lens": ("[0]", "1024", "[]"),
    "benchmark.densities": ("[2.0]", "[]"),
    "benchmark.backends": ("[dense,warp]", "dense"),
    "benchmark.decode_seq_lens": ("[-1]",),
    "benchmark.decode_backends": ("[bogus]",),
    "benchmark.batch": ("0",),
    "benchmark.heads": ("0",),
    "benchmark.kv_heads": ("3",),
    "benchmark.head_dim": ("0",),
    "benchmark.dtype": ("int8",),
    "benchmark.warmup": ("-1",),
    "benchmark.repeats": ("0",),
    "benchmark.decode_repeats": ("0",),
    "benchmark.error_rows": ("0",),
    "adapters.tasks": ("[bogus]", "[]", "arithmetic"),
    "adapters.train_examples": ("0", "abc"),
    "adapters.val_examples": ("0",),
    "adapters.test_examples": ("-2",),
    "adapters.steps": ("1", "true"),
    "adapters.final_steps": ("1", "abc"),
    "adapters.batch_size": ("0",),
    "adapters.max_new_tokens": ("0",),
    "adapters.latency_prompts": ("0",),
    "adapters.plan_training": ("sometimes",),
    "adapters.latency_rounds": ("0", "abc"),
    "adapters.weight_decay": ("-1", "abc"),
    "adapters.warmup_ratio": ("1", "-0.5"),
    "adapters.max_grad_norm": ("0",),
    "adapters.search_space": (MISSING, FILE, "''"),
    "adapters.plan": (MISSING, "''"),
    "adapters.backend": ("warp",),
    "adapters.dtype": ("float64", "half"),
    "adapters.seed": ("-1",),
    "adapters.optuna.trials": ("0", "abc"),
    "adapters.optuna.sampler": ("random",),
    "adapters.optuna.sampler_seed": ("-1",),
    "adapters.optuna.startup_trials": ("-1",),
    "adapters.optuna.pruner": ("hyperband",),
    "adapters.optuna.pruner_startup_trials": ("-1",),
    "adapters.optuna.storage": ("mongodb://host/db", "5"),
    "adapters.optuna.study_name": ("''",),
    "adapters.optuna.heartbeat_s": ("0",),
    "adapters.optuna.worker": ("sometimes",),
    "adapters.optuna.time_budget_min": ("0", "-3", "abc", "inf"),
    "adapters.baselines.lora_targets": ("[q,bogus]", "[]"),
    "adapters.baselines.moe_lora_experts": ("1",),
    "adapters.baselines.moe_lora_rank": ("0",),
    "adapters.baselines.moe_lora_targets": ("[w]",),
    "adapters.baselines.moe_lora_top_k": ("0", "9"),
    "tracking.uri": ("ftp://host", "5"),
    "tracking.experiment": ("''",),
    "sparse.sink": ("-1",),
    "sparse.min_span": ("0",),
    "sparse.block_size": ("0",),
    "sparse.granularity": ("query",),
}


def config_keys(cfg: DictConfig, prefix: str = "") -> set[str]:
    """Every leaf key as a dotted path (``section.key``, ``section.sub.key``)."""
    keys = set()
    for name in cfg.keys():
        node = cfg._get_node(name)
        keys |= config_keys(node, f"{prefix}{name}.") if isinstance(node, DictConfig) else {f"{prefix}{name}"}
    return keys


def test_every_config_key_has_bad_values():
    keys = config_keys(compose([])) | config_keys(compose(["model=tiny"]))
    assert keys - BAD.keys() == set(), "add bad values for these new keys to BAD"
    assert BAD.keys() - keys == set(), "BAD names keys the config no longer has"


def _fill(value: str, tmp_path: Path) -> str:
    file = tmp_path / "a_file.txt"
    file.write_text("not a directory, not a grid\n")
    return value.replace(FILE, str(file)).replace(MISSING, str(tmp_path / "missing"))


def _flat(text: str) -> str:
    return re.sub(r"[\s'\"]", "", text).lower()


def assert_one_line_error(err: str, key: str, shown: str | None = None) -> str:
    """Exactly one stderr line: ``error: <key>: bad value <shown> (expected ...)``, no traceback."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    line = lines[0]
    assert "Traceback" not in err
    assert re.match(rf"error: {re.escape(key)}(\[\d+\])*: bad value ", line), line
    assert "(expected " in line, line
    if shown is not None:
        assert _flat(shown) in _flat(line), line
    return line


@pytest.fixture
def no_stage_runs(monkeypatch):
    """In-process ``main``: reaching the runner means a bad value got through; fail at once instead of running."""
    import pipeline.runner

    def refuse(cfg):
        raise AssertionError(f"the runner was reached with stage={cfg.stage}: a bad value was not rejected")

    monkeypatch.setattr(pipeline.runner, "run_pipeline", refuse)


def assert_nothing_written(run_dir: Path) -> None:
    assert not run_dir.exists() or not any(run_dir.iterdir()), sorted(run_dir.rglob("*"))


def _cases():
    for key, values in BAD.items():
        for value in values:
            value, shown = value if isinstance(value, tuple) else (value, None if value == "''" else value)
            yield pytest.param(key, value, shown, id=f"{key}={value}")


@pytest.mark.parametrize("key,value,shown", list(_cases()))
def test_bad_value_exits_2_with_one_line_before_any_stage(tmp_path, capsys, no_stage_runs, key, value, shown):
    value, shown = _fill(value, tmp_path), shown and _fill(shown, tmp_path)
    run_dir = tmp_path / "run"
    overrides = ["model=tiny", f"{key}={value}"] + ([] if key == "run_dir" else [f"run_dir={run_dir}"])
    assert main(overrides) == 2
    assert_one_line_error(capsys.readouterr().err, key, shown)
    assert_nothing_written(run_dir)


@pytest.mark.parametrize("overrides,key,shown", [
    (("model.source=path",), "model.path", "null"),
    (("calibration.lengths=[1024]", "stage=validate"), "validate.length", "null"),
    (("calibration.lengths=[1024,1088]",), "validate.length", "1024"),  # the default midpoint is a profile length
    (("rules.grid=<grid>",), "rules.grid", None),
    (("benchmark.heads=6", "benchmark.kv_heads=4"), "benchmark.kv_heads", "4"),
    (("stage=calibrate", "optimize.density_budget=[{768: 0.5}]"), "optimize.density_budget", None),
])
def test_cross_key_checks_name_the_key(tmp_path, capsys, no_stage_runs, overrides, key, shown):
    grid = tmp_path / "grid.yaml"
    grid.write_text("alpha: {start: 0}\nbeta: [0.0]\nrules: [[2000, 0.0]]\n")  # 2000 > N at 768
    run_dir = tmp_path / "run"
    args = [o.replace("<grid>", str(grid)) for o in overrides]
    assert main(["model=tiny", f"run_dir={run_dir}", *args]) == 2
    err = capsys.readouterr().err
    if key == "rules.grid":  # the grid's own messages name the rule instead of repeating "bad value"
        line = err.strip()
        assert line.startswith("error: rules.grid:") and "alpha=2000.0" in line and "\n" not in line
    else:
        assert_one_line_error(err, key, shown)
    assert_nothing_written(run_dir)


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="CUDA is available here")
def test_cuda_without_cuda_fails_up_front(tmp_path, capsys, no_stage_runs):
    assert main(["model=tiny", f"run_dir={tmp_path}/run", "stage=calibrate", "device=cuda"]) == 2
    assert_one_line_error(capsys.readouterr().err, "device", "cuda")


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "MOA_NO_PROGRESS": "1"}
    return subprocess.run([sys.executable, "-m", "pipeline.run", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)


@pytest.mark.parametrize("override,key", [
    ("optimize.points=-1", "optimize.points"),
    ("validate.samples=0", "validate.samples"),
    ("optimize.density_budget=2", "optimize.density_budget"),
])
def test_cli_subprocess_rejects_a_later_stage_value_before_calibrate(tmp_path, override, key):
    """``stage=calibrate`` with a bad optimize/validate value: the real CLI exits 2 before calibrating."""
    run_dir = tmp_path / "run"
    result = _cli("model=tiny", "stage=calibrate", f"run_dir={run_dir}", override)
    assert result.returncode == 2, result.stderr
    assert_one_line_error(result.stderr, key, override.split("=", 1)[1])
    assert result.stdout == ""
    assert_nothing_written(run_dir)


# ---- valid values ------------------------------------------------------------------------------------------


def test_default_and_tiny_configs_compose_into_typed_settings():
    default = check_all(compose([]))
    assert default.model.tiny is None and default.model.source == "smollm2_gguf"
    assert default.optimize.budgets == ({512: 0.5, 1024: 0.5, 2048: 0.5}, {512: 0.25, 1024: 0.25, 2048: 0.25})
    assert default.validate.length == 1536  # midpoint of 1024 and 2048, block-aligned
    tiny = check_all(compose(["model=tiny"]))
    assert tiny.model.tiny.num_kv_heads == 2 and tiny.calibration.lengths == (768, 1536)
    assert tiny.profile.lengths == (768, 1536) and tiny.rules.lengths == (768, 1536)
    assert tiny.optimize.time_limit == 60.0 and tiny.optimize.lower_bound_ratio is None
    assert tiny.tracking.uri is None and tiny.run.stages[0] == "calibrate"


def test_valid_values_of_each_kind_are_accepted(tmp_path):
    checkpoint = tmp_path / "ckpt"
    checkpoint.mkdir()
    settings = check_all(compose([
        "model=tiny", f"run_dir={tmp_path}/run", "optimize.density_budget=[{768: 0.5, 1536: 0.25}]",
        "optimize.lower_bound_ratio=0.9", "optimize.time_limit=null", "optimize.gap_rel=0", "optimize.solver=cbc",
        "validate.length=1000", "validate.backend=cpu", "tracking.uri=http://127.0.0.1:5000", "device=cpu",
        "benchmark.seq_lens=[1024]", "benchmark.dtype=float16", "benchmark.warmup=0", "profile.lengths=[1536,768]",
        "profile.dtype=float64", "rules.coverages=[0.5,0.8]", "rules.report_coverage=0.8", "rules.local_beta=0",
        "model.source=path", f"model.path={checkpoint}", "sparse.granularity=head", "sparse.sink=0",
    ]))
    assert settings.optimize.budgets == ({768: 0.5, 1536: 0.25},)
    assert settings.optimize.time_limit is None and settings.optimize.lower_bound_ratio == 0.9
    assert settings.model.path == checkpoint and settings.model.name == "ckpt"  # runs named after the folder
    assert settings.validate.length == 1000 and settings.profile.lengths == (1536, 768)
    assert settings.rules.lengths == (768, 1536) and settings.benchmark.seq_lens == (1024,)
    assert settings.benchmark.dtype == DTYPES["float16"] and settings.profile.torch_dtype == DTYPES["float64"]
    assert settings.run.run_dir == tmp_path / "run"


def test_single_length_is_fine_until_validate_runs():
    assert check_all(compose(["model=tiny", "stage=calibrate", "calibration.lengths=[1024]"])).validate.length is None
    assert check_all(compose(["model=tiny", "stage=profile", "profile.lengths=[768]"])).validate.length is None
    assert check_all(compose(["model=tiny", "stage=validate", "calibration.lengths=[1024]",
                              "validate.length=2048"])).validate.length == 2048


def test_density_budget_forms():
    assert density_budgets(1, [1024, 512]) == ({512: 1.0, 1024: 1.0},)
    assert density_budgets({"512": 0.25, 1024: 0.5}, [512, 1024]) == ({512: 0.25, 1024: 0.5},)
    assert density_budgets([0.5, {"512": 0.25, 1024: 0.3}], [512, 1024]) == (
        {512: 0.5, 1024: 0.5}, {512: 0.25, 1024: 0.3})
    with pytest.raises(UserError, match=r"optimize\.density_budget\[1\]: bad value 1\.5"):
        density_budgets([0.5, 1.5], [512, 1024])
    with pytest.raises(UserError, match=r"optimize\.density_budget\[1024\]: bad value 1\.5"):
        density_budgets({512: 0.25, 1024: 1.5}, [512, 1024])
