"""Multiple-choice scoring of JSONL tasks on an in-memory model, the way lm-evaluation-harness scores them, cheaper.

An item is ``{"question": str, "choices": [str, ...], "label": int}``. Each choice is one request: the context
``"Question: {question}\\nAnswer:"`` and the continuation ``" " + choice``, tokenised as lm-eval 0.4 does for a
causal model (trailing spaces of the context move to the continuation; the continuation's tokens are those of the
whole string after the context's own tokens; the tokenizer's default special tokens, none when the text already
starts with the prefix token). A choice's score is the summed log-likelihood of its continuation tokens; ``acc``
takes the first choice of highest score, ``acc_norm`` the first of highest score divided by the choice's length in
characters (the delimiter not counted). Sequences longer than the model's context are cut from the left.

Where lm-eval projects every position of every request onto the vocabulary and log-softmaxes it all, this runs the
``lm_head`` (and, on Gemma2/3, the final soft-capping, which the stock forward applies) only at the positions that
predict a continuation token, through the ``logits_to_keep`` argument of the causal-LM forward: a per-row boolean
mask where transformers accepts one, else the union of the batch's positions, else the full logits. The
log-softmax runs in float32 over the kept positions only, a bounded number of rows at a time. And where lm-eval
runs every request whole, each distinct context runs once here and its choices run against its KV cache
(``choices_forward``): the context's tokens are exactly the request's shared prefix, as lm-eval splits it, so the
scores are the same; a model whose cache cannot be shared is scored request by request.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import torch

from .choices_forward import SharedContextUnsupported, keep_mode, request_scores, shared_context_scores

logger = logging.getLogger(__name__)

CONTEXT = "Question: {question}\nAnswer:"
DELIMITER = " "
METRICS = ("acc", "acc_norm")
#: names of the model classes already logged as scored request by request
_PER_REQUEST_MODELS: set[str] = set()
#: the context length when neither the config nor the tokenizer gives one (lm-eval's default as well)
DEFAULT_MAX_LENGTH = 2048


def load_items(path: str | Path, limit: int | None = None) -> list[dict]:
    """The items of a JSONL task file (one ``{"question", "choices", "label"}`` object a line), checked; the first
    ``limit`` when given. Raises ``FileNotFoundError`` for a missing file and ``ValueError`` for a bad one."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"task file {path} does not exist")
    items = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                items.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{number}: not a JSON object ({err})") from err
    check_items(items, str(path))
    return items if limit is None else items[:limit]


def check_items(items: list, source: str = "items") -> None:
    """Raise ``ValueError`` unless ``items`` is a non-empty list of well-formed multiple-choice items."""
    if not items:
        raise ValueError(f"{source}: no items")
    for number, item in enumerate(items, 1):
        where = f"{source}: item {number}"
        if not isinstance(item, dict):
            raise ValueError(f"{where} is not a JSON object")
        missing = [key for key in ("question", "choices", "label") if key not in item]
        if missing:
            raise ValueError(f"{where} lacks the field(s) {', '.join(missing)} (needs question, choices, label)")
        if not isinstance(item["question"], str):
            raise ValueError(f"{where}: question must be a string")
        choices = item["choices"]
        if not isinstance(choices, list) or not choices or not all(isinstance(c, str) and c for c in choices):
            raise ValueError(f"{where}: choices must be a non-empty list of non-empty strings")
        label = item["label"]
        if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < len(choices):
            raise ValueError(f"{where}: label {label!r} is not an index into its {len(choices)} choices")


def prefix_token_id(tokenizer) -> int:
    """The token that stands for an empty context: BOS, else EOS (lm-eval's choice)."""
    token = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if token is None:
        raise ValueError("the tokenizer has neither an EOS nor a BOS token; lm-eval needs one as the context prefix")
    return token


def _encode(tokenizer, text: str, prefix_text: str) -> list[int]:
    if text.startswith(prefix_text):  # the text carries the prefix token already: add no special tokens
        return tokenizer.encode(text, add_special_tokens=False)
    return tokenizer.encode(text)


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context tokens, continuation tokens) of one request, split as lm-eval splits them for a causal model."""
    prefix = prefix_token_id(tokenizer)
    prefix_text = tokenizer.decode(prefix)
    if not context:
        cont = tokenizer.encode(continuation, add_special_tokens=False)
        return ([prefix], cont) if cont[0] != prefix else (cont[:1], cont[1:])
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = _encode(tokenizer, context + continuation, prefix_text)
    ctx = _encode(tokenizer, context, prefix_text)
    return ctx, whole[len(ctx):]


def max_length(model, tokenizer) -> int:
    """The longest input the model takes: its config's positions, else the tokenizer's limit, else 2048."""
    config = getattr(model.config, "text_config", None) or model.config
    for key in ("n_positions", "max_position_embeddings", "n_ctx"):
        if getattr(config, key, None):
            return int(getattr(config, key))
    limit = getattr(tokenizer, "model_max_length", None)
    return int(limit) if limit and limit < 1e30 else DEFAULT_MAX_LENGTH


def requests(tokenizer, items: list[dict], longest: int) -> list[tuple[list[int], int]]:
    """One ``(tokens, continuation length)`` per choice of each item, in item then choice order; ``tokens`` is the
    context and continuation cut from the left to ``longest + 1`` tokens (the last one is only predicted)."""
    out = []
    for item in items:
        context = CONTEXT.format(question=item["question"])
        for choice in item["choices"]:
            ctx, cont = encode_pair(tokenizer, context, DELIMITER + choice)
            if not cont:
                raise ValueError(f"choice {choice!r} of {item['question']!r} encodes to no token")
            if len(cont) > longest:
                raise ValueError(f"choice {choice!r} has {len(cont)} tokens, more than the model's {longest}")
            tokens = ctx + cont
            if len(tokens) > longest + 1:
                logger.warning("a request of %d tokens is cut from the left to %d", len(tokens), longest + 1)
            out.append((tokens[-(longest + 1):], len(cont)))
    return out


def _shared_or_none(model, order, device, mode: str, pad: int, batch_size: int) -> dict | None:
    try:
        return shared_context_scores(model, order, device, mode, pad, batch_size)
    except SharedContextUnsupported as err:
        name = type(model).__name__
        if name not in _PER_REQUEST_MODELS:
            _PER_REQUEST_MODELS.add(name)
            logger.debug("%s scores request by request, each with its whole context: %s", name, err)
        return None


def choice_loglikelihoods(model, tokenizer, items: list[dict], batch_size: int = 16,
                          shared_context: bool = True) -> list[list[float]]:
    """The summed continuation log-likelihood of every choice of every item: ``[item][choice]``.

    Identical requests are scored once, so their scores tie exactly. With ``shared_context`` (the default) each
    distinct context runs once and its choices run against its KV cache, at most ``batch_size`` contexts or choices
    a forward (``choices_forward.shared_context_scores``); a model that cannot share a cache, and any model when
    ``shared_context`` is false, runs every request whole instead, longest first, ``batch_size`` at a time (right
    padding, attention mask). Both give the same scores up to the rounding of the model's dtype, under
    ``torch.inference_mode``, with the model in eval mode (its mode is restored after).
    """
    check_items(items)
    reqs = [(tuple(tokens), n_cont) for tokens, n_cont in requests(tokenizer, items, max_length(model, tokenizer))]
    order = sorted(dict.fromkeys(reqs), key=lambda req: (-len(req[0]), req[0]))
    device = model.get_input_embeddings().weight.device
    mode = keep_mode(model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else prefix_token_id(tokenizer)
    step = max(1, batch_size)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            scores = _shared_or_none(model, order, device, mode, pad, step) if shared_context else None
            if scores is None:
                scores = {}
                for start in range(0, len(order), step):
                    chunk = order[start:start + step]
                    scores.update(zip(chunk, request_scores(model, chunk, device, mode, pad)))
    finally:
        model.train(was_training)
    out, flat = [], iter(reqs)
    for item in items:
        out.append([scores[next(flat)] for _ in item["choices"]])
    return out


def _first_max(values: list[float]) -> int:
    return max(range(len(values)), key=lambda i: (values[i], -i))


def predictions(items: list[dict], loglikelihoods: list[list[float]], metric: str = "acc") -> list[int]:
    """The chosen index of each item: the first highest score (``acc``), or the first highest score per character
    of the choice (``acc_norm``)."""
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; choose from {', '.join(METRICS)}")
    if metric == "acc":
        return [_first_max(lls) for lls in loglikelihoods]
    return [_first_max([ll / len(choice) for ll, choice in zip(lls, item["choices"])])
            for item, lls in zip(items, loglikelihoods)]


def binomial_stderr(accuracy: float, n: int) -> float:
    """Standard error of a mean of ``n`` 0/1 outcomes: sqrt(p (1 - p) / (n - 1)) (lm-eval's ``acc_stderr``);
    NaN for fewer than two items."""
    return math.sqrt(accuracy * (1.0 - accuracy) / (n - 1)) if n > 1 else float("nan")


def score_items(model, tokenizer, items: list[dict], metric: str = "acc", batch_size: int = 16) -> dict:
    """Score multiple-choice ``items``: ``{"acc", "acc_stderr", "n", "metric", "seconds", "predictions",
    "loglikelihoods"}``, where ``acc`` is the accuracy under ``metric`` (``acc`` or ``acc_norm``)."""
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; choose from {', '.join(METRICS)}")
    started = time.perf_counter()
    lls = choice_loglikelihoods(model, tokenizer, items, batch_size)
    preds = predictions(items, lls, metric)
    accuracy = sum(p == item["label"] for p, item in zip(preds, items)) / len(items)
    return {"acc": accuracy, "acc_stderr": binomial_stderr(accuracy, len(items)), "n": len(items),
            "metric": metric, "seconds": time.perf_counter() - started, "predictions": preds,
            "loglikelihoods": lls}
