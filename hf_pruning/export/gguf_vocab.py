"""The tokenizer inside a GGUF file, from a Hugging Face fast tokenizer, with the ``gguf`` package's own readers.

Byte-level BPE tokenizers (GPT-2 style: LLaMA-3, Qwen2, SmolLM2) are written as llama.cpp's ``gpt2`` model with
its pre-tokenizer named from the tokenizer's split rule; SentencePiece-style BPE with byte fallback (LLaMA-2,
Mistral) as llama.cpp's ``llama`` model. Merges, special tokens and the chat template come from
``gguf.SpecialVocab``. Other tokenizer kinds are refused.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path

from .blocks import ExportError

logger = logging.getLogger(__name__)

#: pre-tokenizer split rules llama.cpp implements, by the regex a tokenizer.json carries -> llama.cpp's name
_SPLIT_RULES = {
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+":
        "llama-bpe",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+":
        "qwen2",
}


def pre_tokenizer_name(tokenizer_json: dict) -> str:
    """llama.cpp's name for the pre-tokenizer of a byte-level BPE ``tokenizer.json`` (``"default"`` if unknown)."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits"):
        return "smollm"
    for s in steps:
        regex = (s.get("pattern") or {}).get("Regex") if s.get("type") == "Split" else None
        if regex in _SPLIT_RULES:
            return _SPLIT_RULES[regex]
    return "default"


def _load_tokenizer(tokenizer):
    if tokenizer is None:
        raise ExportError("a GGUF file carries its tokenizer: pass tokenizer=... (a transformers fast tokenizer, or "
                          "the folder or Hub name to load one from)")
    if not getattr(tokenizer, "is_fast", False):
        raise ExportError(f"{type(tokenizer).__name__} is a slow tokenizer; the GGUF export reads tokenizer.json: "
                          "load the tokenizer with use_fast=True")
    return tokenizer


def add_vocabulary(writer, tokenizer, vocab_size: int) -> str:
    """Add the tokenizer keys to a ``GGUFWriter``; pads the token list to ``vocab_size`` (the embedding rows)
    with unused tokens. Returns a one-line description for the card."""
    import gguf
    from gguf.vocab import BpeVocab, LlamaHfVocab, SpecialVocab

    tokenizer = _load_tokenizer(tokenizer)
    with tempfile.TemporaryDirectory(prefix="hf_pruning_vocab_") as tmp:
        tokenizer.save_pretrained(tmp)
        tokenizer_json = json.loads((Path(tmp) / "tokenizer.json").read_text(encoding="utf-8"))
        model = tokenizer_json.get("model", {})
        if model.get("type") != "BPE":
            raise ExportError(f"the tokenizer is a {model.get('type')!r} model; the GGUF export writes BPE "
                              "tokenizers (byte-level like LLaMA-3/Qwen2, or with byte fallback like LLaMA-2/Mistral)")
        if model.get("byte_fallback"):
            vocab, pre = LlamaHfVocab(Path(tmp)), None
        else:
            try:
                vocab = BpeVocab(Path(tmp))
            except FileNotFoundError as e:
                raise ExportError(f"the BPE tokenizer is neither byte-level nor byte-fallback ({e})") from e
            pre = pre_tokenizer_name(tokenizer_json)
            if pre == "default":
                logger.warning("unknown pre-tokenizer %s: written as llama.cpp's 'default', which may split text "
                               "differently", json.dumps(tokenizer_json.get("pre_tokenizer"))[:200])
        tokens, scores, types = [], [], []
        for text, score, kind in vocab.all_tokens():
            tokens.append(text)
            scores.append(score)
            types.append(kind)
        if len(tokens) > vocab_size:
            raise ExportError(f"the tokenizer has {len(tokens)} tokens but the model only {vocab_size} embeddings: "
                              "this tokenizer does not belong to this model")
        for i in range(len(tokens), vocab_size):
            tokens.append(f"[PAD{i}]".encode())
            scores.append(-1000.0)
            types.append(gguf.TokenType.UNUSED)
        writer.add_tokenizer_model(vocab.tokenizer_model)
        if pre is not None:
            writer.add_tokenizer_pre(pre)
        writer.add_token_list(tokens)
        writer.add_token_scores(scores)
        writer.add_token_types(types)
        SpecialVocab(Path(tmp), load_merges=pre is not None, n_vocab=len(tokens)).add_to_gguf(writer, quiet=True)
    return f"{vocab.tokenizer_model} tokenizer, {len(tokens)} tokens" + (f", pre-tokenizer {pre}" if pre else "")
