"""Inference speed and size: prefill/decode tokens per second, KV-cache bytes, parameters, FLOPs per token.

Absolute tokens/s depend on the machine and its load; compare a pruned model with its dense model measured
in the same process (``compare_speed``), interleaving the two so that drifting load hits both alike.
"""

from __future__ import annotations

import inspect
import statistics
import time

import torch

from ..remote.hf_pruning_surgery import inspect_model, simulate_plan


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


def _state_flops(states, head_params: int, context: int) -> float:
    """Forward FLOPs per token of decoder layers in ``states`` plus an LM head of ``head_params`` weights."""
    macs = 0
    for s in states:
        d, hd = s.hidden, s.head_dim
        if s.attention == "full":
            macs += d * hd * (2 * s.q_heads + 2 * s.kv_heads)  # q, k, v, o
            macs += 2 * s.q_heads * hd * (context / 2)  # q.k and a.v over the cached context
        elif s.attention == "value_only":
            macs += 2 * d * s.kv_heads * hd  # v, fused o
        if s.mlp == "full":
            macs += (s.n_mlp_in + 1) * d * s.mlp_width
    return 2.0 * (macs + head_params)


def _head_params(model) -> int:
    head = model.get_output_embeddings()
    return head.weight.numel() if head is not None else 0


def flops_per_token(model, context: int = 2048) -> float:
    """Forward FLOPs per token: 2 x multiply-adds of every decoder linear and the LM head, plus attention
    scores and weighted values at the average causal context ``context / 2``."""
    return _state_flops(inspect_model(model), _head_params(model), context)


PARTS = ("qk", "vo", "mlp")


def part_params(states, which: str) -> int:
    """Decoder parameters in one part of the layers ``states``: ``qk`` (query/key projections and biases), ``vo``
    (value and output projections, the value bias; the fused pair of a value-only layer) or ``mlp``."""
    n = 0
    for s in states:
        d, hd = s.hidden, s.head_dim
        if which == "qk" and s.attention == "full":
            n += d * hd * (s.q_heads + s.kv_heads) + ((s.q_heads + s.kv_heads) * hd if s.qkv_bias else 0)
        elif which == "vo" and s.attention == "full":
            n += d * hd * (s.kv_heads + s.q_heads) + (s.kv_heads * hd if s.qkv_bias else 0)
        elif which == "vo" and s.attention == "value_only":
            n += 2 * d * hd * s.kv_heads + (s.kv_heads * hd if s.qkv_bias else 0)
        elif which == "mlp" and s.mlp == "full":
            n += (s.n_mlp_in + 1) * s.hidden * s.mlp_width
    return n


def accounting(model, plan=None, context: int = 2048) -> dict:
    """What ``plan`` saves on ``model`` (or, without a plan, nothing yet), computed from layer shapes.

    Decoder-layer parameters removed (total and by part: query/key projections, value/output paths, MLP
    channels), KV-cache bytes per token removed, and forward FLOPs per token at ``context`` tokens (attention
    over the average causal context ``context / 2``) before and after.
    """
    before = inspect_model(model)
    after = simulate_plan(model, plan) if plan is not None else before

    total = sum(s.num_params() for s in before)
    kv0 = sum(s.kv_bytes_per_token(2) for s in before)
    head = _head_params(model)
    f0, f1 = _state_flops(before, head, context), _state_flops(after, head, context)
    removed = total - sum(s.num_params() for s in after)
    return {
        "decoder_params": total,
        "params_removed": removed,
        "params_removed_fraction": removed / total if total else 0.0,
        "removed_by_part": {k: part_params(before, k) - part_params(after, k) for k in PARTS},
        "kv_removed_fraction": 1 - sum(s.kv_bytes_per_token(2) for s in after) / kv0 if kv0 else 0.0,
        "context": context,
        "flops_per_token_before": f0,
        "flops_per_token_after": f1,
        "flops_ratio": f1 / f0,
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
