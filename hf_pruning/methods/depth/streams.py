"""Small pieces of the layer runner's stored residual streams: which layers keep their inputs, a copy of a store,
and a per-row view of one layer's inputs."""

from __future__ import annotations

import math

import torch

from ...engine import ActivationStore, execution_device


def stored_layers(n_layers: int, keep_every: int | str = 1) -> frozenset[int]:
    """The layers whose inputs a runner keeps: every ``keep_every``-th from layer 0 (``"sqrt"``: about
    sqrt(L) apart, the checkpoint spacing that balances stored layers against recomputed ones), and ``L``
    (the final hidden states), always."""
    if keep_every == "sqrt":
        keep_every = max(1, round(math.sqrt(n_layers)))
    if isinstance(keep_every, bool) or not isinstance(keep_every, int) or keep_every < 1:
        raise ValueError(f"keep_every must be a positive integer or 'sqrt', got {keep_every!r}")
    return frozenset(range(0, n_layers, keep_every)) | {n_layers}


def copy_store(store: ActivationStore) -> ActivationStore:
    """A new store of the same kind (CPU, or disk in the same folder) holding the same batches."""
    copy = store.like()
    for batch in store:
        copy.append(batch)
    return copy


class RowsView:
    """The inputs of one layer, row by row: ``view[s]`` is row ``s`` as ``[1, T, d]`` on the layer's execution
    device, read from the runner's store (recomputed once from the closest kept layer when not kept)."""

    def __init__(self, runner, idx: int):
        self.runner, self.idx = runner, idx
        self._store: ActivationStore | None = None

    def _batches(self) -> ActivationStore:
        if self._store is None:
            self._store = self.runner.inputs(self.idx)
        return self._store

    def __len__(self) -> int:
        return self.runner.n

    def __getitem__(self, s: int) -> torch.Tensor:
        if not 0 <= s < self.runner.n:
            raise IndexError(s)
        batch, row = divmod(s, self.runner.batch)
        device = execution_device(self.runner.layers[min(self.idx, len(self.runner.layers) - 1)])
        return self._batches()[batch][row : row + 1].to(device)

    def __iter__(self):
        return (self[s] for s in range(len(self)))
