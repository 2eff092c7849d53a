"""Tiny random models of the supported architectures, built in code (no downloads)."""

from __future__ import annotations

import torch
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

VOCAB = 96
ARCHS = ("llama", "mistral", "qwen2", "gemma2", "opt", "opt_postln")
#: architectures added by the recipe in docs (q/k norms; Gemma3's sliding and global layers): tests/test_new_archs.py
#: runs them through every method, save, reload and the oldest transformers
NEW_ARCHS = ("qwen3", "gemma3")


def tiny_config(arch: str):
    common = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=6, num_attention_heads=8,
                  max_position_embeddings=256, initializer_range=0.08, pad_token_id=0, bos_token_id=1,
                  eos_token_id=2)
    if arch == "llama":
        return LlamaConfig(**common, intermediate_size=96, num_key_value_heads=4, tie_word_embeddings=True)
    if arch == "mistral":
        return MistralConfig(**common, intermediate_size=96, num_key_value_heads=2, sliding_window=7)
    if arch == "qwen2":
        return Qwen2Config(**common, intermediate_size=96, num_key_value_heads=4)
    if arch == "gemma2":
        return Gemma2Config(**common, intermediate_size=96, num_key_value_heads=4, head_dim=16, sliding_window=6,
                            query_pre_attn_scalar=16, final_logit_softcapping=30.0, attn_logit_softcapping=50.0)
    if arch == "qwen3":
        return Qwen3Config(**common, intermediate_size=96, num_key_value_heads=4, head_dim=8)
    if arch == "gemma3":  # layers 0-2 and 4 sliding, 3 and 5 global
        return Gemma3TextConfig(**common, intermediate_size=96, num_key_value_heads=4, head_dim=16, sliding_window=6,
                                query_pre_attn_scalar=16, layer_types=["sliding_attention"] * 3 + ["full_attention"]
                                + ["sliding_attention", "full_attention"])
    if arch in ("opt", "opt_postln"):
        common.pop("max_position_embeddings")
        return OPTConfig(**common, ffn_dim=96, max_position_embeddings=256, word_embed_proj_dim=64,
                         do_layer_norm_before=(arch == "opt"), enable_bias=True)
    raise ValueError(arch)


MODEL_CLASSES = {
    "llama": LlamaForCausalLM,
    "mistral": MistralForCausalLM,
    "qwen2": Qwen2ForCausalLM,
    "gemma2": Gemma2ForCausalLM,
    "opt": OPTForCausalLM,
    "opt_postln": OPTForCausalLM,
    "qwen3": Qwen3ForCausalLM,
    "gemma3": Gemma3ForCausalLM,
}


def tiny_model(arch: str, seed: int = 0, attn: str = "sdpa"):
    """A tiny random model in eval mode; norm gains and biases are randomised so no op is trivially exact."""
    config = tiny_config(arch)
    config._attn_implementation = "eager" if arch == "gemma2" else attn  # Gemma2 has no SDPA path
    return _build(arch, config, seed)


def _build(arch: str, config, seed: int):
    torch.manual_seed(seed)
    model = MODEL_CLASSES[arch](config).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:  # norm gains and biases
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model


def tokens(batch: int = 2, length: int = 12, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, length), generator=g)


def tiny_tokenizer():
    """A word-level tokenizer with VOCAB entries (the most frequent words of the embedded text), built offline."""
    from collections import Counter

    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from hf_pruning.calibration import default_text

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    words = Counter(default_text("calibration")[:200_000].split())
    vocab = {tok: i for i, tok in enumerate(specials)}
    for word, _ in words.most_common(VOCAB - len(specials)):
        vocab[word] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


#: the vocabulary of the byte-level tokenizer of the export tests (256 bytes, merges and one special token)
BPE_VOCAB = 320


def tiny_bpe_tokenizer():
    """A byte-level BPE tokenizer (GPT-2 style, as LLaMA-3/Qwen2/SmolLM2 use) of BPE_VOCAB tokens, trained offline
    on the embedded text: what a GGUF file can carry (the word-level ``tiny_tokenizer`` it cannot)."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    from hf_pruning.calibration import default_text

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([default_text("calibration")[:50_000]], vocab_size=BPE_VOCAB,
                            special_tokens=["<|endoftext|>"], show_progress=False)
    return PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>",
                                   bos_token="<|endoftext|>")


def tiny_export_model(arch: str, seed: int = 0, **sizes):
    """A tiny random model with BPE_VOCAB embeddings (and no sliding window, as llama.cpp's LLaMA graph has none);
    ``sizes`` override config fields (vLLM's CPU attention needs head sizes of 32 and more)."""
    config = tiny_config(arch)
    config.vocab_size = BPE_VOCAB
    if arch == "mistral":
        config.sliding_window = None
    for key, value in sizes.items():
        setattr(config, key, value)
    config._attn_implementation = "sdpa"
    return _build(arch, config, seed)
