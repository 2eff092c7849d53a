"""Cost of pruning: wall time, "passes" (time / one forward over the same calibration tokens), peak RSS."""

from __future__ import annotations

import threading
import time

import torch

from ..accounting import parameter_count


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


class PeakRSS:
    """Context manager sampling this process's resident memory every ``interval`` seconds; ``.peak`` in bytes."""

    def __init__(self, interval: float = 0.02):
        self.interval = interval
        self.start = self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss())
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakRSS:
        self.start = self.peak = _rss()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak = max(self.peak, _rss())


def model_bytes_fp32(model) -> int:
    return parameter_count(model) * 4


def synchronize(model) -> None:
    """Wait for the model's accelerator (if any) so wall times include its queued work."""
    device = next(model.parameters()).device
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def forward_seconds(model, calibration: torch.Tensor, batch_size: int = 4) -> float:
    """Wall time of one forward pass over all calibration tokens ``[n, L]`` (the unit of "passes")."""
    model.eval()
    device = next(model.parameters()).device
    synchronize(model)
    start = time.perf_counter()
    for i in range(0, calibration.shape[0], batch_size):
        model(calibration[i : i + batch_size].to(device), use_cache=False)
    synchronize(model)
    return time.perf_counter() - start


def measure_pruning(prune_fn, model, calibration: torch.Tensor | None) -> dict:
    """Run ``prune_fn()`` and report its wall time, passes and peak memory.

    The forward used as the unit is measured on ``model`` before pruning, in this process.
    """
    unit = forward_seconds(model, calibration) if calibration is not None else None
    size = model_bytes_fp32(model)
    with PeakRSS() as mem:
        start = time.perf_counter()
        prune_fn()
        synchronize(model)
        prune_s = time.perf_counter() - start
    return {
        "prune_s": prune_s,
        "forward_s": unit,
        "passes": prune_s / unit if unit else None,
        "peak_rss_mb": mem.peak / 2**20,
        "peak_rss_delta_mb": (mem.peak - mem.start) / 2**20,
        # the pruning working set on top of the model, as a multiple of the model's fp32 size: the process
        # also holds the interpreter, torch and (in the benchmark runner) other models, which this excludes
        "peak_rss_ratio": (size + mem.peak - mem.start) / size,
        "model_mb": size / 2**20,
    }
