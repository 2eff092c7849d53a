"""Pictures of what a method removed (PNG through matplotlib, the ``plot`` extra).

``removal_map`` draws a layer x {attention, MLP} grid: removed sublayers are coloured by the step at which
they were removed (and numbered), kept ones are pale. It reads the order from a pruned model's
``config.pruning_config`` (FinerCut, SLEB and ShortGPT record it) or falls back to the plan's ops.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

logger = logging.getLogger(__name__)

_COLUMNS = ("attention", "mlp")


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise ImportError("plots need matplotlib: pip install 'hf_pruning[plot]' (or pip install matplotlib)") from err
    return plt


def removal_order(model) -> tuple[list[str], int]:
    """The removal order (``"<layer>.<attention|mlp|block>"``, base layer indices) and the base layer count."""
    from .api import get_plan

    plan = get_plan(model)
    base = plan.base or {"num_hidden_layers": model.config.num_hidden_layers}
    n_layers = int(base["num_hidden_layers"])
    for entry in reversed(getattr(model.config, "pruning_config", None) or []):
        if isinstance(entry, dict) and entry.get("order"):
            return list(entry["order"]), n_layers
    order = []
    for op in plan.ops:  # no recorded order: the plan's drop ops in the order they were applied
        if op.name in ("drop_attention", "drop_mlp"):
            order.append(f"{op.layer}.{'attention' if op.name == 'drop_attention' else 'mlp'}")
        elif op.name == "remove_layers":
            order.extend(f"{i}.block" for i in op.layers)
    return order, n_layers


def removal_map(source, path: str | os.PathLike, num_layers: int | None = None, title: str | None = None) -> Path:
    """Write the removal map of ``source`` (a pruned model, or an order list with ``num_layers``) to ``path``."""
    if isinstance(source, (list, tuple)):
        if num_layers is None:
            raise ValueError("an order list needs num_layers (the model's decoder layer count before pruning)")
        order, n_layers = [str(c) for c in source], int(num_layers)
    else:
        order, n_layers = removal_order(source)
        title = title or f"{type(source).__name__}: {len(order)} removals"
    step = {}  # (layer, column) -> removal step (1-based)
    for k, name in enumerate(order, start=1):
        layer, _, kind = name.partition(".")
        for col in (_COLUMNS if kind == "block" else (kind,)):
            if col not in _COLUMNS or not layer.isdigit() or int(layer) >= n_layers:
                raise ValueError(f"bad removal {name!r} for a model of {n_layers} layers")
            step[(int(layer), col)] = k
    plt = _pyplot()
    import numpy as np

    grid = np.full((n_layers, 2), np.nan)  # [layers, 2]
    for (layer, col), k in step.items():
        grid[layer, _COLUMNS.index(col)] = k
    fig, ax = plt.subplots(figsize=(3.2, 0.9 + 0.22 * n_layers))
    cmap = plt.get_cmap("viridis")
    cmap = cmap.with_extremes(bad="#eeeeee")
    image = ax.imshow(np.ma.masked_invalid(grid), aspect="auto", cmap=cmap, origin="lower",
                      vmin=1, vmax=max(len(order), 1))
    for (layer, col), k in step.items():
        ax.text(_COLUMNS.index(col), layer, str(k), ha="center", va="center", fontsize=6, color="white")
    ax.set_xticks([0, 1], ["attention", "MLP"])
    ax.set_yticks(range(n_layers), [str(i) for i in range(n_layers)], fontsize=6)
    ax.set_ylabel("decoder layer")
    ax.set_title(title or f"{len(order)} removals", fontsize=8)
    fig.colorbar(image, ax=ax, label="removal step", fraction=0.08)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp.png")
    fig.savefig(tmp, dpi=150)
    plt.close(fig)
    os.replace(tmp, out)
    logger.info("wrote the removal map of %d removals to %s", len(order), out)
    return out
