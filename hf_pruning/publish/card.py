"""Model cards for pruned models, rendered through huggingface_hub's ``ModelCard`` from the package's template.

Every save writes one (``README.md``) unless the folder already holds a card that hf_pruning did not write:
a user's own card text is never replaced. Generated cards carry :data:`GENERATED_MARKER` so a later save (or
push) knows it may refresh them.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from torch import nn

from ..plan import PruningPlan, get_plan
from ..recovery import RecoveryConfig
from ..registry import get_method
from ..remote.configuration_hf_pruning import MIN_TRANSFORMERS
from ..remote.hf_pruning_surgery import adapter_for
from ..saving import CARD_NAME, GENERATED_MARKER, REMOVAL_MAP_NAME, SPARSITY_PICTURE_NAME, is_generated_card  # noqa: F401
from ..version import __version__
from . import plots
from .summary import pruning_summary

logger = logging.getLogger(__name__)

TEMPLATE_PATH = Path(__file__).with_name("templates") / "modelcard.md"

#: one line per method, in our words, for the "How it was pruned" section


class CardTemplateError(ValueError):
    """The card template uses a variable that the card builder does not provide."""


def _fmt_int(n: int) -> str:
    return f"{n:,}"


def _change(before: float, after: float) -> str:
    return f"{after / before - 1:+.1%}" if before else ""


def _structure_section(s: dict, plan: PruningPlan) -> str:
    rows = [("decoder layers", s["layers"]["before"], s["layers"]["after"])]
    n = s["layers"]["after"]
    if s["attention"]["full"] != n:
        rows.append(("layers with full attention", s["layers"]["before"], s["attention"]["full"]))
        rows.append(("value-only attention (Q/K removed)", 0, s["attention"]["value_only"]))
        rows.append(("attention sublayer removed", 0, s["attention"]["none"]))
    if s["mlp"]["none"]:
        rows.append(("MLP sublayer removed", 0, s["mlp"]["none"]))
    for key, label in (("q_heads_removed", "query heads removed"), ("kv_heads_removed", "KV heads removed"),
                       ("mlp_channels_removed", "MLP channels removed")):
        if s[key]:
            rows.append((label, 0, s[key]))
    lines = ["| | base | pruned | change |", "|---|---:|---:|---:|"]
    lines += [f"| {label} | {_fmt_int(a)} | {_fmt_int(b)} | {b - a:+,} |" for label, a, b in rows]
    for key, label in (("params", "parameters (all)"), ("decoder_params", "decoder-layer parameters"),
                       ("kv_bytes_per_token", "KV cache per token (bf16 bytes)")):
        a, b = s[key]["before"], s[key]["after"]
        lines.append(f"| {label} | {_fmt_int(a)} | {_fmt_int(b)} | {_change(a, b)} |")
    if s["sparsity"] > 0.001:
        lines.append(f"| zero weights in decoder linears | | {s['sparsity']:.1%} | |")
    text = "\n".join(lines)
    if s["sparsity"] > 0.01:
        text += ("\n\nThe zeros are stored densely: the files are as large as the base model's, and speed-ups need "
                 "a sparse kernel (e.g. 2:4 sparsity on GPUs that support it).")
    if plan.ops:
        counts: dict[str, int] = {}
        for op in plan.ops:
            counts[op.name] = counts.get(op.name, 0) + 1
        text += "\n\nPlan ops: " + ", ".join(f"`{k}` x{v}" for k, v in counts.items()) + "."
    return text


def _fmt_value(value, pattern: str) -> str:
    return pattern.format(value) if isinstance(value, (int, float)) else "-"


def _evaluation_section(ev: dict | None) -> str:
    """A markdown table of what ``ev`` holds (the benchmark's row fields; any subset)."""
    if not ev:
        return ("Not measured when this card was written. `hf-prune eval <folder> --ppl default:evaluation "
                "--tasks <tasks> --speed` measures perplexity, zero-shot accuracy and speed.")
    lines = ["| metric | base | pruned |", "|---|---:|---:|"]
    if ev.get("ppl") is not None:
        where = ev.get("ppl_text") or "held-out text"
        tokens = f", {_fmt_value(ev['ppl_tokens'], '{:,}')} tokens" if ev.get("ppl_tokens") else ""
        lines.append(f"| perplexity ({where}{tokens}) | {_fmt_value(ev.get('dense_ppl'), '{:.2f}')} | "
                     f"{_fmt_value(ev['ppl'], '{:.2f}')} |")
    dense_acc = ev.get("dense_acc") or {}
    for task, acc in sorted((ev.get("acc") or {}).items()):
        lines.append(f"| {task} accuracy | {_fmt_value(dense_acc.get(task), '{:.3f}')} | {_fmt_value(acc, '{:.3f}')} |")
    if ev.get("acc_retained") is not None:
        lines.append(f"| mean accuracy retained | 1.000 | {_fmt_value(ev['acc_retained'], '{:.3f}')} |")
    for key, label in (("prefill_speedup", "prefill throughput"), ("decode_speedup", "decode throughput"),
                       ("ideal_speedup", "ideal speed-up from FLOPs")):
        if ev.get(key) is not None:
            lines.append(f"| {label} | 1.00x | {_fmt_value(ev[key], '{:.2f}x')} |")
    if ev.get("ppl_before_recovery") is not None:
        lines.append(f"| perplexity before recovery | | {_fmt_value(ev['ppl_before_recovery'], '{:.2f}')} |")
    text = "\n".join(lines)
    if len(lines) == 2:  # e.g. {"ppl": NaN}: saved as null, nothing finite to show
        text = ("No finite number to show: what was measured is not finite (NaN or infinite, saved as `null` in "
                "`evaluation.json`) or not a number.")
    if ev.get("note"):
        text += f"\n\n{ev['note']}"
    return text


def _eval_results(ev: dict | None) -> list:
    """model-index entries (perplexity and zero-shot accuracy) for the card's metadata."""
    from huggingface_hub import EvalResult

    if not ev:
        return []
    out = []
    if isinstance(ev.get("ppl"), (int, float)):
        name = ev.get("ppl_text") or "held-out text"
        out.append(EvalResult(task_type="text-generation", dataset_type="text", dataset_name=str(name),
                              metric_type="perplexity", metric_value=round(float(ev["ppl"]), 4)))
    for task, acc in sorted((ev.get("acc") or {}).items()):
        if not isinstance(acc, (int, float)):  # not finite (saved as null) or not a number: no metadata entry
            continue
        out.append(EvalResult(task_type="text-generation", dataset_type=task, dataset_name=task,
                              metric_type="accuracy", metric_value=round(float(acc), 4)))
    return out


def _load_section(repo_id: str, custom_code: bool, arch: str, saved_with: str | None) -> str:
    minimum = ".".join(map(str, MIN_TRANSFORMERS))
    with_pkg = (
        "With hf_pruning installed (`pip install hf_pruning`), importing it registers the pruned architectures "
        "with transformers' Auto classes:\n\n```python\nimport hf_pruning  # noqa: F401\n"
        f"from transformers import AutoModelForCausalLM\n\nmodel = AutoModelForCausalLM.from_pretrained(\"{repo_id}\")\n```"
    )
    if custom_code:
        without = (
            "Without hf_pruning, the model code saved next to the weights builds the pruned layers "
            f"(transformers >= {minimum}; older versions stop with an error naming the upgrade):\n\n```python\n"
            "from transformers import AutoModelForCausalLM\n\n"
            f"model = AutoModelForCausalLM.from_pretrained(\"{repo_id}\", trust_remote_code=True)\n```\n\n"
            "The tokenizer (when the folder has one) is a stock tokenizer and needs no custom code: load it with "
            f"`AutoTokenizer.from_pretrained(\"{repo_id}\", trust_remote_code=False)`. transformers 5 reads "
            "`config.json` for every tokenizer and, without that argument, stops to ask whether to run the model's "
            "code; with hf_pruning imported it does not ask."
        )
    else:
        without = (
            f"The result is expressible in the stock {arch} architecture, so plain transformers loads it with no "
            f"remote code (any release that supports {arch}; saved with transformers {saved_with or 'unknown'}):"
            "\n\n```python\nfrom transformers import AutoModelForCausalLM\n\n"
            f"model = AutoModelForCausalLM.from_pretrained(\"{repo_id}\")\n```"
        )
    return f"{without}\n\n{with_pkg}"


def _card_text(method) -> str:
    """The method's own card line (``card_text`` beside its config); a method unknown here says so."""
    if method == RecoveryConfig.method:
        return RecoveryConfig.card_text
    try:
        text = get_method(method).config_class.card_text
    except (KeyError, ValueError, TypeError):
        text = ""
    return text or f"{method}: a method registered outside hf_pruning."


def _method_section(history: list) -> str:
    if not history:
        return "No pruning method is recorded in `config.json`."
    lines = []
    for i, entry in enumerate(history, start=1):
        method = entry.get("method") if isinstance(entry, dict) else None
        lines.append(f"{i}. {_card_text(method)}")
    return "\n".join(lines)


def _resolve_base_model(model: nn.Module, base_model: str | None) -> str | None:
    """``base_model`` metadata: the argument, else the name the model was loaded from when it is a Hub id."""
    if base_model:
        return base_model
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    name = getattr(model.config, "_name_or_path", "") or ""
    if not name or os.path.exists(name) or name.count("/") != 1:
        return None
    try:
        validate_repo_id(name)
    except HFValidationError:
        return None
    return name


def template_variables(template_text: str) -> set[str]:
    """Names a Jinja card template reads."""
    import jinja2
    from jinja2 import meta

    return set(meta.find_undeclared_variables(jinja2.Environment().parse(template_text)))


def build_card(model: nn.Module, *, repo_id: str | None = None, base_model: str | None = None,
               evaluation: dict | None = None, picture: str | None = None, template_path: str | os.PathLike | None = None,
               location: str | None = None, summary: dict | None = None, **variables):
    """The ``huggingface_hub.ModelCard`` of a pruned model.

    ``evaluation`` holds what was measured, with the benchmark rows' keys (``ppl``, ``dense_ppl``, ``ppl_text``,
    ``ppl_tokens``, ``acc``, ``dense_acc``, ``acc_retained``, ``prefill_speedup``, ``decode_speedup``,
    ``ideal_speedup``, ``note``); any subset. ``picture`` is a file name next to the card. The loading snippets
    name ``repo_id``, else ``path/to/<base name of location>`` (the local folder: only its base name is used, so
    no local path enters the card); ``summary`` is a precomputed :func:`pruning_summary`. A custom
    ``template_path`` may use the default variables plus any passed as keyword arguments; a variable it needs
    and nobody provides raises :class:`CardTemplateError`.
    """
    from huggingface_hub import ModelCard, ModelCardData

    plan = get_plan(model)
    history = [h for h in (getattr(model.config, "pruning_config", None) or []) if isinstance(h, dict)]
    summary = summary if summary is not None else pruning_summary(model)
    arch = adapter_for(model).arch
    custom_code = not plan.is_stock_expressible()
    folder = Path(str(location)).name if location else ""  # a base name only: a local path never enters a card
    repo = repo_id or (f"path/to/{folder}" if folder else "<namespace>/<name>")
    name = Path(repo).name
    methods = [h["method"] for h in history if h.get("method")]
    tags = ["pruned", "hf_pruning", *dict.fromkeys(methods)] + (["custom_code"] if custom_code else [])
    base = _resolve_base_model(model, base_model)
    data = ModelCardData(base_model=base, library_name="transformers", pipeline_tag="text-generation", tags=tags,
                         model_name=name, eval_results=_eval_results(evaluation) or None)
    base_text = f"[{base}](https://huggingface.co/{base})" if base else f"a {arch} model"
    removed = summary["params_removed_fraction"]
    parts = []
    if removed > 0 or summary["kv_removed_fraction"] > 0:
        parts.append(f"{removed:.1%} of the decoder-layer parameters removed, KV cache "
                     f"{summary['kv_removed_fraction']:.1%} smaller")
    if summary["sparsity"] > 0.001:
        parts.append(f"{summary['sparsity']:.1%} of the decoder-layer weights set to zero")
    intro = (f"A pruned version of {base_text}, made with hf_pruning "
             f"({', '.join(dict.fromkeys(methods)) or 'a hand-written plan'}): "
             f"{'; '.join(parts) or 'nothing removed yet'}.")
    values = {
        "model_name": name,
        "intro": intro,
        "custom_code": custom_code,
        "load_section": _load_section(repo, custom_code, arch, getattr(model.config, "transformers_version", None)),
        "method_section": _method_section(history),
        "settings_json": "[\n" + ",\n".join("  " + json.dumps(h, sort_keys=True, default=str) for h in history) + "\n]",
        "structure_section": _structure_section(summary, plan),
        "picture": picture,
        "picture_alt": "what was removed, layer by layer",
        "evaluation_section": _evaluation_section(evaluation),
        "hf_pruning_version": __version__,
        **variables,
    }
    path = Path(template_path) if template_path is not None else TEMPLATE_PATH
    text = path.read_text(encoding="utf-8")
    missing = sorted(template_variables(text) - set(values) - set(data.to_dict()) - {"card_data"})
    if missing:
        raise CardTemplateError(
            f"the card template {path} uses {missing}, which the card builder does not provide; pass them as "
            "keyword arguments (build_card(model, ..., name=value)) or remove them from the template"
        )
    return ModelCard.from_template(data, template_path=str(path), **values)


def _draw_picture(model: nn.Module, folder: Path, summary: dict) -> str | None:
    """A removal map (structural plans) or a per-layer sparsity plot (masks) next to the card, if matplotlib is there."""
    plan = get_plan(model)
    drops = any(op.name in ("drop_attention", "drop_mlp", "remove_layers") for op in plan.ops)
    try:
        if drops:
            plots.removal_map(model, folder / REMOVAL_MAP_NAME)
            return REMOVAL_MAP_NAME
        if summary["sparsity"] > 0.01:
            plots.sparsity_plot(model, folder / SPARSITY_PICTURE_NAME)
            return SPARSITY_PICTURE_NAME
    except ImportError as err:
        logger.info("no picture in the model card: %s", err)
    return None


def write_card(model: nn.Module, folder: str | os.PathLike, *, keep: str | None = None, card=None,
               picture: bool = True, **card_kwargs) -> Path | None:
    """Write ``folder/README.md``: ``card`` (a user's text or ``ModelCard``) as given, else ``keep`` (the text of
    a card already at the destination) when a user wrote it, else a generated card. ``card=False`` writes none.
    """
    folder = Path(folder)
    path = folder / CARD_NAME
    if card is False:
        return None
    if card is not None:
        path.write_text(str(card), encoding="utf-8")
        return path
    if keep is not None and not is_generated_card(keep):
        logger.info("kept the existing model card (it was not written by hf_pruning)")
        path.write_text(keep, encoding="utf-8")
        return path
    summary = pruning_summary(model)  # one pass over the weights serves the picture and the card
    image = _draw_picture(model, folder, summary) if picture else None
    build_card(model, picture=image, summary=summary, **card_kwargs).save(path)
    return path
