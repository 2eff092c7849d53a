"""How data-parallel work is split over the ranks (:mod:`.distributed` re-exports all of it, so the methods use
one name): calibration shares of whole batches (:func:`share`, :func:`shard`), float64 sums of per-batch parts
(:class:`RankSum`), work split by output row (:func:`split_rows_`, :func:`gather_rows`). Without a process group
every function is a plain local computation.
"""

from __future__ import annotations

import torch

from . import collectives as comm


def share(rows: int, batch: int) -> slice:
    """This rank's rows of ``rows`` calibration rows: a contiguous run of whole ``batch``-row batches, the
    batches dealt as evenly as they go (a rank may get none when there are fewer batches than ranks)."""
    batches = own_rows(-(-rows // batch))  # this rank's batches
    return slice(min(batches.start * batch, rows), min(batches.stop * batch, rows))


def shard(calibration: torch.Tensor | None, batch: int) -> torch.Tensor | None:
    """``calibration[share(...)]``: this rank's rows (all of them without a process group)."""
    if calibration is None or not comm.active():
        return calibration
    return calibration[share(calibration.shape[0], batch)]


def check_enough_rows(rows: int, batch: int) -> None:
    """Refuse a calibration with fewer batches than ranks (a rank would have no rows)."""
    size = comm.world()[1]
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
        if not comm.active() or self.done:
            return self.total, self.count
        with comm.collective(f"summing {what} over the ranks"):
            if self.total.device == comm.comm_device():
                torch.distributed.all_reduce(self.total)
            else:
                self.total = self.total.to(comm.comm_device())
                torch.distributed.all_reduce(self.total)
                self.total = self.total.to(self.device)
        self.count, self.done = int(comm.all_sum(torch.tensor([self.count]), what)[0]), True
        return self.total, self.count


def row_shares(rows: int) -> list[slice]:
    """Every rank's contiguous rows of a ``rows``-row matrix, as even as they go (rank order)."""
    size = comm.world()[1]
    return [slice(r * rows // size, (r + 1) * rows // size) for r in range(size)]


def own_rows(rows: int) -> slice:
    """This rank's rows of ``rows`` (:func:`row_shares`; all of them without a process group)."""
    return row_shares(rows)[comm.world()[0]]


def gather_rows(part: torch.Tensor, rows: int, what: str = "rows") -> torch.Tensor:
    """The ranks' parts (rank r holds rows ``row_shares(rows)[r]`` of a ``[rows, ...]`` tensor) put together on
    every rank; without a process group, ``part``."""
    if not comm.active():
        return part
    shares = row_shares(rows)
    longest = max(s.stop - s.start for s in shares)
    device, dtype = comm.comm_device(), torch.uint8 if part.dtype == torch.bool else part.dtype
    padded = torch.zeros((longest, *part.shape[1:]), dtype=dtype, device=device)
    padded[: part.shape[0]] = part.to(device, dtype)
    pieces = [torch.empty_like(padded) for _ in shares]
    with comm.collective(f"gathering {what}"):
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
        new = gather_rows(compute(name, module, own_rows(rows)), rows, f"{name}.{attr}")
        write_param(module, attr, new)
