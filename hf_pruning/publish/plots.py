"""Pictures of what a method removed (PNG through matplotlib, the ``plot`` extra).

``removal_map`` draws a layer x {attention, MLP} grid: removed sublayers are coloured by the step at which
they were removed (and numbered), kept ones are pale. It reads the order from a pruned model's
``config.pruning_config`` (FinerCut, SLEB and ShortGPT record it) or falls back to the plan's ops.

``sparsity_plot`` draws the fraction of zero weights of every decoder-layer linear of a (mask-)pruned model,
one bar per projection in each layer's group, with the overall fraction as a dashed line.

``ratio_plot`` draws a benchmark results file: perplexity (or accuracy retained) against the fraction of
decoder-layer parameters removed, one line per method and settings family, the dense model as a line.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

from ..accounting import sparsity_report
from ..plan import get_plan

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


def _save(plt, fig, path: str | os.PathLike) -> Path:
    """Lay out ``fig``, write it to ``path`` as a PNG (atomically: a partial file never has the name) and close it."""
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp.png")
    fig.savefig(tmp, dpi=150)
    plt.close(fig)
    os.replace(tmp, out)
    return out


def removal_order(model) -> tuple[list[str], int]:
    """The removal order (``"<layer>.<attention|mlp|block>"``, base layer indices) and the base layer count."""
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
    out = _save(plt, fig, path)
    logger.info("wrote the removal map of %d removals to %s", len(order), out)
    return out


def _sparsity_matrix(report: dict):
    """The projection names and the ``[layers, kinds]`` zero fractions of a ``sparsity_report`` dict; a
    projection a layer lacks (a dropped sublayer) is NaN. Names follow the fullest layer's module order."""
    import numpy as np

    layers = report["layers"]
    kinds = list(dict.fromkeys(name for entry in sorted(layers, key=len, reverse=True) for name in entry))
    matrix = np.full((len(layers), len(kinds)), np.nan)  # [layers, kinds]
    for i, entry in enumerate(layers):
        for name, fraction in entry.items():
            matrix[i, kinds.index(name)] = fraction
    return kinds, matrix


def sparsity_plot(source, path: str | os.PathLike, title: str | None = None) -> Path:
    """Write the per-layer sparsity of ``source`` (a pruned model, or the dict ``sparsity_report`` returns) to
    ``path``: x is the decoder layer (the model's current index), one bar per projection, the overall dashed."""
    if isinstance(source, dict):
        report, name = source, ""
    else:
        report, name = sparsity_report(source), f"{type(source).__name__}: "
    kinds, matrix = _sparsity_matrix(report)
    if not matrix.size:
        raise ValueError("the sparsity report has no decoder-layer linears to plot")
    plt = _pyplot()
    import numpy as np
    from matplotlib.ticker import PercentFormatter

    short = [k.rsplit(".", 1)[-1] for k in kinds]  # "self_attn.q_proj" -> "q_proj" when that stays unique
    labels = short if len(set(short)) == len(short) else kinds
    n_layers, n_kinds = matrix.shape
    width = 0.8 / n_kinds
    fig, ax = plt.subplots(figsize=(min(4 + 0.4 * n_layers, 24), 3.6))
    colors = plt.get_cmap("tab10").colors
    for j, label in enumerate(labels):
        x = np.arange(n_layers) - 0.4 + (j + 0.5) * width  # [layers]
        ax.bar(x, matrix[:, j], width, label=label, color=colors[j % len(colors)])
    ax.axhline(report["overall"], color="black", linestyle="--", linewidth=1, label=f"overall {report['overall']:.1%}")
    ax.set_xticks(range(n_layers), [str(i) for i in range(n_layers)], fontsize=7)
    ax.set_xlim(-0.6, n_layers - 0.4)
    ax.set_ylim(0, 1)
    ax.yaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("weights zero (sparsity)")
    ax.set_title(title or f"{name}{report['overall']:.1%} of decoder-layer weights zero", fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1), borderaxespad=0)
    out = _save(plt, fig, path)
    logger.info("wrote the sparsity of %d layers x %d projections to %s", n_layers, n_kinds, out)
    return out


#: settings that set how much a method removes: a series runs along them (the others name the series)
_AMOUNT_SETTINGS = ("sparsity", "param_ratio", "sublayer_ratio", "num_removals", "num_layers", "per_layer")
#: metric -> (y-axis label, log scale)
_METRICS = {"ppl": ("perplexity", True), "acc_retained": ("zero-shot accuracy retained", False)}


def _series_label(method: str, settings: dict) -> str:
    """``method`` plus its settings that are not an amount: ``"gradmap no compensate"``, ``"wanda 2:4"``."""
    parts = [method]
    for key, value in sorted(settings.items()):
        if key in _AMOUNT_SETTINGS:
            continue
        if key == "pattern":
            parts.append(str(value))
        elif key == "recover":  # the benchmark's recovery rows: their LoRA settings are in the results file
            parts.append("+ LoRA recovery")
        elif isinstance(value, bool):
            parts.append(key if value else f"no {key}")
        else:
            parts.append(f"{key}={value}")
    return " ".join(parts)


def _load_results(results) -> dict:
    if isinstance(results, (str, os.PathLike)):
        results = json.loads(Path(results).read_text())
    if not isinstance(results, dict) or not isinstance(results.get("rows"), list):
        raise ValueError("benchmark results need a 'rows' list (the JSON that `make bench` writes)")
    return results


def _ratio_series(results: dict, metric: str = "ppl") -> tuple[float | None, dict[str, list[tuple[float, float]]]]:
    """The dense reference's ``metric`` (None if absent) and ``{series label: [(params removed, metric), ...]}``
    sorted by params removed, series in order of first row. Rows with an error or without a finite value skip."""
    if metric not in _METRICS:
        raise ValueError(f"unknown metric {metric!r}; choose one of {sorted(_METRICS)}")
    reference, series, skipped = None, {}, 0
    for row in results["rows"]:
        x, y = row.get("params_removed"), row.get(metric)
        if row.get("error") or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in (x, y)):
            skipped += 1
        elif row.get("group") == "reference" or row.get("method") == "dense":
            reference = reference if reference is not None else float(y)
        else:
            series.setdefault(_series_label(row["method"], row.get("settings") or {}), []).append((float(x), float(y)))
    if not series:
        raise ValueError(f"no plottable rows for {metric!r}: {len(results['rows'])} rows, {skipped} with an error "
                         f"or without params_removed/{metric}, the rest only the dense reference")
    if skipped:
        logger.info("ratio plot: skipped %d rows with an error or without params_removed/%s", skipped, metric)
    return reference, {label: sorted(points) for label, points in series.items()}


def ratio_plot(results, path: str | os.PathLike, metric: str = "ppl", title: str | None = None) -> Path:
    """Write ``metric`` ("ppl", log axis, or "acc_retained") against the fraction of decoder-layer parameters
    removed, for benchmark ``results`` (the dict or its JSON file), to ``path``: a line per series."""
    results = _load_results(results)
    reference, series = _ratio_series(results, metric)
    ylabel, log = _METRICS[metric]
    plt = _pyplot()
    from matplotlib.ticker import PercentFormatter

    fig, ax = plt.subplots(figsize=(12, 5.5))
    colors, markers = plt.get_cmap("tab20").colors, "osD^vP*Xph<>"
    for k, (label, points) in enumerate(series.items()):
        xs, ys = zip(*points)
        ax.plot(xs, ys, marker=markers[k % len(markers)], color=colors[k % len(colors)], markersize=5,
                linewidth=1, label=label)
    if reference is not None:
        ax.axhline(reference, color="black", linestyle="--", linewidth=1, label=f"dense ({reference:.4g})")
    if log:
        ax.set_yscale("log")
    ax.set_xlim(left=0)
    ax.xaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))
    ax.set_xlabel("decoder-layer parameters removed")
    ax.set_ylabel(ylabel)
    ax.grid(True, which="major", alpha=0.3)
    ax.set_title(title or str(results.get("model", "benchmark")), fontsize=9)
    ax.legend(fontsize=6.5, loc="upper left", bbox_to_anchor=(1.01, 1), borderaxespad=0)
    out = _save(plt, fig, path)
    logger.info("wrote %s against parameters removed for %d series to %s", metric, len(series), out)
    return out
