"""Inference speed: prefill/decode tokens per second and KV-cache bytes, measured (``hf_pruning.accounting``
predicts parameters and FLOPs per token from shapes).

Absolute tokens/s depend on the machine and its load; compare a pruned model with its dense model measured
in the same process (``compare_speed``), interleaving the two so that drifting load hits both alike.
"""

from __future__ import annotations

import inspect
import statistics
import time

import torch

from ..accounting import flops_per_token


def _ids(model, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(10, model.config.vocab_size, (1, n), generator=g).to(next(model.parameters()).device)


def _cache_kwarg(model) -> str:
    """transformers renamed ``past_key_values`` to ``cache`` (5.24 warns about the old name)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _output_cache(out):
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def kv_cache_bytes(cache) -> int:
    """Bytes of key/value tensors a cache holds (layers without storage count zero)."""
    total = 0
    for layer in getattr(cache, "layers", []):
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


@torch.no_grad()
def measure_speed(model, prefill_tokens: int = 2048, decode_tokens: int = 128, seed: int = 0) -> dict:
    """One timed prefill of ``prefill_tokens`` and ``decode_tokens`` greedy one-token steps with the cache."""
    model.eval()
    ids = _ids(model, prefill_tokens, seed)
    start = time.perf_counter()
    out = model(ids, use_cache=True)
    prefill_s = time.perf_counter() - start
    name = _cache_kwarg(model)
    cache = _output_cache(out)
    kv_bytes = kv_cache_bytes(cache)
    token = out.logits[:, -1:].argmax(-1)  # [1, 1]
    start = time.perf_counter()
    for _ in range(decode_tokens):
        out = model(token, use_cache=True, **{name: cache})
        cache = _output_cache(out)
        token = out.logits[:, -1:].argmax(-1)
    decode_s = time.perf_counter() - start
    return {
        "prefill_tok_s": prefill_tokens / prefill_s,
        "decode_tok_s": decode_tokens / decode_s,
        "kv_bytes_per_token": kv_bytes / prefill_tokens,
    }


def compare_speed(dense, pruned, prefill_tokens: int = 2048, decode_tokens: int = 128, repeats: int = 3,
                  seed: int = 0) -> dict:
    """Pruned-over-dense ratios measured in this process, interleaved, median of ``repeats`` (after a warm-up)."""
    measure_speed(dense, 64, 4, seed)  # warm-up: allocator, kernels
    measure_speed(pruned, 64, 4, seed)
    runs = {"dense": [], "pruned": []}
    for _ in range(repeats):
        runs["dense"].append(measure_speed(dense, prefill_tokens, decode_tokens, seed))
        runs["pruned"].append(measure_speed(pruned, prefill_tokens, decode_tokens, seed))

    def median(which, key):
        return statistics.median(r[key] for r in runs[which])

    out = {}
    for key in ("prefill_tok_s", "decode_tok_s", "kv_bytes_per_token"):
        out[f"dense_{key}"], out[f"pruned_{key}"] = median("dense", key), median("pruned", key)
    out["prefill_speedup"] = out["pruned_prefill_tok_s"] / out["dense_prefill_tok_s"]
    out["decode_speedup"] = out["pruned_decode_tok_s"] / out["dense_decode_tok_s"]
    dense_kv = out["dense_kv_bytes_per_token"]
    out["kv_removed"] = 1 - out["pruned_kv_bytes_per_token"] / dense_kv if dense_kv else None
    out["ideal_speedup"] = flops_per_token(dense, prefill_tokens) / flops_per_token(pruned, prefill_tokens)
    return out
