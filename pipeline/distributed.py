"""The process group of a ``torchrun`` launch, and the no-op tracking that ranks other than 0 get.

``torchrun --nproc_per_node=K -m pipeline.run stage=profile`` starts K processes with ``RANK``, ``WORLD_SIZE`` and
``LOCAL_RANK`` in their environment. :func:`process_group` starts the group once for the whole invocation (gloo on
CPU; NCCL on ``cuda:LOCAL_RANK`` when the run's device is CUDA), with a timeout on every collective, so a rank
that dies makes the others fail instead of waiting for ever. In one process (no ``WORLD_SIZE``, or 1) there is no
group at all: the collectives here return their input and :func:`barrier` returns at once.

Rank 0 is the only one that writes shared artifacts, markers and MLflow runs; the others log through
:class:`NullTracker` and :class:`NullRunLogger`.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from pipeline.errors import UserError

REDUCE_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}


def world_size() -> int:
    """``WORLD_SIZE`` as torchrun sets it; 1 outside torchrun."""
    return int(os.environ.get("WORLD_SIZE") or 1)


def rank() -> int:
    """This process's global rank; 0 outside torchrun."""
    return int(os.environ.get("RANK") or 0)


def local_rank() -> int:
    """This process's rank on its node (its GPU index under NCCL); 0 outside torchrun."""
    return int(os.environ.get("LOCAL_RANK") or 0)


def is_primary() -> bool:
    """Whether this process writes the shared artifacts, markers and MLflow runs (rank 0)."""
    return rank() == 0


@contextlib.contextmanager
def process_group(cuda: bool, timeout_s: float) -> Iterator[None]:
    """Start the process group under torchrun (nothing in one process) and destroy it on exit.

    ``cuda``: use NCCL on ``cuda:LOCAL_RANK`` (else gloo); ``timeout_s``: how long any collective may wait for the
    other ranks before it raises.
    """
    if world_size() <= 1 or dist.is_initialized():
        yield
        return
    kwargs: dict[str, Any] = {}
    if cuda:
        device = torch.device("cuda", local_rank())
        torch.cuda.set_device(device)
        kwargs["device_id"] = device
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=timeout_s), **kwargs)
    try:
        yield
    finally:
        dist.destroy_process_group()


@contextlib.contextmanager
def _collective(what: str) -> Iterator[None]:
    """Turn a failed collective (gloo raises when its timeout expires or a peer is gone) into one clear line."""
    try:
        yield
    except RuntimeError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"rank {rank()}: {what} failed waiting for the other ranks ({first}); a rank died or hangs "
                        f"(see torchrun's report); rerun the same command to resume") from None


def _collective_device() -> torch.device:
    return torch.device("cuda", local_rank()) if dist.get_backend() == "nccl" else torch.device("cpu")


def all_reduce(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """``tensor`` reduced over the ranks (``op``: sum or max), as a new tensor on ``tensor``'s device; the input
    itself in one process."""
    if not dist.is_initialized():
        return tensor
    work = tensor.to(_collective_device(), copy=True)
    with _collective("all_reduce"):
        dist.all_reduce(work, op=REDUCE_OPS[op])
    return work.to(tensor.device)


def broadcast(value: Any) -> Any:
    """Rank 0's ``value`` (any picklable object) on every rank, so that all ranks take the same decision."""
    if not dist.is_initialized():
        return value
    box = [value]
    with _collective("broadcast"):
        dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    """Wait until every rank gets here (bounded by the group's timeout); nothing in one process."""
    if dist.is_initialized():
        with _collective("barrier"):
            dist.barrier()


class NullRunLogger:
    """A :class:`pipeline.tracking.RunLogger` that records nothing: what ranks other than 0 log to."""

    run_id = None

    def log_params(self, params: dict[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        pass

    def set_tags(self, tags: dict[str, Any]) -> None:
        pass

    def log_artifact(self, path, artifact_path: str | None = None) -> None:
        pass

    def log_dict(self, obj: dict, name: str) -> None:
        pass

    def log_figure(self, figure, name: str) -> None:
        import matplotlib.pyplot as plt

        plt.close(figure)


class NullTracker:
    """A :class:`pipeline.tracking.Tracker` whose runs are :class:`NullRunLogger` s: no store is opened."""

    uri = None

    def logger(self, run_id: str) -> NullRunLogger:
        return NullRunLogger()

    @contextlib.contextmanager
    def run(self, name: str, *, parent=None, tags: dict[str, str] | None = None) -> Iterator[NullRunLogger]:
        yield NullRunLogger()
