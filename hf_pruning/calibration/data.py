"""Token batches for calibration and evaluation, built from plain text with an explicit seed."""

from __future__ import annotations

import json
import logging
import os
from importlib import resources
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

DEFAULT_TEXT_FILE = "northanger_abbey.txt"
#: the embedded text is split once: calibration comes from the first part, evaluation from the rest
DEFAULT_SPLIT = 0.6


class NotEnoughTextError(ValueError):
    """The text holds fewer tokens than the requested samples need (never silently repeated)."""


#: short names for Hub datasets users commonly calibrate on: (path, config, split, text column, data_files)
HUB_DATASETS = {
    "wikitext2": ("wikitext", "wikitext-2-raw-v1", "train", "text", None),
    "c4": ("allenai/c4", None, "train", "text", {"train": "en/c4-train.00000-of-01024.json.gz"}),
}


def _dataset_text(dataset, column: str = "text") -> str:
    """Join the text column of a ``datasets.Dataset`` (or the first split of a ``DatasetDict``)."""
    if hasattr(dataset, "column_names") and isinstance(dataset.column_names, dict):  # DatasetDict
        dataset = dataset[next(iter(dataset.keys()))]
    if column not in dataset.column_names:
        raise ValueError(f"the dataset has no {column!r} column (columns: {dataset.column_names}); pass text_column=")
    return "\n\n".join(t for t in dataset[column] if t)


def _file_text(path: Path, column: str) -> str:
    if not path.exists():
        raise FileNotFoundError(f"calibration/evaluation text file {path} does not exist")
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in (".txt", ".json", ".jsonl"))
        if not files:
            raise FileNotFoundError(f"{path} holds no .txt, .json or .jsonl files")
        return "\n\n".join(_file_text(p, column) for p in files)
    raw = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        rows = [json.loads(line) for line in raw.splitlines() if line.strip()]
    elif path.suffix == ".json":
        data = json.loads(raw)
        rows = data if isinstance(data, list) else [data]
    else:
        rows = None
    if rows is not None:
        try:
            raw = "\n\n".join(str(r[column]) if isinstance(r, dict) else str(r) for r in rows)
        except KeyError:
            raise ValueError(f"{path}: JSON records have no {column!r} field; pass text_column=") from None
    if not raw.strip():
        raise NotEnoughTextError(f"{path} is empty")
    return raw


def load_text(source, text_column: str = "text", split: str | None = None) -> str:
    """Resolve a text source to one string.

    ``source`` may be: a ``datasets.Dataset``/``DatasetDict``; a path (``.txt``, ``.json``, ``.jsonl`` or a
    folder of them); ``"default"``, ``"default:calibration"`` or ``"default:evaluation"`` (the embedded
    text); ``"wikitext2"`` or ``"c4"`` (downloaded from the Hub with ``datasets``); ``"hf:<name>"`` (any Hub
    dataset with a text column). Anything else is an error naming these choices.
    """
    if hasattr(source, "column_names"):
        return _dataset_text(source, text_column)
    if isinstance(source, os.PathLike):
        return _file_text(Path(source), text_column)
    if not isinstance(source, str) or not source.strip():
        raise ValueError(f"empty or unsupported text source {source!r}")
    if source == "default" or source.startswith("default:"):
        return default_text(source.split(":", 1)[1] if ":" in source else "all")
    if source in HUB_DATASETS or source.startswith("hf:"):
        import datasets

        if source in HUB_DATASETS:
            path, name, default_split, column, files = HUB_DATASETS[source]
        else:
            path, name, default_split, column, files = source[3:], None, "train", text_column, None
        ds = datasets.load_dataset(path, name, split=split or default_split, data_files=files)
        return _dataset_text(ds, column)
    path = Path(source)
    if path.suffix in (".txt", ".json", ".jsonl") or path.exists():
        return _file_text(path, text_column)
    raise ValueError(
        f"text source {source!r} is not a file, a folder, 'default[:calibration|:evaluation]', "
        f"{' or '.join(repr(k) for k in HUB_DATASETS)}, or 'hf:<dataset>'; to use a literal string, call "
        "build_calibration(tokenizer, text=...) instead"
    )


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


def build_calibration(tokenizer, text: str | None = None, n_samples: int = 16, seq_len: int = 512, seed: int = 0,
                      source=None, max_length: int | None = None) -> torch.Tensor:
    """``n_samples`` non-overlapping windows of ``seq_len`` tokens, picked at seeded random positions.

    Give the text itself (``text=``) or any source :func:`load_text` accepts (``source=``). Returns a
    LongTensor ``[n_samples, seq_len]``. Raises NotEnoughTextError when the text is too short (it is never
    repeated) and ValueError when ``seq_len`` exceeds ``max_length`` (the model's context).
    """
    if n_samples < 1 or seq_len < 2:
        raise ValueError(f"need n_samples >= 1 and seq_len >= 2, got {n_samples} and {seq_len}")
    _check_length(seq_len, max_length)
    if (text is None) == (source is None):
        raise ValueError("give exactly one of text= (a string) or source= (file, dataset, 'default', ...)")
    ids = tokenize_text(tokenizer, text if text is not None else load_text(source))
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


def _check_length(seq_len: int, max_length: int | None) -> None:
    if max_length is not None and seq_len > max_length:
        raise ValueError(f"seq_len {seq_len} exceeds the model's maximum context of {max_length} tokens; use a shorter seq_len")


def evaluation_windows(tokenizer, text: str, seq_len: int, max_windows: int | None = None,
                       max_length: int | None = None) -> torch.Tensor:
    """Consecutive non-overlapping windows ``[n, seq_len]`` from the start of ``text`` (deterministic)."""
    if seq_len < 2 or (max_windows is not None and max_windows < 1):
        raise ValueError(f"need seq_len >= 2 and max_windows >= 1 (or None for all), got {seq_len} and {max_windows}")
    _check_length(seq_len, max_length)
    ids = tokenize_text(tokenizer, text)
    n = ids.numel() // seq_len
    if max_windows is not None:
        n = min(n, max_windows)
    if n < 1:
        raise NotEnoughTextError(f"the text has {ids.numel()} tokens, fewer than one window of {seq_len}; give more "
                                 "text or use shorter windows (seq_len)")
    return ids[: n * seq_len].view(n, seq_len).clone()
