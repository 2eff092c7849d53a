"""One check of token ids given to a method or to recovery, run before anything changes the model."""

from __future__ import annotations

import torch

#: how the messages tell users to build valid ids
BUILD_HINT = ("build them with hf_pruning.calibration.build_calibration(tokenizer, source=\"default:calibration\", "
              "n_samples=16, seq_len=512) (a LongTensor [n_samples, seq_len] of the model's own tokenizer)")


class CalibrationError(ValueError):
    """Token ids (calibration or training data) that cannot be used: wrong type, shape, dtype or values."""


def _vocab_size(model) -> int | None:
    """Rows of the input embedding (what an id indexes), else ``config.vocab_size``."""
    get = getattr(model, "get_input_embeddings", None)
    embedding = get() if callable(get) else None
    rows = getattr(embedding, "num_embeddings", None)
    if rows is None:
        rows = getattr(getattr(model, "config", None), "vocab_size", None)
    return int(rows) if rows is not None else None


def _context(model) -> int | None:
    value = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return int(value) if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def check_calibration(model, ids, name: str = "calibration", min_tokens: int = 2) -> torch.Tensor:
    """Check token ids for ``model`` and return them as a LongTensor ``[n_samples, seq_len]``.

    Accepts a 2-D integer tensor with at least one row of at least ``min_tokens`` tokens (2 by default: a
    next-token loss needs a pair), at most ``max_position_embeddings`` tokens per row, and every id in
    ``[0, vocab_size)``. Anything else raises :class:`CalibrationError` naming ``name``, what is wrong and how
    to build valid ids. Integer dtypes other than int64 are converted (without a copy when already int64).
    """
    what = f"{name} must be token ids, a torch.LongTensor [n_samples, seq_len]"
    if ids is None:
        raise CalibrationError(f"{name} is missing: {what}; {BUILD_HINT}")
    if isinstance(ids, (str, bytes)):
        raise CalibrationError(f"{name} is text ({type(ids).__name__}), but {what}; tokenize it first: {BUILD_HINT}, "
                               "or build_calibration(tokenizer, text=...) for your own text")
    if not isinstance(ids, torch.Tensor):
        hint = ""
        if isinstance(ids, (list, tuple)):
            hint = " (rows of equal length convert with torch.tensor(rows, dtype=torch.long))"
        raise CalibrationError(f"{name} is a {type(ids).__name__}, but {what}{hint}; {BUILD_HINT}")
    if ids.dtype == torch.bool or ids.dtype.is_floating_point or ids.dtype.is_complex:
        raise CalibrationError(f"{name} has dtype {ids.dtype}, but {what}: integer token ids, not embeddings, "
                               f"scores or masks; {BUILD_HINT}")
    if ids.ndim != 2:
        hint = " (one row: add the batch dimension with ids[None])" if ids.ndim == 1 else ""
        raise CalibrationError(f"{name} has shape {tuple(ids.shape)}, but {what}{hint}; {BUILD_HINT}")
    n, t = ids.shape
    if n < 1 or t < min_tokens:
        raise CalibrationError(f"{name} has shape {tuple(ids.shape)}: {n} row(s) of {t} token(s), but it needs at least "
                               f"1 row of at least {min_tokens} tokens; {BUILD_HINT}")
    context = _context(model)
    if context is not None and t > context:
        raise CalibrationError(f"{name} rows have {t} tokens, more than the model's context of {context} "
                               f"(max_position_embeddings); build rows of at most {context} tokens, e.g. "
                               f"hf_pruning.calibration.build_calibration(tokenizer, source=\"default:calibration\", "
                               f"n_samples=16, seq_len={min(context, 512)})")
    vocab = _vocab_size(model)
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or (vocab is not None and high >= vocab):
        bad = int(((ids < 0) | (ids >= vocab)).sum()) if vocab is not None else int((ids < 0).sum())
        raise CalibrationError(f"{name} has {bad} id(s) outside [0, {vocab}) (the model's vocabulary): they range "
                               f"from {low} to {high}. Tokenize with the model's own tokenizer; {BUILD_HINT}")
    return ids if ids.dtype == torch.long else ids.long()
