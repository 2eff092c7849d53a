"""Data-parallel helpers of the depth methods (``engine.distributed``): each rank holds a contiguous share of the
calibration rows; these turn this rank's counts into those of every rank's rows. Without a process group each is
the identity (this process has every row).
"""

from __future__ import annotations

from ...engine import distributed


def total_count(value: int, what: str = "a count") -> int:
    """``value`` (this rank's rows or tokens) summed over the ranks."""
    if not distributed.active():
        return int(value)
    return int(round(distributed.all_sum_scalar(float(value), what)))


def row_offset(rows: int) -> tuple[int, int]:
    """``(first, total)``: the global index of this rank's first row (ranks hold consecutive runs of rows, in
    rank order) and the rows of every rank together."""
    if not distributed.active():
        return 0, rows
    counts = distributed.gather_objects(int(rows), "the ranks' row counts")
    return sum(counts[: distributed.world()[0]]), sum(counts)
