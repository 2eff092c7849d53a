"""The depth methods' layer runner: the model run layer by layer on calibration rows with candidates removed.

:class:`DepthRunner` uses the very drop operations of the plan (``drop_attention_in_`` / ``drop_mlp_in_``) applied for
the duration of one call, so what a search scores is exactly what the saved model computes. It keeps the residual
stream at the input of every layer for the current removal set in engine :class:`ActivationStore`\\ s (on the
CPU, or on disk with ``store_folder``; batches of ``LAYER_BATCH`` rows), or, with ``keep_every=k``, only every
k-th layer's inputs (and the final hidden states), recomputing the layers in between when they are needed.

Candidates are scored *layer-major per chunk of rows* (:meth:`DepthRunner.candidate_finals`): for one chunk,
each layer is onloaded once (``engine.onloaded``) and every candidate that needs it runs through it; a
candidate in layer ``l`` starts from the stored stream at ``l``. Work is counted in *layer-forwards*: one decoder
layer over the whole calibration set (a call on a fraction of the rows or tokens counts that fraction), and in
*head-forwards* likewise. :func:`skipping` and :func:`head_logits` serve full-model forwards (and backwards) with
layers passed through.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch

from ...engine import (
    LAYER_BATCH,
    ActivationStore,
    capture,
    capture_layer_inputs,
    execution_device,
    head_forward,
    onload_bound,
    onloaded,
    pass_through,
    substituted,
)
from ...engine.offload import onloaded_except
from ...remote.hf_pruning_surgery import adapter_for, inspect_model
from .candidates import Candidate
from .streams import RowsView, copy_store, stored_layers

__all__ = ["LAYER_BATCH", "Chunk", "DepthRunner", "head_logits", "layers_return_tuple", "skipping"]


@contextlib.contextmanager
def skipping(model, skip, tuple_out: bool):
    """Layers ``skip`` pass their input through (as ``remove_layers`` would) for the duration; full-model
    forwards and backwards then see the model with those blocks removed. ``tuple_out``: what layers return.
    The layers are stand-in entries of the decoder's list: the real layers (and any hooks on them) are untouched."""
    layers = adapter_for(model).decoder_layers(model)
    with substituted(layers, pass_through(layers, skip, tuple_out)):
        yield model


def layers_return_tuple(model, ids: torch.Tensor) -> bool:
    """Whether this model's decoder layers return a tuple (older transformers) or a tensor; one short forward."""
    inputs, kwargs = capture_layer_inputs(model, ids[:1, :8])
    with torch.no_grad():
        return isinstance(adapter_for(model).decoder_layers(model)[0](inputs[0], **kwargs[0]), tuple)


@torch.no_grad()
def head_logits(model, layers, ids: torch.Tensor, final_hidden: torch.Tensor, tuple_out: bool) -> torch.Tensor:
    """The model's logits ``[T, V]`` (float32) for token ids ``[T]`` given the last layer's output ``[1, T, d]``
    (the model's own final norm, output projection, LM head and soft-capping; see ``engine.head_forward``)."""
    return head_forward(model, ids[None], final_hidden, tuple_out)[0]


@dataclass(frozen=True)
class Chunk:
    """Calibration rows scored together: rows ``start:stop`` of store batch ``batch`` (global rows ``rows``)."""

    batch: int
    start: int
    stop: int
    first_row: int

    @property
    def rows(self) -> range:
        return range(self.first_row, self.first_row + self.stop - self.start)

    def of(self, batch: torch.Tensor) -> torch.Tensor:
        """This chunk's rows of a stored batch ``[B, T, d]`` -> ``[b, T, d]``."""
        return batch[self.start : self.stop]


@contextlib.contextmanager
def dropped_sublayers(adapter, layer, state, parts: set[str], hidden: int):
    """``layer`` with ``parts`` ("attention", "mlp") dropped by the adapter's own drop ops for the duration (a
    sublayer its ``state`` says the model no longer has is not dropped again); its modules restored afterwards."""
    if not parts:
        yield layer
        return
    saved = dict(layer._modules)
    try:
        if "attention" in parts and state.attention != "none":
            adapter.drop_attention_in_(layer)
        if "mlp" in parts and state.mlp != "none":
            adapter.drop_mlp_in_(layer, hidden)
        yield layer
    finally:
        layer._modules.clear()
        layer._modules.update(saved)


class DepthRunner:
    """Runs decoder layers on calibration rows with candidates removed; keeps the residual stream in stores.

    ``calibration``: LongTensor ``[n_samples, seq_len]``. ``token_weight`` scales the work counters (a runner on
    a subset of the tokens of the main calibration counts its share of a full layer-forward). ``removed``:
    candidates removed from the start. ``store_folder``: keep the streams on disk there (``True``: a temporary
    folder), else on the CPU. ``keep_every``: keep the inputs of every k-th layer only (``"sqrt"``: k about
    sqrt(L)) and recompute in between. ``chunk_rows``: rows scored together (default: 1 when the layers run on the
    CPU, in memory or offloaded; the store's batch when offloaded weights run on an accelerator,
    :func:`~hf_pruning.engine.onload_bound`: each chunk onloads every layer once). Scores and orders do not
    depend on it; the work does (finer chunks let the branch and bound cut more: SmolLM2 SLEB, 4 x 128 tokens,
    1413 against 1860 row-layers).
    """

    def __init__(self, model, calibration: torch.Tensor, token_weight: float = 1.0, removed: tuple = (),
                 prefix_from: DepthRunner | None = None, store_folder: str | bool | None = None,
                 keep_every: int | str = 1, chunk_rows: int | None = None):
        """``prefix_from``: a runner on the same rows with nothing removed; its stored stream up to the first
        removed layer is this runner's too, so only the layers from there on are run."""
        self.model = model
        self.adapter = adapter_for(model)
        self.layers = self.adapter.decoder_layers(model)
        self.hidden = self.adapter.hidden_size(model.config)
        self.states = inspect_model(model)  # a LayerState per layer: which sublayers the model still has
        self.ids = calibration
        self.n = calibration.shape[0]
        self.token_weight = token_weight
        self.removed: dict[int, set[str]] = {}
        for c in removed:  # start from these removals: the first pass is already the pruned one
            self.removed.setdefault(c.layer, set()).add(c.kind)
        self.layer_forwards = 0.0
        self.head_forwards = 0.0
        self._tuple_out = None
        self._stale: int | None = None  # the lowest layer changed since the stores were refreshed
        self._recomputed: dict[int, ActivationStore] = {}  # inputs of layers between kept ones, once asked for
        self.batch = LAYER_BATCH
        if prefix_from is not None:
            if prefix_from.removed or prefix_from.ids is not calibration:
                raise ValueError("prefix_from must be a runner on the same calibration rows with nothing removed")
            self.folder, self.stored, self.batch = prefix_from.folder, prefix_from.stored, prefix_from.batch
            self.kwargs, self._tuple_out, self.chunk_rows = prefix_from.kwargs, prefix_from._tuple_out, prefix_from.chunk_rows
            first = min(self.removed, default=len(self.layers))
            # stores[l]: inputs of layer l under the current removal set (stores[L]: the final hidden states);
            # shared with prefix_from below the first removal (a refresh replaces stores, it never writes into one)
            self.stores = {i: s for i, s in prefix_from.stores.items() if i <= first}
            self._own: list[ActivationStore] = []  # the stores this runner made (and frees)
            self.refresh(first)
            return
        self.folder = store_folder
        self.stored = stored_layers(len(self.layers), keep_every)
        rows = chunk_rows if chunk_rows is not None else (self.batch if onload_bound(model) else 1)
        self.chunk_rows = max(1, min(int(rows), self.batch))
        first_store = ActivationStore(self.folder)
        _, self.kwargs = capture(model, calibration, self.batch, first_store)
        self.stores = {0: first_store}
        self._own = [first_store]
        self.refresh(0)

    # ----- removal ---------------------------------------------------------------------------------------
    def remove(self, candidate: Candidate, refresh: bool = True) -> None:
        """Make ``candidate``'s removal permanent for this runner. ``refresh``: the stored residual stream is
        brought up to date when it is next read (so a search's last removal costs no pass); a naive search,
        which always runs from layer 0, passes False: only the layer-0 inputs are used then."""
        self.removed.setdefault(candidate.layer, set()).add(candidate.kind)
        if refresh:
            self._stale = candidate.layer if self._stale is None else min(self._stale, candidate.layer)

    def _sync(self) -> None:
        """Refresh the stores after the removals made since the last read."""
        if self._stale is not None:
            self.refresh(self._stale)

    def dropped(self, idx: int, parts: set[str]):
        """Layer ``idx`` with ``parts`` ("attention", "mlp") dropped through the adapter's own drop ops; restored
        afterwards. (A removed "block" never gets here: the layer is skipped, as ``remove_layers`` does.)"""
        return dropped_sublayers(self.adapter, self.layers[idx], self.states[idx], parts, self.hidden)

    def parts(self, idx: int, extra: Candidate | None = None) -> set[str]:
        """What layer ``idx`` runs without: the current removals there, plus ``extra`` when it is in that layer."""
        parts = set(self.removed.get(idx, ()))
        if extra is not None and extra.layer == idx:
            parts.add(extra.kind)
        return parts

    # ----- running ---------------------------------------------------------------------------------------
    def _layer(self, idx: int, hidden: torch.Tensor, parts: set[str]) -> torch.Tensor:
        """One decoder layer with ``parts`` removed (``"block"``: the layer is skipped, costing nothing) on
        ``hidden`` ``[b, T, d]`` (``b`` calibration rows)."""
        if "block" in parts:
            return hidden
        with self.dropped(idx, parts) as layer:
            out = layer(hidden, **self.kwargs[idx])
        if self._tuple_out is None:
            self._tuple_out = isinstance(out, tuple)
        self.layer_forwards += self.token_weight * hidden.shape[0] / self.n
        return out[0] if isinstance(out, tuple) else out

    def _device(self, idx: int) -> torch.device:
        return execution_device(self.layers[min(idx, len(self.layers) - 1)])

    def _checkpoint(self, idx: int) -> int:
        """The highest stored layer at or below ``idx``."""
        return max(i for i in self.stores if i <= idx)

    def _in_use(self, store: ActivationStore) -> bool:
        return any(s is store for s in self.stores.values())

    def _drop(self, store: ActivationStore) -> None:
        """Close ``store`` if this runner made it and no layer uses it any more."""
        if not self._in_use(store) and any(s is store for s in self._own):
            store.close()
            self._own = [s for s in self._own if s is not store]

    @torch.no_grad()
    def _propagate(self, start: int, stop: int, keep: bool) -> ActivationStore:
        """Run every row through layers ``start..stop-1`` (from the stored inputs of ``start``), layer at a time,
        batch at a time, each layer onloaded once; ``keep``: store the inputs of the kept layers on the way.
        Returns the inputs of layer ``stop``."""
        current = self.stores[start]
        for idx in range(start, stop):
            parts = self.parts(idx)
            out = current  # a skipped block's output is its input
            if "block" not in parts:
                out = ActivationStore(self.folder)
                self._own.append(out)
                device = self._device(idx)
                with onloaded(self.layers[idx]):
                    for b in range(len(current)):  # [B, T, d] per batch
                        out.append(self._layer(idx, current.get(b, device), parts))
            if keep and idx + 1 in self.stored:
                self.stores[idx + 1] = out
            if out is not current:
                self._drop(current)  # an intermediate between kept layers
            current = out
        return current

    @torch.no_grad()
    def refresh(self, start: int) -> None:
        """Recompute the stored inputs of layers ``start+1..L`` (after a change in layer ``start``), from the
        closest stored layer at or below ``start``; the stores replaced are new ones (never written into, so a
        runner sharing them with ``prefix_from`` keeps its own)."""
        if self._stale is not None:
            start, self._stale = min(start, self._stale), None
        if start >= len(self.layers):
            return
        for store in self._recomputed.values():
            self._drop(store)
        self._recomputed = {}
        stale = [self.stores.pop(i) for i in [i for i in self.stores if i > start]]
        for store in stale:
            self._drop(store)
        self._propagate(self._checkpoint(start), len(self.layers), keep=True)

    def inputs(self, idx: int) -> ActivationStore:
        """The inputs of layer ``idx`` (``L``: the final hidden states) for every row, batches of ``batch`` rows:
        the runner's store, or (between kept layers) one recomputed from the closest kept layer below (freed
        with the runner)."""
        self._sync()
        if idx in self.stores:
            return self.stores[idx]
        if idx not in self._recomputed:  # kept until the next refresh
            self._recomputed[idx] = self._propagate(self._checkpoint(idx), idx, keep=False)
        return self._recomputed[idx]

    @property
    def cache(self) -> list[RowsView]:
        """``cache[l][s]``: the input ``[1, T, d]`` of layer ``l`` (``l = L``: the final hidden state) for row
        ``s``, on the layer's execution device (read from the stores; kept for per-row consumers)."""
        return [RowsView(self, i) for i in range(len(self.layers) + 1)]

    # ----- layer-major scoring ---------------------------------------------------------------------------
    def chunks(self) -> list[Chunk]:
        """The chunks of rows scored together, in row order (never across a stored batch)."""
        out, row = [], 0
        for b in range(math.ceil(self.n / self.batch)):
            size = min(self.batch, self.n - b * self.batch)
            for start in range(0, size, self.chunk_rows):
                stop = min(start + self.chunk_rows, size)
                out.append(Chunk(b, start, stop, row))
                row += stop - start
        return out

    def chunk_input(self, chunk: Chunk, idx: int) -> torch.Tensor:
        """The stored input of layer ``idx`` (a kept layer, or ``L``) for ``chunk``'s rows, ``[b, T, d]``."""
        self._sync()
        return chunk.of(self.stores[idx][chunk.batch]).to(self._device(idx))

    def to_device(self, final_hidden: torch.Tensor) -> torch.Tensor:
        """Final hidden states (e.g. read from a store) on the device where the last layer computes."""
        return final_hidden.to(self._device(len(self.layers)))

    @torch.no_grad()
    def candidate_finals(self, chunk: Chunk, cands: list[Candidate], from_layer0: bool = False) -> dict:
        """Final hidden states ``[b, T, d]`` of ``chunk``'s rows with the current removals plus each candidate
        (candidate -> tensor). Layer-major: each layer is onloaded once and runs every candidate that needs it;
        a candidate in layer ``l`` starts from the stream at ``l`` (``from_layer0``: the naive search, every
        candidate from layer 0)."""
        self._sync()
        start_of = {c: 0 if from_layer0 else c.layer for c in cands}
        last_start = max(start_of.values())
        first = self._checkpoint(min(start_of.values()))
        base = self.chunk_input(chunk, first)  # the stream of the current removals, carried up to last_start
        states: dict[Candidate, torch.Tensor] = {}
        for idx in range(first, len(self.layers)):
            if first < idx <= last_start and idx in self.stores:
                base = self.chunk_input(chunk, idx)  # stored: read, not recomputed
            runs = [c for c in cands if start_of[c] <= idx]
            advance = idx < last_start and idx + 1 not in self.stores  # a later candidate starts from the stream
            busy = any("block" not in self.parts(idx, c) for c in runs) or (advance and "block" not in self.parts(idx))
            with onloaded(self.layers[idx]) if busy else contextlib.nullcontext():
                for c in runs:
                    states[c] = self._layer(idx, base if start_of[c] == idx else states[c], self.parts(idx, c))
                if advance:
                    base = self._layer(idx, base, self.parts(idx))
        return states

    @torch.no_grad()
    def chunk_logits(self, chunk: Chunk, final_hidden: torch.Tensor, offset: int = 0) -> torch.Tensor:
        """The model's logits ``[b, T, V]`` (float32) for ``chunk``'s rows ``offset:offset + b`` given the last
        layer's output ``[b, T, d]``."""
        self.head_forwards += self.token_weight * final_hidden.shape[0] / self.n
        if self._tuple_out is None:
            self._tuple_out = layers_return_tuple(self.model, self.ids)
        first = chunk.first_row + offset
        return head_forward(self.model, self.ids[first : first + final_hidden.shape[0]], final_hidden, self._tuple_out)

    def head_onloaded(self):
        """A context in which the embeddings, final norm and LM head of an offloaded model are onloaded once
        (calls of :meth:`chunk_logits` inside it read no weights)."""
        return onloaded_except(self.model, self.layers)

    def final_copy(self) -> ActivationStore:
        """A copy of the final hidden states under the current removals (e.g. the dense reference of a search)."""
        self._sync()
        return copy_store(self.stores[len(self.layers)])

    def close(self) -> None:
        """Drop the stores this runner made (their files, on disk)."""
        for store in self._own:
            store.close()
        self._own = []
