"""The collectives of data-parallel runs (:mod:`.distributed` re-exports them): who this rank is, sums and
broadcasts over the ranks, and the step names that a lost rank's error reports. Each is a plain local
computation without a process group (or while rank 0 runs a ``main_rank_only`` function alone)."""

from __future__ import annotations

import contextlib
import contextvars

import torch

#: seconds a collective waits for the other ranks before the group gives up (``init_from_env``)
DEFAULT_TIMEOUT = 600
#: set while rank 0 runs a :func:`main_rank_only` function alone (the calls it makes run plainly)
_ALONE: contextvars.ContextVar[bool] = contextvars.ContextVar("hf_pruning_rank0_alone", default=False)


class DistributedError(RuntimeError):
    """Another rank failed, disagreed or stopped answering; every rank raises it rather than waiting."""


def active() -> bool:
    """Whether a ``torch.distributed`` process group is initialized (even of one rank), and this process is not
    running a :func:`main_rank_only` function alone (inside one, everything is local: no collective)."""
    return torch.distributed.is_available() and torch.distributed.is_initialized() and not _ALONE.get()


def world() -> tuple[int, int]:
    """``(rank, world size)``; ``(0, 1)`` without a process group."""
    if not active():
        return 0, 1
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


def is_main() -> bool:
    """Rank 0, or no process group: the process that saves, exports and prints."""
    return world()[0] == 0


def comm_device() -> torch.device:
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
    buffer = tensor.detach().to(comm_device(), dtype, copy=True)
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
    buffer = tensor.detach().to(comm_device(), copy=True) if tensor.device != comm_device() else tensor.detach()
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
