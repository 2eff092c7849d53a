"""The depth methods' layer runner: the model run layer by layer on calibration rows with candidates removed.

:class:`DepthRunner` uses the very drop operations of the plan (``drop_attention_in_`` / ``drop_mlp_in_``) applied for
the duration of one call, so what a search scores is exactly what the saved model computes. It caches the
residual stream at the input of every layer for the current removal set; scoring a candidate in layer ``l``
then re-runs layers ``l..L-1`` only. Work is counted in *layer-forwards*: one decoder layer over the whole
calibration set (a call on a fraction of the tokens counts that fraction). :func:`skipping` and
:func:`head_logits` serve full-model forwards (and backwards) with layers passed through.
"""

from __future__ import annotations

import contextlib

import torch

from ...engine import capture_layer_inputs, head_forward, pass_through, run_layer, substituted
from ...remote.hf_pruning_surgery import adapter_for, inspect_model
from ..masks.layerwise import LAYER_BATCH
from .candidates import Candidate


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


class DepthRunner:
    """Runs decoder layers on calibration rows with candidates removed; caches the residual stream.

    ``calibration``: LongTensor ``[n_samples, seq_len]``; every row is run on its own (batch 1), so costs can be
    cut short per sample. ``token_weight`` scales the work counter (a runner on a subset of the tokens of the
    main calibration counts its share of a full layer-forward). ``removed``: candidates removed from the start.
    """

    def __init__(self, model, calibration: torch.Tensor, token_weight: float = 1.0, removed: tuple = (),
                 prefix_from: DepthRunner | None = None):
        """``prefix_from``: a runner on the same rows with nothing removed; its cached stream up to the first
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
        if prefix_from is not None:
            if prefix_from.removed or prefix_from.ids is not calibration:
                raise ValueError("prefix_from must be a runner on the same calibration rows with nothing removed")
            first = min(self.removed, default=len(self.layers))
            self.kwargs, self._tuple_out = prefix_from.kwargs, prefix_from._tuple_out
            # cache[l][s]: input of layer l for sample s under the current removal set (cache[L]: final hidden)
            self.cache = [list(prefix_from.cache[i]) if i <= first else [None] * self.n
                          for i in range(len(self.layers) + 1)]
            self.refresh(first)
            return
        inputs, self.kwargs = capture_layer_inputs(model, calibration)
        self.cache: list[list[torch.Tensor | None]] = [inputs] + [[None] * self.n for _ in self.layers]
        self.refresh(0)

    # ----- removal ---------------------------------------------------------------------------------------
    def remove(self, candidate: Candidate, refresh: bool = True) -> None:
        """Make ``candidate``'s removal permanent for this runner; ``refresh`` updates the cached residual stream
        (a naive search, which always runs from layer 0, skips it: only the layer-0 inputs are used then)."""
        self.removed.setdefault(candidate.layer, set()).add(candidate.kind)
        if refresh:
            self.refresh(candidate.layer)

    @contextlib.contextmanager
    def dropped(self, idx: int, parts: set[str]):
        """Layer ``idx`` with ``parts`` ("attention", "mlp") dropped through the adapter's own drop ops; restored
        afterwards. (A removed "block" never gets here: the layer is skipped, as ``remove_layers`` does.)"""
        layer = self.layers[idx]
        if not parts:
            yield layer
            return
        state = self.states[idx]  # the layer as the model has it: a sublayer it no longer has is not dropped again
        saved = dict(layer._modules)
        try:
            if "attention" in parts and state.attention != "none":
                self.adapter.drop_attention_in_(layer)
            if "mlp" in parts and state.mlp != "none":
                self.adapter.drop_mlp_in_(layer, self.hidden)
            yield layer
        finally:
            layer._modules.clear()
            layer._modules.update(saved)

    # ----- running ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def run(self, sample: int, start: int, extra: Candidate | None = None) -> torch.Tensor:
        """Final hidden state ``[1, T, d]`` of ``sample`` with the current removals plus ``extra``, from layer ``start``."""
        hidden = self.cache[start][sample]
        for idx in range(start, len(self.layers)):
            parts = set(self.removed.get(idx, ()))
            if extra is not None and extra.layer == idx:
                parts.add(extra.kind)
            hidden = self._layer(idx, hidden, parts)
        return hidden

    def _layer(self, idx: int, hidden: torch.Tensor, parts: set[str]) -> torch.Tensor:
        """One decoder layer with ``parts`` removed (``"block"``: the layer is skipped, costing nothing) on
        ``hidden`` ``[b, T, d]`` (``b`` calibration rows)."""
        if "block" in parts:
            return hidden
        with self.dropped(idx, parts) as layer:
            hidden = run_layer(layer, hidden, self.kwargs[idx])
        self.layer_forwards += self.token_weight * hidden.shape[0] / self.n
        return hidden

    @torch.no_grad()
    def refresh(self, start: int) -> None:
        """Recompute the cached inputs of layers ``start+1..L`` (after a change in layer ``start``). Rows run
        in batches of ``LAYER_BATCH`` (the captured masks and position embeddings broadcast over the batch);
        the cache keeps one ``[1, T, d]`` view per row."""
        if start >= len(self.layers):
            return
        for b0 in range(0, self.n, LAYER_BATCH):
            rows = slice(b0, min(b0 + LAYER_BATCH, self.n))
            hidden = torch.cat(self.cache[start][rows])  # [b, T, d]
            for idx in range(start, len(self.layers)):
                hidden = self._layer(idx, hidden, set(self.removed.get(idx, ())))
                self.cache[idx + 1][rows] = list(hidden.split(1))
        if self._tuple_out is None:
            out = self.layers[0](self.cache[0][0], **self.kwargs[0])
            self._tuple_out = isinstance(out, tuple)

    @torch.no_grad()
    def logits(self, sample: int, final_hidden: torch.Tensor) -> torch.Tensor:
        """The model's logits ``[T, V]`` (float32) for ``sample`` given the last layer's output ``[1, T, d]``."""
        self.head_forwards += self.token_weight / self.n
        return head_logits(self.model, self.layers, self.ids[sample], final_hidden, self._tuple_out)

    def dense_logits(self) -> list[torch.Tensor]:
        """Logits ``[T, V]`` per sample with the current removals (the dense model when nothing is removed)."""
        return [self.logits(s, self.cache[len(self.layers)][s]) for s in range(self.n)]
