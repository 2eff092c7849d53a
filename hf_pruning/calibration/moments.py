"""Input moments of chosen linears over calibration data, from one streamed pass on the engine (layer at a time,
batch at a time)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..engine import (
    LAYER_BATCH,
    ActivationStore,
    calibration_mode,
    capture,
    distributed,
    execution_device,
    hooks,
    onloaded,
    run_layer,
)
from ..remote.hf_pruning_surgery import adapter_for


@dataclass
class Moments:
    """Per input channel: token count, sum and sum of squares (float64), accumulated over calibration tokens."""

    count: int
    total: torch.Tensor  # [in]
    squares: torch.Tensor  # [in]

    @property
    def mean(self) -> torch.Tensor:
        return self.total / self.count

    @property
    def variance(self) -> torch.Tensor:
        """Unbiased variance of each channel over all tokens."""
        return ((self.squares - self.count * self.mean.pow(2)) / max(self.count - 1, 1)).clamp_min(0)

    @property
    def norm(self) -> torch.Tensor:
        """L2 norm of each channel over all tokens (Wanda's ``||X_j||``)."""
        return self.squares.sqrt()


def _owners(layers: nn.ModuleList, linears: dict) -> dict[int, list]:
    """Decoder layer index -> the keys of ``linears`` inside it; a module outside every layer raises."""
    where = {id(m): i for i, layer in enumerate(layers) for m in layer.modules()}
    owners: dict[int, list] = {}
    for key, module in linears.items():
        if id(module) not in where:
            raise ValueError(f"input_moments: {key!r} is not inside a decoder layer; the streamed statistics pass "
                             "runs the decoder layers only (pass projections of the layers)")
        owners.setdefault(where[id(module)], []).append(key)
    return owners


def _summed_over_ranks(stats: dict, linears: dict) -> dict:
    """Under a process group: each key's moments (count, total, squares) summed over the ranks, one collective
    per key in ``linears``' order (the same on every rank); a key no rank measured stays out. Without a
    process group ``stats`` itself."""
    if not distributed.active():
        return stats
    out: dict = {}
    for key, module in linears.items():
        m = stats.get(key)
        if m is None:  # this rank measured nothing there: it adds zeros
            width = module.in_features
            m = Moments(0, torch.zeros(width, dtype=torch.float64), torch.zeros(width, dtype=torch.float64))
        both = torch.cat([m.total.new_tensor([float(m.count)]), m.total, m.squares])  # [1 + 2 * in] float64
        both = distributed.all_sum(both, f"the input moments of {key}")
        count = int(round(float(both[0])))
        if count:
            out[key] = Moments(count, *both[1:].chunk(2))
    return out


@torch.no_grad()
def input_moments(model, calibration: torch.Tensor, linears: dict, batch_size: int = LAYER_BATCH,
                  progress: bool = False, store_folder: str | bool | None = None) -> dict:
    """The input moments of every module in ``linears`` (any key -> a module inside a decoder layer) over
    ``calibration`` ``[n, T]``; returns key -> :class:`Moments`.

    One streamed pass on the engine: the layer-0 inputs are captured in an :class:`ActivationStore` (CPU, or disk
    with ``store_folder``), then layer by layer (each onloaded once) and batch by batch (``batch_size`` rows on
    the execution device at a time) up to the last layer holding one of ``linears``; no head, no layer above.
    The decoder's current entries run, so layers substituted for the duration (``engine.substituted``) are
    measured as they stand in. Under a process group each rank measures its own rows and the moments are
    summed over the ranks at the end (:func:`_summed_over_ranks`): every rank returns the all-rows moments.
    """
    from tqdm.auto import tqdm

    layers = adapter_for(model).decoder_layers(model)
    owners = _owners(layers, linears)
    stats: dict = {}

    def record(name):
        def hook(module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()  # [tokens, in]
            m = stats.get(name)
            if m is None:
                stats[name] = Moments(x.shape[0], x.sum(0), x.pow(2).sum(0))
            else:
                m.count += x.shape[0]
                m.total += x.sum(0)
                m.squares += x.pow(2).sum(0)

        return hook

    if not owners:
        return stats
    last = max(owners)
    with calibration_mode(model):
        inputs, kwargs = capture(model, calibration, batch_size, ActivationStore(store_folder))
        try:
            for i in tqdm(range(last + 1), desc="activation statistics", unit="layer", disable=not progress):
                outputs = inputs.like() if i < last else None
                with onloaded(layers[i]), hooks() as handles:
                    for key in owners.get(i, ()):
                        handles.append(linears[key].register_forward_pre_hook(record(key)))
                    device = execution_device(layers[i])
                    for b in range(len(inputs)):
                        hidden = run_layer(layers[i], inputs.get(b, device), kwargs[i])  # [b, T, d]
                        if outputs is not None:
                            outputs.append(hidden)
                inputs.close()
                inputs = outputs
        finally:
            if inputs is not None:
                inputs.close()
    return _summed_over_ranks(stats, linears)
