"""Every artifact of a run directory: its path and its loader, in one place.

Stages, notebooks and tests name artifacts through :class:`RunArtifacts` instead of joining paths by hand. The
layout (see ``docs/artifacts.md``)::

    calibrate/calibration_<N>.safetensors, samples_<N>.jsonl, manifest.json
    profile/influence_<N>.safetensors, long_range_<N>.png, summary.json
    rules/loss_table.parquet, head_scaling.csv
    plans/plan_<i>.json, binary_<budget>.json        optimize/front.json
    validate/heldout_<N>.safetensors, results.csv, selected_<budget>.json
    plan.json                             (the selected plan)
    eval/results.csv, answers.csv
    bench/kernels.csv
    adapters/results.csv, adapters/<name>/     optuna.db
    <stage>/.done.json                    (completion markers, see pipeline.runner)

Loaders raise :class:`ArtifactError` (a ``ValueError``) naming the file and the stage that makes it; the runner
turns it into a one-line user error.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

LOSS_TABLE_COLUMNS = ("layer", "head", "rule", "alpha", "beta", "length", "loss", "kv_density", "attention_density")
CALIBRATION_TENSORS = ("input_ids", "loss_mask", "lengths")


class ArtifactError(ValueError):
    """A missing or malformed artifact; the message names the file and the stage to re-run."""


@dataclass(frozen=True)
class RunArtifacts:
    """The artifact paths of one run directory, and their loaders."""

    run_dir: Path

    # ---- paths ----------------------------------------------------------------------------------------------
    def calibration(self, n: int) -> Path:
        return self.run_dir / "calibrate" / f"calibration_{n}.safetensors"

    def calibration_records(self, n: int) -> Path:
        return self.run_dir / "calibrate" / f"samples_{n}.jsonl"

    @property
    def calibration_manifest(self) -> Path:
        return self.run_dir / "calibrate" / "manifest.json"

    def influence(self, n: int) -> Path:
        return self.run_dir / "profile" / f"influence_{n}.safetensors"

    def long_range_figure(self, n: int) -> Path:
        return self.run_dir / "profile" / f"long_range_{n}.png"

    @property
    def head_gates(self) -> Path:
        """The trained head gates (``stage=profile``, :mod:`pipeline.profile.gates`)."""
        return self.run_dir / "profile" / "gates.json"

    @property
    def profile_summary(self) -> Path:
        return self.run_dir / "profile" / "summary.json"

    @property
    def loss_table(self) -> Path:
        return self.run_dir / "rules" / "loss_table.parquet"

    @property
    def head_scaling(self) -> Path:
        return self.run_dir / "rules" / "head_scaling.csv"

    @property
    def plans_dir(self) -> Path:
        return self.run_dir / "plans"

    def candidate_plan(self, index: int) -> Path:
        return self.plans_dir / f"plan_{index}.json"

    def candidate_plans(self) -> list[Path]:
        """The front's plan files in index order."""
        return sorted(self.plans_dir.glob("plan_*.json"), key=lambda p: int(p.stem.split("_")[1]))

    def binary_plan(self, budget: str) -> Path:
        """The binary (full-or-streaming heads) baseline plan at budget ``budget`` (its label)."""
        return self.plans_dir / f"binary_{budget}.json"

    def selected_plan_at(self, budget: str) -> Path:
        """The validated choice at budget ``budget`` (its label); ``plan.json`` is the first budget's."""
        return self.run_dir / "validate" / f"selected_{budget}.json"

    @property
    def front(self) -> Path:
        return self.run_dir / "optimize" / "front.json"

    def heldout(self, n: int) -> Path:
        return self.run_dir / "validate" / f"heldout_{n}.safetensors"

    @property
    def validation_results(self) -> Path:
        return self.run_dir / "validate" / "results.csv"

    @property
    def selected_plan(self) -> Path:
        return self.run_dir / "plan.json"

    @property
    def eval_results(self) -> Path:
        return self.run_dir / "eval" / "results.csv"

    @property
    def eval_answers(self) -> Path:
        return self.run_dir / "eval" / "answers.csv"

    @property
    def bench_csv(self) -> Path:
        return self.run_dir / "bench" / "kernels.csv"

    @property
    def adapter_results(self) -> Path:
        return self.run_dir / "adapters" / "results.csv"

    def adapter_weights(self, name: str) -> Path:
        """The saved adapters of trial or baseline ``name`` (a directory: safetensors plus JSON config)."""
        return self.run_dir / "adapters" / name

    @property
    def optuna_db(self) -> Path:
        """The default Optuna storage (``adapters.optuna.storage=null``)."""
        return self.run_dir / "optuna.db"

    # ---- loaders --------------------------------------------------------------------------------------------
    def load_calibration(self, n: int) -> dict:
        """The calibration tensors at length ``n`` (``input_ids``, ``loss_mask`` ``[S, n]``, ``lengths`` ``[S]``),
        checked for shape."""
        from safetensors.torch import load_file

        path = self.calibration(n)
        if not path.is_file():
            raise ArtifactError(f"missing calibration file {path}: run stage=calibrate first (profile length {n})")
        samples = load_file(path)
        missing = set(CALIBRATION_TENSORS) - samples.keys()
        if missing:
            raise ArtifactError(f"calibration file {path} lacks tensors {sorted(missing)}: re-run stage=calibrate")
        ids = samples["input_ids"]
        if ids.ndim != 2 or ids.shape[0] == 0:
            raise ArtifactError(f"calibration file {path} holds no samples: re-run stage=calibrate for length {n}")
        if ids.shape[1] != n or samples["loss_mask"].shape != ids.shape or samples["lengths"].shape != ids.shape[:1]:
            raise ArtifactError(f"calibration file {path} has input_ids {list(ids.shape)}, expected [S, {n}] with "
                                f"matching loss_mask and lengths: re-run stage=calibrate")
        if bool(((samples["lengths"] < 1) | (samples["lengths"] > n)).any()):
            raise ArtifactError(f"calibration file {path} has sample lengths outside 1..{n}: re-run stage=calibrate")
        return samples

    def load_calibration_records(self, n: int) -> list[dict]:
        path = self.calibration_records(n)
        if not path.is_file():
            raise ArtifactError(f"missing calibration records {path}: run stage=calibrate first")
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def load_influence(self, n: int, block_size: int, tensor: str = "influence"):
        """Tensor ``tensor`` (``influence`` or ``net_influence``) ``[L, H, nb, nb]`` float32 at length ``n`` and the
        file's metadata, checked for shape."""
        from safetensors import safe_open

        path = self.influence(n)
        if not path.is_file():
            raise ArtifactError(f"missing influence file {path} for profile length {n}: run stage=profile first")
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
            if tensor not in handle.keys():
                raise ArtifactError(f"{path} holds no tensor {tensor!r}: re-run stage=profile")
            influence = handle.get_tensor(tensor)
        if meta.get("block_size") not in (None, str(block_size)):
            raise ArtifactError(f"{path} was profiled with block size {meta['block_size']}, "
                                f"but sparse.block_size={block_size}: re-run stage=profile")
        nb = math.ceil(n / block_size)
        if influence.dim() != 4 or tuple(influence.shape[-2:]) != (nb, nb):
            raise ArtifactError(f"{path} has shape {tuple(influence.shape)}, expected [L, H, {nb}, {nb}] for N={n}, "
                                f"block {block_size}: re-run stage=profile")
        return influence, meta

    def load_head_gates(self):
        """The head gates ``(L, Hkv)`` as a numpy array, or None when the profile trained none."""
        import numpy as np

        path = self.head_gates
        return np.array(json.loads(path.read_text())["gates"], dtype=np.float64) if path.is_file() else None

    def load_loss_table(self) -> dict:
        """The loss table as arrays: ``loss``, ``kv_density``, ``attention_density`` ``(L, H, R, T)``, rule
        ``alphas``/``betas`` ``(R,)`` and ``lengths`` ``(T,)``."""
        import numpy as np
        import pandas as pd

        path = self.loss_table
        if not path.is_file():
            raise ArtifactError(f"missing loss table {path}: run stage=rules first")
        table = pd.read_parquet(path)
        missing = [c for c in LOSS_TABLE_COLUMNS if c not in table.columns]
        if missing:
            raise ArtifactError(f"{path} lacks column(s) {', '.join(missing)}: re-run stage=rules")
        lengths = np.sort(table["length"].unique())
        shape = (table["layer"].max() + 1, table["head"].max() + 1, table["rule"].max() + 1, len(lengths))
        if len(table) != np.prod(shape):
            raise ArtifactError(f"{path} has {len(table)} rows, expected {int(np.prod(shape))} for shape {shape}: "
                                f"re-run stage=rules")
        t = np.searchsorted(lengths, table["length"].to_numpy())
        index = (table["layer"].to_numpy(), table["head"].to_numpy(), table["rule"].to_numpy(), t)
        arrays = {}
        for column in ("loss", "kv_density", "attention_density"):
            values = np.full(shape, np.nan)
            values[index] = table[column].to_numpy()
            arrays[column] = values
        rules = table.drop_duplicates("rule").sort_values("rule")
        return {**arrays, "alphas": rules["alpha"].to_numpy(), "betas": rules["beta"].to_numpy(),
                "lengths": [int(n) for n in lengths]}

    def load_front(self) -> dict:
        if not self.front.is_file():
            raise ArtifactError(f"missing {self.front}: run stage=optimize first")
        return json.loads(self.front.read_text())

    def load_validation_results(self):
        import pandas as pd

        if not self.validation_results.is_file():
            raise ArtifactError(f"missing {self.validation_results}: run stage=validate first")
        return pd.read_csv(self.validation_results)

    def load_bench(self):
        import pandas as pd

        if not self.bench_csv.is_file():
            raise ArtifactError(f"missing {self.bench_csv}: run stage=benchmark first")
        return pd.read_csv(self.bench_csv)
