"""Blocks of a decoder layer replayed from known outputs: stand-in modules, never an assigned ``forward``.

Once a block of a layer (the attention module, the MLP) is final for the rest of a layer's processing, its
outputs for each calibration batch can be kept in an :class:`~hf_pruning.engine.ActivationStore` and the later
passes over the same layer can skip it: :func:`replayed` puts a stand-in in its parent's place for the
duration that returns the next stored batch, so those passes cost only the glue around the blocks (norms,
residual adds). The replayed outputs are the very tensors the block computed, so nothing changes numerically.

A block whose output IS its last linear's output (the attention's o_proj, the MLP's down_proj) can also be
replayed from that linear's recorded inputs (:class:`Through`): the later passes compute only that linear.
"""

from __future__ import annotations

import contextlib

from torch import nn

from ...engine import ActivationStore


def _take(store: ActivationStore, calls: int, device, consume: bool):
    """Batch ``calls`` (cyclically) of ``store`` on ``device``; with ``consume``, a store in CPU memory lets
    go of it (a pass that reads each batch once: the memory comes back as the pass goes)."""
    i = calls % len(store)
    y = store.get(i, device)
    if consume and not store.folder:
        store[i] = y.new_empty(0)
    return y


class Replay(nn.Module):
    """Stand-in for a block module whose outputs for the successive layer calls are known (one batch each):
    returns the next one instead of running (as a tuple of ``arity`` with Nones, like attention, if set)."""

    def __init__(self, outputs: ActivationStore, arity: int | None, consume: bool = False):
        super().__init__()
        self._outputs, self._arity, self._calls, self._consume = outputs, arity, 0, consume

    def forward(self, *args, **kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        y = _take(self._outputs, self._calls, x.device, self._consume)
        self._calls += 1
        return y if self._arity is None else (y, *([None] * (self._arity - 1)))


class Through(nn.Module):
    """Stand-in for a block whose output is its last linear's (``linear``): computes ``linear`` on the next
    recorded input of that linear (one batch per layer call, ``[b, T, in]``) instead of running the block;
    returns a tuple of ``arity`` with Nones if set. The block's other computations are skipped: only valid
    when the recorded inputs are those the block would give ``linear`` now (its other linears final)."""

    def __init__(self, linear: nn.Module, inputs: ActivationStore, arity: int | None, consume: bool = False):
        super().__init__()
        object.__setattr__(self, "_linear", linear)  # not a submodule: it stays where it is in the layer
        self.inputs, self._arity, self._calls, self._consume = inputs, arity, 0, consume

    def forward(self, *args, **kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        y = self._linear(_take(self.inputs, self._calls, x.device, self._consume))
        self._calls += 1
        return y if self._arity is None else (y, *([None] * (self._arity - 1)))

    def fresh(self, consume: bool = False) -> Through:
        """The same stand-in, counting its calls from the first batch again (one per pass)."""
        return Through(self._linear, self.inputs, self._arity, consume)


@contextlib.contextmanager
def replayed(replays: dict, consume: bool = False):
    """Inside the context, each block ``(parent, attribute) -> (outputs, arity)`` of ``replays`` is a stand-in
    in ``parent`` that returns its next known output batch instead of running; a value that is a
    :class:`Through` computes its linear on the next recorded input instead. ``consume``: the pass reads
    each batch once and the last: the stand-ins let go of every batch they read (stores in CPU memory)."""
    saved = {}
    try:
        for (parent, attr), value in replays.items():
            saved[(parent, attr)] = parent._modules[attr]
            parent._modules[attr] = value.fresh(consume) if isinstance(value, Through) else Replay(*value, consume)
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
