"""The forwards of the multiple-choice scorer (``evaluation.choices``): which positions the ``lm_head`` projects, the
float32 log-softmax, and the two ways of scoring requests, which give the same numbers.

A request is ``(tokens, n)``: its last ``n`` tokens are the continuation, the tokens before them the context.

- ``request_scores``: one forward per request over all its tokens but the last, right-padded into a batch (what
  lm-eval does).
- ``shared_context_scores``: each distinct context runs once (``batch_size`` contexts a forward, left-padded, with
  explicit position ids), its KV cache is kept (``use_cache=True``), its rows are repeated for the context's
  continuations (``Cache.batch_select_indices``, the cache put back as it was after each forward), and the
  continuations run against it, ``batch_size`` a forward, with the attention mask over context and continuation
  and the positions that follow the context. The first continuation token is scored from the context's last
  position, the only position the context forward projects. A model whose forward takes no cache and position ids,
  or whose cache has layers this cannot copy, or a score that is not finite, raises ``SharedContextUnsupported``:
  the caller then scores the model request by request.
"""

from __future__ import annotations

import inspect

import torch

try:
    from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer
except ImportError:  # a transformers without per-layer caches: the shared path is never taken
    DynamicLayer = DynamicSlidingWindowLayer = None
try:  # the slot of a layer without attention (transformers >= 5.23), which holds nothing
    from transformers.cache_utils import DummyLayer
except ImportError:
    DummyLayer = ()  # no layer is an instance of an empty tuple of classes

#: elements of the float32 log-softmax worked on at once (rows of the kept logits x vocabulary)
LOGPROB_CHUNK = 1 << 25

Request = tuple[tuple[int, ...], int]


class SharedContextUnsupported(RuntimeError):
    """The model cannot score continuations against a shared context cache; score it request by request."""


def _slices_by_mask(slicer) -> bool:
    try:
        kept = slicer(torch.zeros(1, 3, 1), torch.tensor([[False, True, True]]))
    except Exception:  # an older slicer: any failure means no mask support
        return False
    return tuple(kept.shape) == (2, 1)


def keep_mode(model) -> str:
    """How the forward can be told which positions to project: ``mask`` (a per-row boolean ``logits_to_keep``),
    ``positions`` (a 1-D ``logits_to_keep`` shared by the batch) or ``full`` (no ``logits_to_keep``)."""
    forward = type(model).forward
    if "logits_to_keep" not in inspect.signature(forward).parameters:
        return "full"
    slicer = getattr(inspect.unwrap(forward), "__globals__", {}).get("slice_logits_to_keep")
    return "mask" if slicer is not None and _slices_by_mask(slicer) else "positions"


def kept_logits(model, ids: torch.Tensor, mask: torch.Tensor, keep: torch.Tensor, mode: str,
                **extra) -> torch.Tensor:
    """Logits at the ``keep`` positions, row after row: ``ids``, ``keep`` [B, T], ``mask`` [B, S >= T] -> [N, V].
    ``extra`` goes to the forward as well (a cache, position ids); without one the forward keeps no cache."""
    return _forward_kept(model, ids, mask, keep, mode, **extra)[0]


def _forward_kept(model, ids: torch.Tensor, mask: torch.Tensor, keep: torch.Tensor, mode: str, **extra):
    """(logits at the ``keep`` positions [N, V], the forward's output)."""
    args = dict(input_ids=ids, attention_mask=mask, use_cache=False) | extra
    if mode == "mask":
        out = model(**args, logits_to_keep=keep)
        logits = out.logits  # [N, V]
        if logits.ndim != 2 or logits.shape[0] != int(keep.sum()):
            raise RuntimeError(f"logits_to_keep as a mask gave logits of shape {tuple(logits.shape)}")
        return logits, out
    if mode == "positions":
        columns = keep.any(dim=0).nonzero().squeeze(1)  # [K]
        out = model(**args, logits_to_keep=columns)
        return out.logits[keep[:, columns].to(out.logits.device)], out  # [B, K, V] -> [N, V]
    out = model(**args)
    return out.logits[keep.to(out.logits.device)], out  # [B, T, V] -> [N, V]


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) under a float32 log-softmax of each row: ``logits`` [N, V], ``targets`` [N] -> [N] float32,
    a bounded number of rows at a time."""
    rows = max(1, LOGPROB_CHUNK // max(1, logits.shape[-1]))
    out = []
    for start in range(0, logits.shape[0], rows):
        logprobs = torch.log_softmax(logits[start:start + rows].float(), dim=-1)  # [n, V]
        out.append(logprobs.gather(1, targets[start:start + rows, None]).squeeze(1))  # [n]
    return torch.cat(out)


def request_scores(model, batch: list[Request], device, mode: str, pad: int) -> list[float]:
    """Summed continuation log-likelihood of each request of ``batch``, right-padded into one forward."""
    width = max(len(tokens) for tokens, _ in batch) - 1
    ids = torch.full((len(batch), width), pad, dtype=torch.long)  # [B, T]
    mask = torch.zeros((len(batch), width), dtype=torch.long)  # [B, T]
    keep = torch.zeros((len(batch), width), dtype=torch.bool)  # [B, T]: positions that predict a continuation
    targets = []
    for row, (tokens, n_cont) in enumerate(batch):
        length = len(tokens) - 1
        ids[row, :length] = torch.tensor(tokens[:-1], dtype=torch.long)
        mask[row, :length] = 1
        keep[row, length - n_cont:length] = True
        targets.extend(tokens[-n_cont:])
    ids, mask, keep = ids.to(device), mask.to(device), keep.to(device)
    logits = kept_logits(model, ids, mask, keep, mode)  # [N, V]
    logprobs = token_logprobs(logits, torch.tensor(targets, device=logits.device))  # [N]
    sums = torch.split(logprobs.double(), [n_cont for _, n_cont in batch])
    return [float(s.sum()) for s in sums]


# ---------------------------------------------------------------------------------------------------------------
# Shared contexts
# ---------------------------------------------------------------------------------------------------------------
def cache_argument(model) -> str | None:
    """The name under which the forward takes a KV cache (``cache`` or ``past_key_values``), or None where it takes
    none, or no ``position_ids`` or ``use_cache``."""
    params = inspect.signature(type(model).forward).parameters
    name = next((key for key in ("cache", "past_key_values") if key in params), None)
    return name if name and "position_ids" in params and "use_cache" in params else None


def context_groups(requests: list[Request], batch_size: int) -> list[tuple[list[tuple[int, ...]], list[list]]]:
    """The distinct contexts of ``requests`` (longest first) in groups of at most ``batch_size``, each with its
    requests (longest continuation first) in chunks of at most ``batch_size``: ``[(contexts, [[(request, row of
    its context), ...], ...]), ...]``."""
    by_context: dict[tuple[int, ...], list[Request]] = {}
    for tokens, n_cont in requests:
        by_context.setdefault(tuple(tokens[:-n_cont]), []).append((tokens, n_cont))
    contexts = sorted(by_context, key=lambda ctx: (-len(ctx), ctx))
    groups = []
    for start in range(0, len(contexts), batch_size):
        group = contexts[start:start + batch_size]
        reqs = sorted(((req, row) for row, ctx in enumerate(group) for req in by_context[ctx]),
                      key=lambda pair: (-pair[0][1], pair[1]))
        groups.append((group, [reqs[i:i + batch_size] for i in range(0, len(reqs), batch_size)]))
    return groups


def _shareable_layers(cache) -> list:
    """The cache layers that hold states; raises ``SharedContextUnsupported`` for a cache or a layer whose states
    cannot be kept aside, selected by row and put back."""
    layers = getattr(cache, "layers", None)
    if DynamicLayer is None or layers is None or not callable(getattr(cache, "batch_select_indices", None)):
        raise SharedContextUnsupported(f"the forward returned a cache of type {type(cache).__name__}")
    for layer in layers:
        # these two grow by concatenation and slicing, never in place: their attributes are their whole state
        if type(layer) not in (DynamicLayer, DynamicSlidingWindowLayer) and not isinstance(layer, DummyLayer):
            raise SharedContextUnsupported(f"a cache layer of type {type(layer).__name__} cannot be shared")
    return [layer for layer in layers if isinstance(layer, DynamicLayer)]


def _run_contexts(model, contexts: list[tuple[int, ...]], device, mode: str, pad: int):
    """One forward over the contexts, left-padded: (logits at each context's last token [K, V], the cache,
    the padding mask [K, W])."""
    width = max(len(ctx) for ctx in contexts)
    ids = torch.full((len(contexts), width), pad, dtype=torch.long)  # [K, W]
    mask = torch.zeros((len(contexts), width), dtype=torch.long)  # [K, W]
    positions = torch.zeros((len(contexts), width), dtype=torch.long)  # [K, W]
    for row, ctx in enumerate(contexts):
        ids[row, width - len(ctx):] = torch.tensor(ctx, dtype=torch.long)
        mask[row, width - len(ctx):] = 1
        positions[row, width - len(ctx):] = torch.arange(len(ctx))
    keep = torch.zeros((len(contexts), width), dtype=torch.bool)  # [K, W]: the last token of each context
    keep[:, -1] = True
    ids, mask, positions, keep = ids.to(device), mask.to(device), positions.to(device), keep.to(device)
    last, out = _forward_kept(model, ids, mask, keep, mode, position_ids=positions, use_cache=True)  # [K, V]
    cache = out.get("cache")
    cache = out.get("past_key_values") if cache is None else cache  # the field's name before transformers 5.2x
    return last, cache, mask


def _run_continuations(model, cache, cache_name: str, context_mask: torch.Tensor, reqs: list[Request], mode: str,
                       pad: int) -> torch.Tensor:
    """Log-probs of every continuation token after the first, request after request ([sum(n - 1)] float32), the
    continuations (but their last token) right-padded after their contexts' cached rows."""
    width = max(n_cont for _, n_cont in reqs) - 1
    device = context_mask.device
    ids = torch.full((len(reqs), width), pad, dtype=torch.long)  # [R, C]
    keep = torch.zeros((len(reqs), width), dtype=torch.bool)  # [R, C]: real continuation tokens
    targets = []
    for row, (tokens, n_cont) in enumerate(reqs):
        ids[row, :n_cont - 1] = torch.tensor(tokens[-n_cont:-1], dtype=torch.long)
        keep[row, :n_cont - 1] = True
        targets.extend(tokens[len(tokens) - n_cont + 1:])
    ids, keep = ids.to(device), keep.to(device)
    lengths = context_mask.sum(dim=1, keepdim=True)  # [R, 1]
    positions = torch.where(keep, lengths + torch.arange(width, device=device), 0)  # [R, C]
    mask = torch.cat([context_mask, keep.long()], dim=1)  # [R, W + C]
    logits = kept_logits(model, ids, mask, keep, mode, position_ids=positions, use_cache=True,
                         **{cache_name: cache})  # [N, V]
    return token_logprobs(logits, torch.tensor(targets, device=logits.device))  # [N]


def _group_scores(model, contexts, chunks, device, mode: str, pad: int, cache_name: str) -> dict[Request, float]:
    """Scores of the requests of one group of ``context_groups``: one forward over its contexts, then one over each
    chunk of continuations, against the contexts' cache rows (the cache is put back as it was after each)."""
    last, cache, context_mask = _run_contexts(model, contexts, device, mode, pad)
    saved = [(layer, dict(vars(layer))) for layer in _shareable_layers(cache)]
    scores = {}
    for chunk in chunks:
        reqs = [req for req, _ in chunk]
        # the context row of each request, on the CPU (it indexes cache layers on whatever device each one is)
        rows = torch.tensor([row for _, row in chunk])  # [R]
        firsts = torch.tensor([tokens[-n_cont] for tokens, n_cont in reqs], device=last.device)  # [R]
        first = token_logprobs(last[rows.to(last.device)], firsts)  # [R]
        rest = torch.zeros(0, dtype=torch.float32, device=first.device)  # [N]
        if any(n_cont > 1 for _, n_cont in reqs):
            for layer, state in saved:
                vars(layer).update(state)
            cache.batch_select_indices(rows)
            rest = _run_continuations(model, cache, cache_name, context_mask[rows.to(context_mask.device)], reqs,
                                      mode, pad).to(first.device)
        if not (bool(torch.isfinite(first).all()) and bool(torch.isfinite(rest).all())):
            # a padded row's state (a left pad attends to nothing) may have leaked into a real one
            raise SharedContextUnsupported("a shared context gave a log-likelihood that is not finite")
        rests = torch.split(rest, [n_cont - 1 for _, n_cont in reqs])
        scores.update((req, float(torch.cat([first[i:i + 1], tail]).double().sum()))
                      for i, (req, tail) in enumerate(zip(reqs, rests)))
    return scores


def shared_context_scores(model, requests: list[Request], device, mode: str, pad: int,
                          batch_size: int) -> dict[Request, float]:
    """The summed continuation log-likelihood of each request, every distinct context run once and shared by its
    continuations through the KV cache; raises ``SharedContextUnsupported`` for a model that cannot do that (a
    forward without a cache, a cache whose rows cannot be selected, a score that is not finite)."""
    cache_name = cache_argument(model)
    if cache_name is None:
        raise SharedContextUnsupported(f"{type(model).__name__}.forward takes no cache with position ids")
    scores = {}
    for contexts, chunks in context_groups(requests, max(1, batch_size)):
        scores.update(_group_scores(model, contexts, chunks, device, mode, pad, cache_name))
    return scores
