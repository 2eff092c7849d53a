"""Calibration activations kept off the execution device, one batch on it at a time.

An :class:`ActivationStore` is a list of batches (``[b, T, d]`` tensors) held in CPU memory, or, with a
``folder``, written to files there and read back memory-mapped, so activations larger than RAM stream from disk.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import shutil
import tempfile
import uuid

import torch

#: where stores created without a folder keep their batches (None: CPU memory), and the folders made there so
#: far; set by :func:`activations_on_disk`
_DEFAULT_FOLDER: contextvars.ContextVar[tuple[str, list] | None] = contextvars.ContextVar("hf_pruning_activations",
                                                                                          default=None)


@contextlib.contextmanager
def activations_on_disk(folder: str | os.PathLike | None):
    """Every :class:`ActivationStore` created without a folder during the block writes its batches under
    ``folder`` (memory-mapped when read back); ``None`` changes nothing. ``prune_(..., activations_dir=...)``.
    What the stores wrote is removed when the block ends, also after an error."""
    if folder is None:
        yield
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
        if self.folder:
            path = os.path.join(self.folder, f"{self._name}_{len(self._batches)}.pt")
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
        if self.folder:
            torch.save(batch.contiguous().clone(), self._batches[i])
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
