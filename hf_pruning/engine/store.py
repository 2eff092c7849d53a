"""Calibration activations kept off the execution device, one batch on it at a time.

An :class:`ActivationStore` is a list of batches (``[b, T, d]`` tensors) held in CPU memory, or, with a
``folder``, written to files there and read back memory-mapped, so activations larger than RAM stream from disk.
A store in CPU memory spills a batch to disk (a temporary folder, see :func:`spill_reserve`) when keeping it in
RAM would leave the machine less than the reserve of available memory: a search over a 70B model's residual
streams (hundreds of GiB) then runs instead of failing, only slower.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import shutil
import tempfile
import uuid

import torch

logger = logging.getLogger(__name__)

#: where stores created without a folder keep their batches (None: CPU memory), and the folders made there so
#: far; set by :func:`activations_on_disk`
_DEFAULT_FOLDER: contextvars.ContextVar[tuple[str, list] | None] = contextvars.ContextVar("hf_pruning_activations",
                                                                                          default=None)


@contextlib.contextmanager
def activations_on_disk(folder: str | os.PathLike | None):
    """Every :class:`ActivationStore` created without a folder during the block writes its batches under
    ``folder`` (memory-mapped when read back); ``None``: CPU memory, spilling to disk when memory runs short
    (:func:`spill_reserve`). ``prune_(..., activations_dir=...)``. What the stores wrote (or spilled) is removed
    when the block ends, also after an error."""
    if folder is None:
        try:
            yield
        finally:  # batches spilled during the block (after an error, their stores were never closed)
            while _spill_dirs:
                shutil.rmtree(_spill_dirs.pop(), ignore_errors=True)
        return
    made: list[str] = []
    token = _DEFAULT_FOLDER.set((os.fspath(folder), made))
    try:
        yield
    finally:
        _DEFAULT_FOLDER.reset(token)
        for path in made:
            shutil.rmtree(path, ignore_errors=True)


def _store_folder() -> tuple[str, bool] | None:
    """A new folder for a store inside :func:`activations_on_disk` (recorded for removal), else None."""
    default = _DEFAULT_FOLDER.get()
    if default is None:
        return None
    path = tempfile.mkdtemp(prefix="store_", dir=_mkdirs(default[0]))
    default[1].append(path)
    return path, True


#: available memory (bytes) a store in CPU memory leaves the machine: a batch that would go below it is written to
#: disk instead. ``None``: the default, max(2 GiB, 10% of RAM); see :func:`spill_reserve`
_RESERVE: contextvars.ContextVar[int | None] = contextvars.ContextVar("hf_pruning_spill_reserve", default=None)
_spill_dirs: list[str] = []  # the temporary folders spilled batches went to (removed by the last store's close)


def _meminfo(field: str) -> int | None:
    """A ``/proc/meminfo`` field in bytes (None where there is none: not Linux)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


@contextlib.contextmanager
def spill_reserve(nbytes: int | None):
    """Stores in CPU memory created or appended to during the block spill to disk once a batch would leave
    less than ``nbytes`` of the machine's available memory (``MemAvailable``; Linux only, elsewhere nothing
    spills). The default reserve is max(2 GiB, 10% of RAM); ``0`` never spills. The spill folder is the
    system's temporary folder (``TMPDIR``); pass ``activations_dir`` to ``prune_`` to choose the disk yourself."""
    token = _RESERVE.set(nbytes)
    try:
        yield
    finally:
        _RESERVE.reset(token)


def _must_spill(nbytes: int) -> bool:
    available = _meminfo("MemAvailable")
    if available is None:
        return False
    reserve = _RESERVE.get()
    if reserve is None:
        reserve = max(2 * 2**30, (_meminfo("MemTotal") or 0) // 10)
    return available - nbytes < reserve


def _spill_folder() -> str:
    if not _spill_dirs:
        _spill_dirs.append(tempfile.mkdtemp(prefix="hf_pruning_spill_"))
        logger.warning("Calibration activations do not fit in the available memory: the rest goes to %s (pass "
                       "activations_dir= to prune_ to put them on a disk of your choice).", _spill_dirs[0])
    return _spill_dirs[0]


def _mkdirs(folder: str) -> str:
    os.makedirs(folder, exist_ok=True)
    return folder


class ActivationStore:
    """Batches of activations on CPU (``folder=None``) or on disk (``folder``: a directory of ours, or ``True``
    for a temporary one, removed by :meth:`close`). ``store[i]`` is batch ``i`` on the CPU (memory-mapped from
    disk when on disk); :meth:`get` brings it to a device."""

    def __init__(self, folder: str | bool | None = None, dtype: torch.dtype | None = None):
        default = _store_folder() if folder is None else None  # inside activations_on_disk(...)
        folder, owned = default if default else (folder, folder is True)
        self.dtype = dtype
        self._batches: list = []
        self._name = uuid.uuid4().hex[:12]
        self._own = owned
        self.folder = tempfile.mkdtemp(prefix="hf_pruning_store_") if folder is True else folder
        if self.folder:
            os.makedirs(self.folder, exist_ok=True)

    def append(self, batch: torch.Tensor) -> None:
        """Keep ``batch`` (any device; stored detached on the CPU or on disk, in ``dtype`` when one is set)."""
        batch = batch.detach().to("cpu", self.dtype or batch.dtype)
        folder = self.folder or (_spill_folder() if _must_spill(batch.numel() * batch.element_size()) else None)
        if folder:
            path = os.path.join(folder, f"{self._name}_{len(self._batches)}.pt")
            torch.save(batch.contiguous().clone(), path)
            self._batches.append(path)
        else:
            self._batches.append(batch.clone())

    def __len__(self) -> int:
        return len(self._batches)

    def __getitem__(self, i: int) -> torch.Tensor:
        item = self._batches[i]
        return torch.load(item, mmap=True, weights_only=True) if isinstance(item, str) else item

    def __setitem__(self, i: int, batch: torch.Tensor) -> None:
        batch = batch.detach().to("cpu", self.dtype or batch.dtype)
        old = self._batches[i]
        if isinstance(old, str):  # on disk (the store's folder, or spilled): a new file, then the old one unlinked;
            # rewriting the old file in place would truncate pages a memory-mapped read may still use (SIGBUS)
            path = os.path.join(os.path.dirname(old), f"{self._name}_{i}_{uuid.uuid4().hex[:8]}.pt")
            torch.save(batch.contiguous().clone(), path)
            self._batches[i] = path
            os.remove(old)
        else:
            self._batches[i] = batch.clone()

    def get(self, i: int, device) -> torch.Tensor:
        """Batch ``i`` on ``device``."""
        return self[i].to(device)

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def rows(self) -> int:
        """Calibration rows held (the sum of the batch sizes)."""
        return sum(self[i].shape[0] for i in range(len(self)))

    def nbytes(self) -> int:
        return sum(self[i].numel() * self[i].element_size() for i in range(len(self)))

    def like(self) -> ActivationStore:
        """An empty store of the same kind: CPU; or disk, in the same folder when it is the caller's (file names
        are unique per store), else in a temporary folder of its own beside this one's (each removed by its
        own :meth:`close`)."""
        if not self.folder or not self._own:
            return ActivationStore(self.folder or None, self.dtype)
        other = ActivationStore(tempfile.mkdtemp(prefix="store_", dir=os.path.dirname(self.folder)), self.dtype)
        other._own = True
        return other

    def close(self) -> None:
        """Drop the batches (and their files)."""
        for item in self._batches:
            if isinstance(item, str) and os.path.exists(item):
                os.remove(item)
        self._batches = []
        if self._own and self.folder and os.path.isdir(self.folder):
            shutil.rmtree(self.folder, ignore_errors=True)
        if _spill_dirs and not os.listdir(_spill_dirs[0]):  # every spilled batch is gone
            shutil.rmtree(_spill_dirs.pop(), ignore_errors=True)
