"""The engine's memory accounting: what each method holds at its peak, by the engine's data flow.

From a model's shape (:class:`ModelShape`: hidden size, layers, intermediate size, vocabulary, dtype bytes) and a
calibration size (:class:`CalibrationShape`: rows, tokens, rows per batch), :func:`method_memory` lists the terms a
method holds (:class:`Term`: bytes, where, in which phase, and the assumption behind it) and sums them per place:

- ``device``: the execution device (GPU): the decoder layer onloaded for the stage (once per stage, not per
  batch), one batch of hidden states, the layer's activations for that batch, the method's statistics and solver
  work space, and for methods that need the LM head its weights and one batch of float32 logits;
- ``host``: CPU memory the method holds besides the model's weights and the activation store (e.g. statistics
  kept off the device);
- ``store``: the :class:`~hf_pruning.engine.ActivationStore`: hidden states of all calibration rows, in CPU memory
  or, with a ``store_folder``, on disk (:meth:`MemoryEstimate.parts` puts it in ``host`` or ``disk``).

The model's weights themselves are not counted: they live where the ``device_map`` puts them (GPU, CPU, disk);
with offloading only the layer in work (and the head, where needed) is on the device, which the terms count.

Terms without a phase are held throughout; of the phased ones only the largest phase counts (a solver's work
space and a forward's activations do not coexist). Every figure is an upper estimate of live tensors, not of
allocator caches (PyTorch's CUDA caching allocator can keep more reserved than allocated). The derivation follows
the engine (``capture``/``propagate``/``sequential``: inputs and outputs of the current layer in the store, one
batch on the device) and the per-method design (docs: the sequential engine, issue 23); each term's docstring
text says which assumption it makes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

#: bytes of the accumulators and solvers, whatever the model's dtype
FP32, FP64, INT64, BOOL = 4, 8, 8, 1
#: SparseGPT's batched block solve on CUDA works on chunks of at most this many bytes of triangular systems
SOLVE_CHUNK = 2**28
#: SparseGPT's columns per block (its config's default ``blocksize``)
BLOCK = 128
#: the compensation's shortlisted layers and its most folds (K-fold ridge selection)
SHORTLIST, MAX_FOLDS = 8, 8
#: rows per backward step of the gradient methods (one row at a time, as the layer-wise backward runs)
GRAD_ROWS = 1


@dataclass(frozen=True)
class ModelShape:
    """The sizes of a LLaMA-like decoder. ``heads``/``kv_heads``/``head_dim`` default to a multi-head attention
    with ``head_dim = hidden / heads``; ``dtype_bytes``: 2 for bf16/fp16, 4 for fp32."""

    hidden: int
    layers: int
    intermediate: int
    vocab: int
    dtype_bytes: int = 2
    heads: int = 32
    kv_heads: int | None = None
    head_dim: int | None = None

    @classmethod
    def from_config(cls, config, dtype_bytes: int | None = None) -> ModelShape:
        """The shape of a transformers config (``dtype_bytes`` default: the config's dtype, else 4)."""
        if dtype_bytes is None:
            name = str(getattr(config, "torch_dtype", None) or getattr(config, "dtype", None) or "float32")
            dtype_bytes = 2 if ("16" in name) else 4
        heads = config.num_attention_heads
        return cls(config.hidden_size, config.num_hidden_layers, config.intermediate_size, config.vocab_size,
                   dtype_bytes, heads, getattr(config, "num_key_value_heads", None) or heads,
                   getattr(config, "head_dim", None) or config.hidden_size // heads)

    @property
    def q_width(self) -> int:
        return self.heads * (self.head_dim or self.hidden // self.heads)

    @property
    def kv_width(self) -> int:
        return (self.kv_heads or self.heads) * (self.head_dim or self.hidden // self.heads)

    def linears(self) -> dict[str, tuple[int, int]]:
        """Each decoder linear's ``(out, in)``."""
        d, i = self.hidden, self.intermediate
        return {"q_proj": (self.q_width, d), "k_proj": (self.kv_width, d), "v_proj": (self.kv_width, d),
                "o_proj": (d, self.q_width), "gate_proj": (i, d), "up_proj": (i, d), "down_proj": (d, i)}

    def attention_params(self) -> int:
        return sum(o * n for k, (o, n) in self.linears().items() if k[0] in "qkvo")

    def mlp_params(self) -> int:
        return 3 * self.hidden * self.intermediate

    def layer_params(self) -> int:
        """One decoder layer: its seven linears and two norm gains."""
        return self.attention_params() + self.mlp_params() + 2 * self.hidden

    def layer_bytes(self, dtype_bytes: int | None = None) -> int:
        return self.layer_params() * (dtype_bytes or self.dtype_bytes)

    def head_bytes(self) -> int:
        """The LM head and the final norm."""
        return (self.vocab * self.hidden + self.hidden) * self.dtype_bytes

    def weight_bytes(self) -> int:
        """The whole model (embeddings and an untied LM head included)."""
        return self.layers * self.layer_bytes() + self.vocab * self.hidden * self.dtype_bytes + self.head_bytes()


@dataclass(frozen=True)
class CalibrationShape:
    """``rows`` x ``tokens`` calibration ids, run ``batch_rows`` rows at a time (the engine's ``LAYER_BATCH``).
    ``chunk_rows``: rows a depth search scores together (default ``batch_rows``, what offloaded weights on a GPU
    use; on the CPU a search scores one row at a time, which divides the candidate streams and logits terms)."""

    rows: int = 128
    tokens: int = 2048
    batch_rows: int = 4
    chunk_rows: int | None = None


@dataclass(frozen=True)
class Term:
    """One thing held: ``nbytes`` in ``where`` (``device``, ``host`` or ``store``) during ``phase`` (``""``:
    throughout), with the assumption it rests on in ``why``."""

    name: str
    where: str
    nbytes: int
    why: str = ""
    phase: str = ""


@dataclass
class MemoryEstimate:
    """A method's terms and their peak per place. ``stages`` run one after another (e.g. GradMAP's scores, then
    the compensation): each place's peak is the largest stage's."""

    method: str
    stages: dict[str, list[Term]] = field(default_factory=dict)

    @property
    def terms(self) -> list[Term]:
        return [t for terms in self.stages.values() for t in terms]

    def peak(self, where: str) -> int:
        """Bytes held at the peak in ``where``: per stage, the terms held throughout plus its largest phase."""
        return max((_stage_peak(terms, where) for terms in self.stages.values()), default=0)

    @property
    def device(self) -> int:
        return self.peak("device")

    @property
    def host(self) -> int:
        return self.peak("host")

    @property
    def store(self) -> int:
        return self.peak("store")

    def parts(self, store_on: str = "host") -> dict[str, int]:
        """``{"device", "host", "disk"}`` in bytes, the activation store in ``store_on`` (``host`` or ``disk``)."""
        if store_on not in ("host", "disk"):
            raise ValueError(f"store_on must be 'host' or 'disk', got {store_on!r}")
        host = self.host + (self.store if store_on == "host" else 0)
        return {"device": self.device, "host": host, "disk": self.store if store_on == "disk" else 0}

    def to_dict(self) -> dict:
        return {"method": self.method, "device": self.device, "host": self.host, "store": self.store,
                "stages": {k: [vars(t) for t in terms] for k, terms in self.stages.items()}}


def _stage_peak(terms: list[Term], where: str) -> int:
    held = [t for t in terms if t.where == where]
    phases: dict[str, int] = {}
    for t in held:
        if t.phase:
            phases[t.phase] = phases.get(t.phase, 0) + t.nbytes
    return sum(t.nbytes for t in held if not t.phase) + max(phases.values(), default=0)


# --------------------------------------------------------------------------------------------------------------
# building blocks
# --------------------------------------------------------------------------------------------------------------
def hidden_states(model: ModelShape, calib: CalibrationShape) -> int:
    """H: one copy of the calibration hidden states, rows x tokens x hidden x dtype bytes."""
    return calib.rows * calib.tokens * model.hidden * model.dtype_bytes


def logits_batch(model: ModelShape, calib: CalibrationShape, rows: int | None = None) -> int:
    """One batch of float32 logits ``[b, T, V]``."""
    return (rows or calib.batch_rows) * calib.tokens * model.vocab * FP32


def _layer_terms(model: ModelShape, calib: CalibrationShape, rows: int | None = None, phase: str = "forward",
                 act_bytes: int | None = None) -> list[Term]:
    """The onloaded layer, one batch in and out, and the layer's activations for the batch."""
    b, t, by = rows or calib.batch_rows, calib.tokens, act_bytes or model.dtype_bytes
    width = model.q_width + 2 * model.kv_width + model.hidden + 3 * model.intermediate
    return [
        Term("decoder layer weights", "device", model.layer_bytes(),
             "onloaded once per stage (engine.onloaded); offloaded weights come back to meta after the stage"),
        Term("batch in and out", "device", 2 * b * t * model.hidden * by,
             "one batch [b, T, d] from the store and the layer's output, nothing else of the rows", phase),
        Term("layer activations", "device", b * t * width * by,
             "q, k, v, attention output, gate, up and their product for one batch; SDPA, no [T, T] scores", phase),
    ]


def _store(model: ModelShape, calib: CalibrationShape, copies: float, why: str) -> Term:
    return Term(f"activation store ({copies:g} H)", "store", int(copies * hidden_states(model, calib)), why)


def _io_store(model: ModelShape, calib: CalibrationShape) -> Term:
    return _store(model, calib, 2, "inputs and outputs of the current layer (engine.sequential/propagate)")


def _selection(model: ModelShape, out: int, inp: int, phase: str = "select") -> Term:
    return Term("mask selection of the largest matrix", "device", out * inp * (FP32 + BOOL + INT64),
                "float32 score, boolean mask and int64 sort indices of one [out, in] matrix", phase)


def _largest(model: ModelShape) -> tuple[int, int]:
    return max(model.linears().values(), key=lambda s: s[0] * s[1])


def _head_terms(model: ModelShape, calib: CalibrationShape, batches: float, rows: int | None = None) -> list[Term]:
    return [Term("LM head and final norm", "device", model.head_bytes(),
                 "onloaded while the batch's logits are computed"),
            Term(f"logits ({batches:g} batch)", "device", int(batches * logits_batch(model, calib, rows)),
                 "float32 [b, T, V] of one batch at a time (log-softmax copies counted), never [n, T, V]", "head")]


# --------------------------------------------------------------------------------------------------------------
# the methods
# --------------------------------------------------------------------------------------------------------------
def _magnitude(model, calib):
    return [_layer_terms(model, calib)[0],  # data-free: no batch, no store
            _selection(model, *_largest(model))]


def _staged_stores(model: ModelShape, calib: CalibrationShape, two_pass: bool) -> list[Term]:
    """The staged one-pass schedule's replay stores (methods.masks.layerwise.prune_staged): down_proj's inputs
    ``[b, T, intermediate]`` beside the layer inputs and the attention's outputs (1 H, in the place of the
    outputs in the I/O term: the output pass lets go of each replayed batch as its output comes)."""
    if two_pass:
        return []
    return [_store(model, calib, model.intermediate / model.hidden,
                   "staged schedule: down_proj's inputs, replayed in the output pass (REPLAY_WIDE_TAILS)")]


def _wanda(model, calib, two_pass=False):
    stats = sum(n for _, n in model.linears().values()) * FP32
    why = ("[in] float32 sum of squares per linear, all the layer's at once (statistics from the dense layer)"
           if two_pass else "[in] float32 per linear of the stage in work (staged schedule q/k/v, o, gate/up, down)")
    return [*_layer_terms(model, calib), _io_store(model, calib), *_staged_stores(model, calib, two_pass),
            Term("Wanda statistics", "device", stats, why), _selection(model, *_largest(model))]


def _sparsegpt_solve(model: ModelShape, two_pass: bool) -> int:  # factorisation or sweep (see the Term)
    return max(max(n * n * (FP32 + FP64) + n * 1024 * FP64, n * n * (FP64 + FP32 * two_pass) + o * n * (FP64 + 2 * BOOL))
               for o, n in model.linears().values())


def _sparsegpt(model, calib, two_pass=False):
    d, i, q = model.hidden, model.intermediate, model.q_width
    hessians = (2 * d * d + q * q + i * i) * FP32 if two_pass else max(d * d, q * q, i * i) * FP32
    return [*_layer_terms(model, calib), _io_store(model, calib), *_staged_stores(model, calib, two_pass),
            Term("Hessians", "device", hessians,
                 "[in, in] float32 per linear group (q/k/v and gate/up share one): "
                 + ("the whole layer's" if two_pass else "the stage's group only"), "forward"),
            Term("SparseGPT solve", "device", _sparsegpt_solve(model, two_pass),
                 "largest group: the factorisation (Hessian fp32 + one fp64 [in, in], in place, + [in/2, 1024] "
                 "temporaries) or the sweep (factor + fp64 weight + 2 masks; one-pass frees the Hessian)", "solve"),
            Term("batched block solve chunk", "device", min(SOLVE_CHUNK, max(o for o, _ in model.linears().values())
                                                            * BLOCK * BLOCK * FP64),
                 "CUDA only: triangular systems of one block, chunked (sparsegpt.scoring._block_errors)", "solve")]


def _barber(model, calib):
    o, n = _largest(model)
    mlp_fp32 = model.mlp_params() * FP32
    return [*_layer_terms(model, calib, act_bytes=FP32), _io_store(model, calib),
            _store(model, calib, 2, "the block's sparse-path inputs and outputs (xs, ys) for every row"),
            Term("dense layer copy", "device", model.layer_bytes(FP32),
                 "float32 copy of the layer beside the pruned one (dense reference, one layer)"),
            Term("block gradients", "device", 2 * mlp_fp32,
                 "float32 gradient and its running sum of squares of the MLP block's weights (the larger block)"),
            Term("scores and swap ranks", "device", o * n * (FP32 + 2 * INT64 + 2 * BOOL),
                 "float32 scores, two int64 orders and masks of the largest matrix", "select")]


def _shortgpt(model, calib):
    return [*_layer_terms(model, calib), _io_store(model, calib)]


def _search_store(model: ModelShape, calib: CalibrationShape, keep_every: int) -> Term:
    kept = math.ceil(model.layers / keep_every) + 1
    return _store(model, calib, kept, f"residual stream at the input of every {keep_every}-th layer and the final "
                  "hidden states (DepthRunner stores; keep_every=ceil(sqrt(L)) recomputes in between)")


def _search(model, calib, candidates: int, logit_batches: float, keep_every: int, extra_store: float = 0):
    chunk = calib.chunk_rows or calib.batch_rows
    terms = [*_layer_terms(model, calib), _search_store(model, calib, keep_every),
             Term("candidate streams", "device", candidates * chunk * calib.tokens * model.hidden * model.dtype_bytes,
                  "layer-major per chunk of rows: every candidate's stream of one chunk advances layer by layer"),
             *_head_terms(model, calib, logit_batches, 1)]  # the search scores a chunk one row at a time
    if extra_store:
        terms.append(_store(model, calib, extra_store, "the dense model's final hidden states (reference)"))
    return terms


def _sleb(model, calib, keep_every=1):
    return _search(model, calib, model.layers, 2, keep_every)


def _finercut(model, calib, keep_every=1):
    # one row's reference log-probabilities and one candidate's logits for it (divergences over 64-token slices)
    return _search(model, calib, 2 * model.layers, 2, keep_every, extra_store=1)


def _gradient(model, calib, taylor=False):
    rows = GRAD_ROWS
    terms = [*_layer_terms(model, calib, rows=rows, phase="backward", act_bytes=FP32),
             _store(model, calib, model.layers + 1, "every layer's input (the forward keeps them for the "
                    "layer-by-layer backward) and the final hidden states"),
             Term("hidden-state gradient", "device", 2 * rows * calib.tokens * model.hidden * FP32,
                  "dL/dh of one row flowing down, and the layer's input gradient"),
             *_head_terms(model, calib, 2, rows)]
    if taylor:
        terms.append(Term("weight gradients of one layer", "device", model.layer_bytes(FP32),
                          "float32 .grad of the layer in work, reduced to scalars in that step", "backward"))
    return terms


def _compensation(model, calib):
    d, folds = model.hidden, min(calib.rows, MAX_FOLDS)
    return [*_layer_terms(model, calib),
            _store(model, calib, 5, "dense and pruned streams in and out of the current layer, and the "
                   "contribution of the fitted layer (lockstep passes)"),
            Term("fit statistics", "device", 2 * folds * 2 * d * d * FP64,
                 f"A^T A and B^T A, float64 [d, d] per fold (K = min(rows, {MAX_FOLDS})), on the execution device, "
                 "for two layers at once: the one accumulating (or screened, at the end) and the best so far"),
            Term("kept fit statistics", "store", SHORTLIST * folds * 2 * d * d * FP64,
                 f"the statistics of the (at most {SHORTLIST}) shortlisted layers so far, in the activation store "
                 "(one pass: the shortlist is known only at its end, when they are screened)"),
            Term("ridge solve", "device", 4 * d * d * FP64, "eigendecomposition and projection [d, d] fp64", "solve")]


def _harp(model, calib):
    return [*_layer_terms(model, calib),
            _store(model, calib, 3, "the searched layer's dense input, and the stream in and out of the layer in work"),
            Term("replacement layer", "device", model.layer_bytes(), "a value-only copy of the searched layer"),
            *_head_terms(model, calib, 2, rows=1)]  # the loss runs the head one row at a time


def _streamed_stats(model, calib):
    stats = 3 * (model.q_width + model.intermediate) * FP64
    return [*_layer_terms(model, calib), _io_store(model, calib),
            Term("channel moments", "device", stats, "count, sum and sum of squares, float64, of the o_proj and "
                 "down_proj inputs (FLAP) or per-head input norms (heads)")]


#: method -> its terms ``fn(model, calib)``, or stage name -> terms for methods that run stages one after another
METHODS: dict = {
    "magnitude": _magnitude,
    "wanda": _wanda,
    "wanda_two_pass": lambda m, c: _wanda(m, c, two_pass=True),
    "sparsegpt": _sparsegpt,
    "sparsegpt_two_pass": lambda m, c: _sparsegpt(m, c, two_pass=True),
    "llm_barber": _barber,
    "shortgpt": _shortgpt,
    "sleb": _sleb,
    "finercut": _finercut,
    "gradmap": _gradient,
    "gradmap_compensated": {"gradients": _gradient, "compensation": _compensation},
    "taylor": lambda m, c: _gradient(m, c, taylor=True),
    "harp": _harp,
    "flap": _streamed_stats,
    "heads": _streamed_stats,
}
#: methods that run the LM head on calibration batches
HEAD_METHODS = frozenset({"sleb", "finercut", "gradmap", "gradmap_compensated", "taylor", "harp"})


def method_memory(method: str, model: ModelShape, calib: CalibrationShape | None = None) -> MemoryEstimate:
    """The terms ``method`` (a key of :data:`METHODS`) holds on ``model`` with ``calib`` (default 128 x 2048
    tokens in batches of 4 rows), and their peaks per place."""
    if method not in METHODS:
        raise KeyError(f"no memory accounting for {method!r}; known: {', '.join(METHODS)}")
    calib = calib or CalibrationShape()
    stages = METHODS[method]
    stages = stages if isinstance(stages, dict) else {method: stages}
    return MemoryEstimate(method, {name: fn(model, calib) for name, fn in stages.items()})


def memory_table(model: ModelShape, calib: CalibrationShape | None = None) -> dict[str, MemoryEstimate]:
    """:func:`method_memory` of every method."""
    return {m: method_memory(m, model, calib) for m in METHODS}


#: the shapes the README quotes
LLAMA3_8B = ModelShape(hidden=4096, layers=32, intermediate=14336, vocab=128256, dtype_bytes=2, heads=32, kv_heads=8)
LLAMA3_70B = ModelShape(hidden=8192, layers=80, intermediate=28672, vocab=128256, dtype_bytes=2, heads=64, kv_heads=8)
