"""Blocks of a decoder layer replayed from known outputs: stand-in modules, never an assigned ``forward``.

Once a block of a layer (the attention module, the MLP) is final for the rest of a layer's processing, its
outputs for each calibration batch can be kept in an :class:`~hf_pruning.engine.ActivationStore` and the later
passes over the same layer can skip it: :func:`replayed` puts a stand-in in its parent's place for the
duration that returns the next stored batch, so those passes cost only the glue around the blocks (norms,
residual adds). The replayed outputs are the very tensors the block computed, so nothing changes numerically.
"""

from __future__ import annotations

import contextlib

from torch import nn

from ...engine import ActivationStore


class Replay(nn.Module):
    """Stand-in for a block module whose outputs for the successive layer calls are known (one batch each):
    returns the next one instead of running (as a tuple of ``arity`` with Nones, like attention, if set)."""

    def __init__(self, outputs: ActivationStore, arity: int | None):
        super().__init__()
        self._outputs, self._arity, self._calls = outputs, arity, 0

    def forward(self, *args, **kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        y = self._outputs.get(self._calls % len(self._outputs), x.device)
        self._calls += 1
        return y if self._arity is None else (y, *([None] * (self._arity - 1)))


@contextlib.contextmanager
def replayed(replays: dict):
    """Inside the context, each block ``(parent, attribute) -> (outputs, arity)`` of ``replays`` is a stand-in
    in ``parent`` that returns its next known output batch instead of running."""
    saved = {}
    try:
        for (parent, attr), (outputs, arity) in replays.items():
            saved[(parent, attr)] = parent._modules[attr]
            parent._modules[attr] = Replay(outputs, arity)
        yield
    finally:
        for (parent, attr), module in saved.items():
            parent._modules[attr] = module


class Recorder:
    """Records a block's outputs ``[b, T, d]`` over one pass of every batch (a forward hook on the block), for
    :func:`replayed`. Only outputs shaped like the layer's hidden states are kept (a wider intermediate, e.g.
    OPT's fc1, would cost more memory than the pass it saves)."""

    def __init__(self, inputs: ActivationStore):
        self.outputs, self.arity, self._n, self.ok = inputs.like(), None, len(inputs), True
        self._shape = inputs[0].shape[1:]  # [T, d]

    def hook(self, mod, args, out):
        y = out[0] if isinstance(out, tuple) else out
        self.arity = len(out) if isinstance(out, tuple) else None
        if y.shape[1:] != self._shape or len(self.outputs) >= self._n:
            self.ok = False
            return
        self.outputs.append(y)

    def complete(self) -> bool:
        """Whether every batch was recorded (the pass ran the whole block each time)."""
        return self.ok and len(self.outputs) == self._n
