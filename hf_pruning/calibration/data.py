"""Token batches for calibration and evaluation, built from plain text with an explicit seed."""

from __future__ import annotations

import logging
from importlib import resources

import torch

logger = logging.getLogger(__name__)

DEFAULT_TEXT_FILE = "northanger_abbey.txt"
#: the embedded text is split once: calibration comes from the first part, evaluation from the rest
DEFAULT_SPLIT = 0.6


class NotEnoughTextError(ValueError):
    """The text holds fewer tokens than the requested samples need (never silently repeated)."""


def default_text(split: str = "all") -> str:
    """The embedded public-domain text (see hf_pruning/data/PROVENANCE.md).

    ``split`` is ``"calibration"`` (first 60%), ``"evaluation"`` (last 40%) or ``"all"``.
    """
    text = resources.files("hf_pruning").joinpath("data", DEFAULT_TEXT_FILE).read_text(encoding="utf-8")
    cut = int(len(text) * DEFAULT_SPLIT)
    if split == "calibration":
        return text[:cut]
    if split == "evaluation":
        return text[cut:]
    if split == "all":
        return text
    raise ValueError(f"split must be 'calibration', 'evaluation' or 'all', got {split!r}")


def tokenize_text(tokenizer, text: str) -> torch.Tensor:
    """All token ids of ``text`` as one LongTensor ``[n_tokens]`` (no special tokens)."""
    if not text or not text.strip():
        raise NotEnoughTextError("the text is empty; give a non-empty string or file")
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def build_calibration(tokenizer, text: str, n_samples: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    """``n_samples`` non-overlapping windows of ``seq_len`` tokens, picked at seeded random positions.

    Returns a LongTensor ``[n_samples, seq_len]``. Raises NotEnoughTextError when the text is too short.
    """
    if n_samples < 1 or seq_len < 2:
        raise ValueError(f"need n_samples >= 1 and seq_len >= 2, got {n_samples} and {seq_len}")
    ids = tokenize_text(tokenizer, text)
    slots = ids.numel() // seq_len
    if slots < n_samples:
        raise NotEnoughTextError(
            f"the text has {ids.numel()} tokens: room for {slots} windows of {seq_len}, but {n_samples} were "
            "requested; give more text, fewer samples or shorter windows"
        )
    g = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(slots, generator=g)[:n_samples].sort().values  # [n_samples]
    windows = ids[: slots * seq_len].view(slots, seq_len)  # [slots, seq_len]
    return windows[chosen].clone()


def evaluation_windows(tokenizer, text: str, seq_len: int, max_windows: int | None = None) -> torch.Tensor:
    """Consecutive non-overlapping windows ``[n, seq_len]`` from the start of ``text`` (deterministic)."""
    ids = tokenize_text(tokenizer, text)
    n = ids.numel() // seq_len
    if max_windows is not None:
        n = min(n, max_windows)
    if n < 1:
        raise NotEnoughTextError(f"the text has {ids.numel()} tokens, fewer than one window of {seq_len}")
    return ids[: n * seq_len].view(n, seq_len).clone()
