"""Data-parallel calibration on ``torch.distributed``: every rank holds the whole model and a share of the rows.

Under ``torchrun`` (or any initialized process group) every rank calls the same ``prune_`` with the same full
calibration. :func:`share` gives each rank a contiguous run of whole batches of it (a row's batch is the same
on every rank count, so each batch's statistics are the same numbers); the methods accumulate their statistics
over their own batches in float64 and :func:`all_sum` adds them over the ranks at each decision, so every rank
decides the same and ends with the same model, whatever the number of ranks (up to float64 rounding). Work
that is the same on every rank is split (:mod:`.sharding`, re-exported here): by output row where rows are
independent (Wanda's selection, SparseGPT's solves: :func:`split_rows_`), each rank's rows sent to the others.

Without a process group every function here is a no-op (``world() == (0, 1)``), so nothing changes.

Failures: :func:`together` runs a block on every rank and raises on all of them when it raised on any (bad input
on one rank); a rank that dies mid-run makes the others' next collective fail (gloo and NCCL report the lost
peer, or the group's ``timeout`` ends the wait), and :func:`collective` turns that into a
:class:`DistributedError` that names the step. :func:`init_from_env` starts the group ``torchrun`` describes
with a timeout (``HF_PRUNING_DIST_TIMEOUT`` seconds, default 600).
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import logging
import os

import torch

from .collectives import (
    _ALONE,
    DEFAULT_TIMEOUT,
    DistributedError,
    active,
    all_sum,
    all_sum_scalar,
    barrier,
    broadcast_,
    collective,
    comm_device,
    gather_objects,
    is_main,
    world,
)
from .sharding import RankSum, check_enough_rows, gather_rows, own_rows, row_shares, shard, share, split_rows_

logger = logging.getLogger(__name__)


def init_from_env(backend: str | None = None) -> bool:
    """Start the process group that ``torchrun`` describes in the environment (``WORLD_SIZE``, ``RANK``,
    ``MASTER_ADDR``...), once; ``backend`` defaults to NCCL when CUDA is available, else gloo. Returns whether
    a group is active afterwards (False for a plain, single-process launch)."""
    if active():
        return True
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:  # not launched by torchrun
        return False
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    timeout = datetime.timedelta(seconds=float(os.environ.get("HF_PRUNING_DIST_TIMEOUT", DEFAULT_TIMEOUT)))
    torch.distributed.init_process_group(backend, timeout=timeout)
    rank, size = world()
    logger.info("rank %d of %d (%s), collectives time out after %s", rank, size, backend, timeout)
    return True


def init_for_cli() -> bool:
    """:func:`init_from_env` for the command line: the group is closed at exit, and every rank but 0 writes
    nothing to standard output. Returns whether this rank must keep quiet (no progress bars, warnings only)."""
    if not init_from_env():
        return False
    import atexit
    import sys

    atexit.register(lambda: torch.distributed.destroy_process_group() if active() else None)
    if is_main():
        return False
    sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - for the life of the process
    return True


@contextlib.contextmanager
def together(what: str):
    """Run the block on every rank; when it raises on some rank, every rank raises (the failing ranks their own
    error, the others a :class:`DistributedError` quoting it), so that no rank goes on to wait for the failed
    one. Put a block whose failure depends on per-rank input (checks of the arguments) inside."""
    error: BaseException | None = None
    try:
        yield
    except Exception as err:  # noqa: BLE001 - re-raised below, after the others have heard of it
        error = err
    if active():
        said = gather_objects(None if error is None else f"{type(error).__name__}: {error}", f"the outcome of {what}")
        failed = [(rank, message) for rank, message in enumerate(said) if message is not None]
        if failed and error is None:
            rank, message = failed[0]
            raise DistributedError(f"rank {rank} failed during {what}: {message}; every rank stops")
    if error is not None:
        raise error


def agree(what: str, value: str, hint: str = "every rank must call prune_ with the same model, config and "
          "calibration (each takes its own share of the rows)") -> None:
    """Every rank must hold the same ``value`` (a fingerprint); otherwise every rank raises, naming ``what``,
    the ranks that differ and ``hint`` (what to do)."""
    said = gather_objects(value, what)
    differ = [rank for rank, other in enumerate(said) if other != said[0]]
    if differ:
        raise DistributedError(f"ranks {differ} hold a different {what} from rank 0; {hint}")


def digest_of(*parts) -> str:
    """A short digest of tensors and strings (for :func:`agree`)."""
    digest = hashlib.sha256()
    for part in parts:
        if isinstance(part, torch.Tensor):
            digest.update(str((tuple(part.shape), part.dtype)).encode())
            digest.update(part.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        else:
            digest.update(str(part).encode())
    return digest.hexdigest()[:16]


def rank_folder(folder):
    """``folder/rank-<r>-of-<n>`` under a process group (each rank checkpoints its own rows), else ``folder``."""
    if folder is None or not active():
        return folder
    rank, size = world()
    return os.path.join(os.fspath(folder), f"rank-{rank}-of-{size}")


def model_sample(model) -> torch.Tensor | None:
    """A few rows of the input embeddings (when in memory): enough to tell apart ranks that loaded different
    weights, without reading the model."""
    weight = model.get_input_embeddings().weight
    return None if weight.device.type == "meta" else weight[:8].detach()


def main_rank_only(what: str):
    """Decorator: under a process group the function runs on rank 0 only (one save, one export, one push) and
    every rank returns when it is done (the others get None), raising on every rank when it failed on rank 0;
    without a group, a plain call."""
    import functools

    def wrap(fn):
        @functools.wraps(fn)
        def run(*args, **kwargs):
            if not active():  # no group, or inside another such function (rank 0 alone is running)
                return fn(*args, **kwargs)
            result = None
            with together(what):
                if is_main():
                    token = _ALONE.set(True)
                    try:
                        result = fn(*args, **kwargs)
                    finally:
                        _ALONE.reset(token)
            return result

        return run

    return wrap


# --- data-parallel training (LoRA recovery): every rank a contiguous share of each batch, gradients averaged ---


def data_parallel(module: torch.nn.Module, params: list[torch.nn.Parameter]) -> torch.nn.Module:
    """``module`` wrapped in ``DistributedDataParallel`` (gradients averaged over the ranks in backward), after
    rank 0's ``params`` (the trainable ones, the only ones DDP syncs) were sent to the others; ``module`` itself
    without a process group. Frozen weights and buffers are not sent: the caller checks that every rank holds the
    same model. The whole model must fit each rank's device (FSDP is not supported)."""
    if not active():
        return module
    device = params[0].device
    if torch.distributed.get_backend() == "nccl" and device.type != "cuda":
        raise ValueError(f"the model is on {device} but the process group uses NCCL: move it to the rank's GPU "
                         "(cuda:LOCAL_RANK) first, or start the group with gloo")
    for k, param in enumerate(params):
        broadcast_(param.data, 0, f"trainable parameter {k}")
    with collective("wrapping the model in DistributedDataParallel"):
        return torch.nn.parallel.DistributedDataParallel(
            module, device_ids=[device.index] if device.type == "cuda" else None, init_sync=False,
            broadcast_buffers=False)


def same_on_every_rank(value: float, what: str = "a number") -> float:
    """Rank 0's ``value`` on every rank (a float64 broadcast); ``value`` without a process group."""
    if not active():
        return value
    return float(broadcast_(torch.tensor([float(value)], dtype=torch.float64), 0, what)[0])


__all__ = [
    "active", "agree", "all_sum", "all_sum_scalar", "barrier", "broadcast_", "check_enough_rows", "collective",
    "comm_device", "data_parallel", "DEFAULT_TIMEOUT", "digest_of", "DistributedError", "gather_objects",
    "gather_rows", "init_for_cli", "init_from_env", "is_main", "main_rank_only", "model_sample", "own_rows",
    "rank_folder", "RankSum", "row_shares", "same_on_every_rank", "shard", "share", "split_rows_", "together",
    "world",
]
