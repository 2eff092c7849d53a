"""Data-parallel calibration on ``torch.distributed``: every rank holds the whole model and a share of the rows.

Under ``torchrun`` (or any initialized process group) every rank calls the same ``prune_`` with the same full
calibration. :func:`share` gives each rank a contiguous run of whole batches of it (a row's batch is the same
on every rank count, so each batch's statistics are the same numbers); the methods accumulate their statistics
over their own batches in float64 and :func:`all_sum` adds them over the ranks at each decision, so every rank
decides the same and ends with the same model, whatever the number of ranks (up to float64 rounding). Work
that cannot be split by rows (a SparseGPT solve) is split by item: :func:`owner` names the rank that computes
item ``k`` and :func:`broadcast_` hands its result to the others.

Without a process group every function here is a no-op (``world() == (0, 1)``), so nothing changes.

Failures: :func:`together` runs a block on every rank and raises on all of them when it raised on any (bad input
on one rank); a rank that dies mid-run makes the others' next collective fail (gloo and NCCL report the lost
peer, or the group's ``timeout`` ends the wait), and :func:`collective` turns that into a
:class:`DistributedError` that names the step. :func:`init_from_env` starts the group ``torchrun`` describes
with a timeout (``HF_PRUNING_DIST_TIMEOUT`` seconds, default 600).
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime
import hashlib
import logging
import os

import torch

logger = logging.getLogger(__name__)

#: seconds a collective waits for the other ranks before the group gives up (``init_from_env``)
DEFAULT_TIMEOUT = 600


class DistributedError(RuntimeError):
    """Another rank failed, disagreed or stopped answering; every rank raises it rather than waiting."""


def active() -> bool:
    """Whether a ``torch.distributed`` process group is initialized (even of one rank)."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def world() -> tuple[int, int]:
    """``(rank, world size)``; ``(0, 1)`` without a process group."""
    if not active():
        return 0, 1
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


def is_main() -> bool:
    """Rank 0, or no process group: the process that saves, exports and prints."""
    return world()[0] == 0


def owner(k: int) -> int:
    """The rank that computes item ``k`` of a list split by item (round robin)."""
    return k % world()[1]


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


def _comm_device() -> torch.device:
    """Where the backend wants tensors: CUDA for NCCL, the CPU otherwise."""
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


@contextlib.contextmanager
def collective(what: str):
    """A collective step named ``what``: a failure of the backend (a rank that died, a timeout) becomes a
    :class:`DistributedError` that says so."""
    try:
        yield
    except DistributedError:
        raise
    except (RuntimeError, torch.distributed.DistBackendError) as err:
        rank, size = world()
        raise DistributedError(
            f"rank {rank} of {size}: {what} failed because another rank stopped answering ({err}). Another rank "
            "failed or was killed: its own log names the cause; every rank stops here"
        ) from err


def all_sum(tensor: torch.Tensor, what: str = "a statistic") -> torch.Tensor:
    """The sum of ``tensor`` over the ranks, as a new float64 (float tensors) or int64 tensor on ``tensor``'s
    device; without a process group, ``tensor`` in that dtype."""
    dtype = torch.float64 if tensor.is_floating_point() else torch.int64
    if not active():
        return tensor.to(dtype, copy=True)
    buffer = tensor.detach().to(_comm_device(), dtype, copy=True)
    with collective(f"summing {what} over the ranks"):
        torch.distributed.all_reduce(buffer)
    return buffer.to(tensor.device)


def all_sum_scalar(value: float, what: str = "a score") -> float:
    """A Python number summed over the ranks (float64)."""
    return float(all_sum(torch.tensor([float(value)], dtype=torch.float64), what)[0])


def broadcast_(tensor: torch.Tensor, src: int, what: str = "a result") -> torch.Tensor:
    """``tensor`` (same shape and dtype on every rank) overwritten, in place, with rank ``src``'s; returned."""
    if not active():
        return tensor
    buffer = tensor.detach().to(_comm_device(), copy=True) if tensor.device != _comm_device() else tensor.detach()
    with collective(f"sending {what} from rank {src}"):
        torch.distributed.broadcast(buffer, src)
    if buffer is not tensor:
        tensor.copy_(buffer)
    return tensor


def gather_objects(value, what: str = "a value") -> list:
    """Every rank's ``value`` (picklable), in rank order; ``[value]`` without a process group."""
    if not active():
        return [value]
    out: list = [None] * world()[1]
    with collective(f"gathering {what}"):
        torch.distributed.all_gather_object(out, value)
    return out


def barrier(what: str = "the other ranks") -> None:
    if active():
        with collective(f"waiting for {what}"):
            torch.distributed.barrier()


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


def agree(what: str, value: str) -> None:
    """Every rank must hold the same ``value`` (a fingerprint); otherwise every rank raises, naming ``what``
    and the ranks that differ."""
    said = gather_objects(value, what)
    differ = [rank for rank, other in enumerate(said) if other != said[0]]
    if differ:
        raise DistributedError(f"ranks {differ} hold a different {what} from rank 0; every rank must call prune_ with "
                               "the same model, config and calibration (each takes its own share of the rows)")


def fingerprint(*parts) -> str:
    """A short digest of tensors and strings (for :func:`agree`)."""
    digest = hashlib.sha256()
    for part in parts:
        if isinstance(part, torch.Tensor):
            digest.update(str((tuple(part.shape), part.dtype)).encode())
            digest.update(part.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        else:
            digest.update(str(part).encode())
    return digest.hexdigest()[:16]


def share(rows: int, batch: int) -> slice:
    """This rank's rows of ``rows`` calibration rows: a contiguous run of whole ``batch``-row batches, the
    batches dealt as evenly as they go (a rank may get none when there are fewer batches than ranks)."""
    rank, size = world()
    batches = -(-rows // batch)
    first = rank * batches // size
    last = (rank + 1) * batches // size
    return slice(min(first * batch, rows), min(last * batch, rows))


def shard(calibration: torch.Tensor | None, batch: int) -> torch.Tensor | None:
    """``calibration[share(...)]``: this rank's rows (all of them without a process group)."""
    if calibration is None or not active():
        return calibration
    return calibration[share(calibration.shape[0], batch)]


def check_enough_rows(rows: int, batch: int) -> None:
    """Refuse a calibration with fewer batches than ranks (a rank would have no rows)."""
    size = world()[1]
    if -(-rows // batch) < size:
        raise ValueError(f"{rows} calibration rows make {-(-rows // batch)} batch(es) of {batch}, fewer than the "
                         f"{size} ranks: give at least {size * batch} rows, or launch fewer processes")


class RankSum:
    """A sum of per-batch float32 parts kept in float64, then summed over the ranks by :meth:`reduced`: the same
    number on every rank count (up to float64 rounding), as each batch's part is the same computation."""

    def __init__(self, shape, device=None):
        self.shape, self.device = torch.Size([shape] if isinstance(shape, int) else shape), device
        self.total: torch.Tensor | None = None  # made by the first part (a d x d sum is large)
        self.count = 0
        self.done = False  # summed over the ranks already

    def add(self, part: torch.Tensor, count: int = 0) -> None:
        if self.total is None:
            self.total = part.to(torch.float64, copy=True)
        else:
            self.total.add_(part)  # float32 into float64, no temporary
        self.count += count

    def reduced(self, what: str = "a statistic") -> tuple[torch.Tensor, int]:
        """``(sum over every batch of every rank [float64], count)``; the sum is this object's own tensor,
        summed in place, once (a later call returns the same)."""
        if self.total is None:
            self.total = torch.zeros(self.shape, dtype=torch.float64, device=self.device)
        if not active() or self.done:
            return self.total, self.count
        with collective(f"summing {what} over the ranks"):
            if self.total.device == _comm_device():
                torch.distributed.all_reduce(self.total)
            else:
                self.total = self.total.to(_comm_device())
                torch.distributed.all_reduce(self.total)
                self.total = self.total.to(self.device)
        self.count, self.done = int(all_sum(torch.tensor([self.count]), what)[0]), True
        return self.total, self.count


def owners_by_cost(costs: list[float]) -> list[int]:
    """Rank per item for work split by item: the costliest first, each to the least loaded rank so far."""
    size = world()[1]
    load, out = [0.0] * size, [0] * len(costs)
    for k in sorted(range(len(costs)), key=lambda k: -costs[k]):
        out[k] = min(range(size), key=lambda r: (load[r], r))
        load[out[k]] += costs[k]
    return out


def split_by_module_(modules: dict, compute, names: tuple[str, ...] = ("weight",)) -> None:
    """``compute(name, module)`` (it edits the module's ``names`` tensors through ``write_param``) runs on one rank
    per module (:func:`owners_by_cost`, cost = the weight's size); then each owner sends the edited tensors to the
    others, who write them into their copy. Without a process group every module is computed here."""
    from .offload import write_param

    items = list(modules.values())
    if not active():
        for name, module in modules.items():
            compute(name, module)
        return
    ranks = owners_by_cost([float(m.weight.numel()) for m in items])
    rank = world()[0]
    for (name, module), src in zip(modules.items(), ranks):
        if src == rank:
            compute(name, module)
    for (name, module), src in zip(modules.items(), ranks):
        for attr in names:
            tensor = getattr(module, attr)
            buffer = tensor.detach().clone() if src == rank else torch.empty_like(tensor)
            broadcast_(buffer, src, f"{name}.{attr}")
            if src != rank:
                write_param(module, attr, buffer)


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


#: set while rank 0 runs a :func:`main_rank_only` function alone (the calls it makes run plainly)
_ALONE: contextvars.ContextVar[bool] = contextvars.ContextVar("hf_pruning_rank0_alone", default=False)


def main_rank_only(what: str):
    """Decorator: under a process group the function runs on rank 0 only (one save, one export, one push) and
    every rank returns when it is done (the others get None), raising on every rank when it failed on rank 0;
    without a group, a plain call."""
    import functools

    def wrap(fn):
        @functools.wraps(fn)
        def run(*args, **kwargs):
            if not active() or _ALONE.get():  # no group, or inside another one (rank 0 alone is running)
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


def batch_share(rows: int) -> slice:
    """This rank's rows of a training batch of ``rows`` rows: a contiguous run, the sizes as even as they go
    (they differ by at most one; a rank gets none when ``rows`` is under the world size). All rows without a group."""
    rank, size = world()
    return slice(rank * rows // size, (rank + 1) * rows // size)


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


def check_same(what: str, value: str, hint: str) -> None:
    """Every rank must hold the same ``value`` (a :func:`fingerprint`); otherwise every rank raises a
    :class:`DistributedError` naming ``what`` and the ranks that differ, followed by ``hint`` (what to do)."""
    if not active():
        return
    said = gather_objects(value, what)
    differ = [rank for rank, other in enumerate(said) if other != said[0]]
    if differ:
        raise DistributedError(f"ranks {differ} hold a different {what} from rank 0; {hint}")


def row_shares(rows: int) -> list[slice]:
    """Every rank's contiguous rows of a ``rows``-row matrix, as even as they go (rank order)."""
    size = world()[1]
    return [slice(r * rows // size, (r + 1) * rows // size) for r in range(size)]


def gather_rows(part: torch.Tensor, rows: int, what: str = "rows") -> torch.Tensor:
    """The ranks' parts (rank r holds rows ``row_shares(rows)[r]`` of a ``[rows, ...]`` tensor) put together on
    every rank; without a process group, ``part``."""
    if not active():
        return part
    shares = row_shares(rows)
    longest = max(s.stop - s.start for s in shares)
    device, dtype = _comm_device(), torch.uint8 if part.dtype == torch.bool else part.dtype
    padded = torch.zeros((longest, *part.shape[1:]), dtype=dtype, device=device)
    padded[: part.shape[0]] = part.to(device, dtype)
    pieces = [torch.empty_like(padded) for _ in shares]
    with collective(f"gathering {what}"):
        torch.distributed.all_gather(pieces, padded)
    return torch.cat([p[: s.stop - s.start] for p, s in zip(pieces, shares)]).to(part.device, part.dtype)


def split_rows_(modules: dict, compute, attr: str = "weight") -> None:
    """For work whose output rows are independent (a per-row mask, a row-wise solve): ``compute(name, module,
    rows)`` returns the new rows ``rows`` (a slice) of ``module.<attr>``; each rank computes its share of every
    module's rows (:func:`row_shares`), the shares are gathered and written (``write_param``) on every rank.
    Without a process group, each module's rows are computed whole here."""
    from .offload import write_param

    for name, module in modules.items():
        rows = getattr(module, attr).shape[0]
        mine = row_shares(rows)[world()[0]] if active() else slice(0, rows)
        new = gather_rows(compute(name, module, mine), rows, f"{name}.{attr}")
        write_param(module, attr, new)
