"""A non-editable install works away from the checkout: the rule grid and Hydra configs ship as package data."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHIPPED = ("pyproject.toml", "README.md", "pipeline", "kernels", "search_spaces")

PROBE = """
import pipeline, search_spaces
from pipeline.rules.grid import load_grid
from pipeline.run import compose
assert pipeline.__file__.startswith({target!r}), pipeline.__file__
cfg = compose(["model=tiny"])
rules = load_grid(str(cfg.rules.grid), [512, 1024, 2048], sink=64, min_span=64, block_size=64)
print(len(rules), "rules from", search_spaces.__file__)
"""


def test_installed_wheel_finds_the_default_rule_grid(tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    for name in SHIPPED:
        copy = shutil.copytree if (REPO / name).is_dir() else shutil.copy
        copy(REPO / name, source / name, **({"ignore": shutil.ignore_patterns("__pycache__")} if copy is shutil.copytree else {}))
    pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"), str(source)],
                   check=True, capture_output=True, timeout=300)
    wheel = next((tmp_path / "dist").glob("moa_autotune-*.whl"))
    target = tmp_path / "site"
    subprocess.run([*pip, "install", "--no-deps", "--target", str(target), str(wheel)], check=True, capture_output=True,
                   timeout=300)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result = subprocess.run([sys.executable, "-c", PROBE.format(target=str(target))], cwd=elsewhere,
                            env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "rules from " + str(target) in result.stdout
