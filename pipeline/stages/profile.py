"""stage=profile: average the blockwise attention influence over each profile length's calibration samples.

Per length ``N`` it writes ``profile/influence_<N>.safetensors`` (tensor ``influence`` ``[L, H, nb, nb]``
float32, ``nb = ceil(N / block_size)``, the mean block sums of ``|E_ij|``; beside it ``net_influence``, the mean
signed block sums, see :mod:`pipeline.profile.influence`) and a heat-map ``profile/long_range_<N>.png``;
``profile/summary.json`` comes last. Work is resumable: after every ``profile.checkpoint_every`` samples the
running sums, counts and elapsed time go to ``profile/.partial/<config hash>/partial_<N>.safetensors``, and a
length whose influence file exists for the same model fingerprint, block size, granularity, dtype and calibration
file (SHA-256) is skipped. Samples longer than the model's positions, or whose loss mask selects no token, are
skipped with a warning and counted (metric ``skipped_samples``).

With ``profile.gate_steps > 0`` it then trains the head gates on the calibration samples at
``profile.gate_length`` (:func:`profile_gates`, :mod:`pipeline.profile.gates`) into ``profile/gates.json``, on
rank 0 only.

Under ``torchrun --nproc_per_node=K`` rank ``r`` profiles the samples ``s`` with ``s % K == r`` and keeps its own
partial file (``partial_<N>.rank<r>of<K>.safetensors``, so runs with another world size never mix). After a
length's local loop the float64 sums and the counts are summed over the ranks (seconds and memory: the maximum
over ranks), and rank 0 alone writes the influence file, the heat-map, ``summary.json`` and the MLflow metrics.
"""

from __future__ import annotations

import hashlib
import logging
import math
import resource
import time
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from pipeline import distributed
from pipeline.errors import UserError
from pipeline.io import atomic_path, read_json, save_tensors, write_json
from pipeline.profile.figures import long_range_heatmap
from pipeline.profile.gates import train_gates
from pipeline.profile.influence import attention_influences
from pipeline.profile.loss import loss_targets
from pipeline.profile.stats import layer_summaries, long_range_fraction
from pipeline.settings import ProfileSettings
from pipeline.stages.registry import stage

log = logging.getLogger(__name__)

TENSORS = "influence,net_influence"
"""What a finished influence file holds (recorded in its metadata: files from before ``net_influence`` are redone)."""


@stage("profile", requires=("calibrate",), config_keys=("sparse", "calibration", "profile"),
       outputs=("profile/",), hash_excludes=("profile.collective_timeout_s",))
def run_profile(ctx):
    """Profile per-head attention influence at every profile length."""
    settings = ctx.settings.profile
    loaded = ctx.load_model()
    ctx.log_params({"block_size": settings.block_size, "granularity": settings.granularity,
                    "profile_lengths": list(settings.lengths), "profile_dtype": settings.dtype})
    if ctx.force and distributed.is_primary():
        for path in [*ctx.stage_dir.glob("influence_*.safetensors"), ctx.artifacts.head_gates]:
            path.unlink(missing_ok=True)
    results = {str(n): profile_length(ctx, loaded, n, settings) for n in settings.lengths}
    if not distributed.is_primary():
        return {}
    gates = profile_gates(ctx, loaded, settings)
    skipped = sum(r["skipped_samples"] for r in results.values())
    ctx.log_metrics({"skipped_samples": skipped})
    summary = {"model": loaded.info.name, "fingerprint": loaded.info.fingerprint, "block_size": settings.block_size,
               "granularity": settings.granularity, "lengths": results}
    if gates is not None:
        summary["gates"] = {"length": settings.gate_length, "mean": float(gates.mean()),
                            "at_least_half": int((gates >= 0.5).sum())}
    write_json(ctx.artifacts.profile_summary, summary)
    return {"lengths": list(settings.lengths), "skipped_samples": skipped}


def profile_gates(ctx, loaded, settings: ProfileSettings) -> np.ndarray | None:
    """Train the head gates (:mod:`pipeline.profile.gates`) on the calibration samples at ``profile.gate_length``
    and write ``profile/gates.json``; reuse that file when it was trained with the same settings on the same
    samples. The streaming side keeps the sink and ``sparse.min_span`` tokens: a head's narrowest rule. Returns
    the gates ``[L, Hkv]``, or None (and no file) when ``profile.gate_steps`` is 0."""
    path = ctx.artifacts.head_gates
    if settings.gate_steps == 0:
        path.unlink(missing_ok=True)
        return None
    n, sparse = settings.gate_length, ctx.settings.sparse
    key = {"fingerprint": str(loaded.info.fingerprint), "length": n, "steps": settings.gate_steps,
           "lr": settings.gate_lr, "l1": settings.gate_l1, "sink": sparse.sink, "window": sparse.min_span,
           "calibration_sha256": hashlib.sha256(ctx.artifacts.calibration(n).read_bytes()).hexdigest()}
    stored = read_json(path) if path.is_file() else None
    if stored is not None and stored.get("settings") == key:
        log.info("profile: %s is up to date, skipping the head gates", path)
        gates = np.array(stored["gates"])
    else:
        samples = ctx.artifacts.load_calibration(n)
        device = next(loaded.model.parameters()).device
        pairs = []
        for s in range(samples["input_ids"].shape[0]):
            real = int(samples["lengths"][s])
            targets = loss_targets(samples["loss_mask"][s, :real])  # (T,) response tokens
            if targets.numel():
                pairs.append((samples["input_ids"][s, :real].to(device), (targets - 1).to(device)))
        if not pairs:
            raise UserError(f"no calibration sample at length {n} has response tokens to train the head gates on")
        began = time.perf_counter()
        gates = train_gates(loaded.model, pairs, sink=sparse.sink, window=sparse.min_span,
                            steps=settings.gate_steps, lr=settings.gate_lr, l1=settings.gate_l1,
                            progress=ctx.progress)
        write_json(path, {"settings": key, "gates": gates.round(6).tolist(),
                          "seconds": round(time.perf_counter() - began, 3)})
    ctx.log_metrics({"gate_mean": float(gates.mean()), "gates_at_least_half": int((gates >= 0.5).sum())})
    return gates


def profile_length(ctx, loaded, n: int, settings: ProfileSettings) -> dict | None:
    """Average influence at length ``n``, resuming from a partial file; returns this length's summary (on rank 0;
    None on the other ranks)."""
    info = loaded.info
    source = ctx.artifacts.calibration(n)
    samples = ctx.artifacts.load_calibration(n)
    target = ctx.artifacts.influence(n)
    expected = {"fingerprint": str(info.fingerprint), "block_size": str(settings.block_size),
                "granularity": settings.granularity, "length": str(n), "dtype": settings.dtype,
                "calibration_sha256": hashlib.sha256(source.read_bytes()).hexdigest(), "tensors": TENSORS}
    done = _metadata(target)
    if distributed.broadcast(done is not None and _matches(done, expected)):  # rank 0 decides for every rank
        log.info("profile: %s is up to date, skipping length %d", target, n)
        return _length_summary(ctx, load_file(target)["influence"], done, n, settings) if distributed.is_primary() \
            else None

    count = samples["input_ids"].shape[0]
    rank, world = distributed.rank(), distributed.world_size()
    heads = info.num_kv_heads if settings.granularity == "kv_head" else info.num_heads
    nb = math.ceil(n / settings.block_size)
    # The runner clears .partial/<other config hashes> (and all of it on force=true).
    shard = {**expected, "rank": str(rank), "world_size": str(world)}
    partial_path = ctx.partial_dir / (f"partial_{n}.safetensors" if world == 1
                                      else f"partial_{n}.rank{rank}of{world}.safetensors")
    state = _load_partial(partial_path, shard) or {
        "total": torch.zeros(info.num_layers, heads, nb, nb, dtype=torch.float64),
        "net": torch.zeros(info.num_layers, heads, nb, nb, dtype=torch.float64),
        "next": rank, "used": 0, "skipped": 0, "seconds": 0.0,
    }

    model = loaded.model
    device = next(model.parameters()).device
    mine = range(rank, count, world)  # this rank's samples; "next" is the first one not yet summed
    bar = ctx.progress(total=len(mine), initial=len(range(rank, state["next"], world)), desc=f"profile N={n}",
                       **({} if distributed.is_primary() else {"disable": True}))
    while state["next"] < count:
        start = time.perf_counter()
        for s in range(state["next"], count, world)[: settings.checkpoint_every]:
            influences = _sample_influence(model, samples, s, info.max_positions, settings, device, source)
            if influences is None:
                state["skipped"] += 1
            else:
                for key, influence in zip(("total", "net"), influences, strict=True):
                    state[key][..., : influence.shape[-2], : influence.shape[-1]] += influence.double().cpu()
                state["used"] += 1
            state["next"] = s + world
            bar.update(1)
        state["seconds"] += time.perf_counter() - start
        _save_partial(partial_path, state, shard)
    bar.close()

    total = distributed.all_reduce(state["total"])  # (L, H, nb, nb) float64, summed over ranks
    net = distributed.all_reduce(state["net"])
    used, skipped = distributed.all_reduce(torch.tensor([state["used"], state["skipped"]])).tolist()
    peaks = [state["seconds"], resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024]
    if device.type == "cuda":
        peaks.append(torch.cuda.max_memory_allocated(device) / 2**20)
    peaks = distributed.all_reduce(torch.tensor(peaks, dtype=torch.float64), op="max").tolist()
    if used == 0:
        raise UserError(f"no usable calibration sample in {source} ({skipped} skipped, see warnings); "
                        f"re-run stage=calibrate for length {n}")
    mean = metadata = None
    if distributed.is_primary():
        mean = (total / used).float()
        metadata = {**expected, "model": info.name, "samples": str(used), "skipped_samples": str(skipped),
                    "seconds": f"{peaks[0]:.3f}", "peak_rss_mb": f"{peaks[1]:.1f}", "world_size": str(world)}
        if len(peaks) > 2:
            metadata["cuda_max_memory_mb"] = f"{peaks[2]:.1f}"
        save_tensors(target, {"influence": mean, "net_influence": (net / used).float()}, metadata=metadata)
    distributed.barrier()  # the influence file is written before any rank drops its partial sums
    partial_path.unlink(missing_ok=True)
    return _length_summary(ctx, mean, metadata, n, settings) if distributed.is_primary() else None


def _sample_influence(model, samples: dict, s: int, max_positions: int, settings: ProfileSettings, device,
                      source: Path) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Absolute and net influence of sample ``s`` truncated to its real length, or None (with a warning) if it is
    unusable."""
    real = int(samples["lengths"][s])
    if 0 < max_positions < real:
        log.warning("profile: skipping sample %d of %s: %d tokens exceed the model's %d positions",
                    s, source, real, max_positions)
        return None
    mask = samples["loss_mask"][s, :real]
    if loss_targets(mask).numel() == 0:
        log.warning("profile: skipping sample %d of %s: its loss mask selects no response token", s, source)
        return None
    ids = samples["input_ids"][s, :real].to(device)
    # Tail padding is causal-invisible to the real tokens, so the sample is profiled at its real length;
    # blocks past it stay zero.
    return attention_influences(model, ids, mask.to(device), settings.block_size, settings.granularity,
                                settings.torch_dtype, settings.answer_weight)


def _length_summary(ctx, influence: torch.Tensor, metadata: dict[str, str], n: int,
                    settings: ProfileSettings) -> dict:
    """Summary of one finished length (from its file metadata); logs metrics, per-layer rows and the heat-map."""
    min_distance = settings.long_range * n
    fractions = long_range_fraction(influence, settings.block_size, min_distance)  # (L, H)
    layers = layer_summaries(influence, settings.block_size, min_distance)
    summary = {"samples": int(metadata["samples"]), "skipped_samples": int(metadata["skipped_samples"]),
               "seconds": float(metadata["seconds"]), "peak_rss_mb": float(metadata["peak_rss_mb"]),
               "world_size": int(metadata.get("world_size", 1)),
               "long_range_share": fractions.tolist(), "influence_mass": influence.sum((-1, -2)).tolist(),
               "layers": layers}
    metrics = {f"profile_seconds@{n}": summary["seconds"], f"samples@{n}": summary["samples"],
               f"skipped_samples@{n}": summary["skipped_samples"], f"peak_rss_mb@{n}": summary["peak_rss_mb"]}
    if "cuda_max_memory_mb" in metadata:
        summary["cuda_max_memory_mb"] = float(metadata["cuda_max_memory_mb"])
        metrics[f"cuda_max_memory_mb@{n}"] = summary["cuda_max_memory_mb"]
    ctx.log_metrics(metrics)
    for layer, row in enumerate(layers):
        ctx.log_metrics({f"layer_influence_mass@{n}": row["influence_mass"],
                         f"layer_long_range_share@{n}": row["long_range_share"]}, step=layer)
    figure = long_range_heatmap(fractions, n, min_distance)
    with atomic_path(ctx.artifacts.long_range_figure(n)) as tmp:
        figure.savefig(tmp, format="png", dpi=100)
    ctx.log_figure(figure, f"long_range_{n}.png")
    return summary


def _metadata(path: Path) -> dict[str, str] | None:
    if not path.exists():
        return None
    with safe_open(str(path), framework="pt") as f:
        return f.metadata() or {}


def _matches(metadata: dict[str, str], expected: dict[str, str]) -> bool:
    return all(metadata.get(k) == v for k, v in expected.items())


def _load_partial(path: Path, expected: dict[str, str]) -> dict | None:
    """Resume state from a partial file written under the same ``expected`` metadata, else None."""
    metadata = _metadata(path)
    if metadata is None or not _matches(metadata, expected):
        return None
    print(f"[profile] resuming from {path.name}: {metadata['used']} samples done, next is {metadata['next']}",
          flush=True)
    tensors = load_file(path)
    return {"total": tensors["total"], "net": tensors["net"], "next": int(metadata["next"]),
            "used": int(metadata["used"]), "skipped": int(metadata["skipped"]), "seconds": float(metadata["seconds"])}


def _save_partial(path: Path, state: dict, expected: dict[str, str]) -> None:
    """Atomically write the running sum and counters, so an interrupted run resumes after the last batch."""
    metadata = {**expected, "next": str(state["next"]), "used": str(state["used"]),
                "skipped": str(state["skipped"]), "seconds": repr(state["seconds"])}
    save_tensors(path, {"total": state["total"], "net": state["net"]}, metadata=metadata)
