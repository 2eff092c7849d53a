"""Writing a pruned model as one GGUF file for llama.cpp (and everything built on it: ollama, LM Studio).

A model whose layers all keep their original shapes is written as llama.cpp's stock architecture (``llama``
for LLaMA and Mistral, ``qwen2`` for Qwen2). Anything else is written as ``deci``, llama.cpp's architecture with
per-layer query heads, KV heads and MLP widths (``head_count``, ``head_count_kv`` and ``feed_forward_length`` as
arrays). How each block maps (see docs/SERVING.md for the table):

- full attention: per-layer ``head_count``/``head_count_kv`` (zero padding heads of an uneven head removal are
  kept as they are: exact);
- value-only attention: ``head_count > 0`` with ``head_count_kv = 0`` is llama.cpp's linear attention,
  ``attn_output . attn_norm(x)``, with ``attn_output = W_o W_v`` (d x d); exact, but llama.cpp applies no bias
  there, so a value-only layer with a v or o bias (Qwen2) is refused;
- no attention: ``head_count = 0``, except in the first written layer, whose head count sets llama.cpp's
  defaults: there it is a linear attention with an all-zero ``attn_output`` (exact, d x d padding);
- MLP widths: any width; for Q8_0 a width that is not a multiple of 32 is padded with zero channels (exact);
- no MLP: llama.cpp's ``deci`` graph drops a layer's attention output when ``feed_forward_length`` is 0, so a
  dropped MLP is a 32-wide all-zero MLP (exact: silu(0) * 0 = 0);
- both sublayers gone: the layer is not written at all.

The file is written tensor by tensor (the header first, from shapes alone), reading one decoder layer of the
model at a time, into a temporary name that is renamed into place when complete.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .blocks import Block, ExportError, ModelSpec, block_tensors, model_tensors

logger = logging.getLogger(__name__)

#: outtype -> (tensor type of 2-D weights, llama.cpp file type)
OUTTYPES = ("f32", "f16", "bf16", "q8_0")
#: the width of the all-zero MLP standing in for a dropped one (one Q8_0 block)
ZERO_MLP_WIDTH = 32


@dataclass(frozen=True)
class Tensor:
    """One tensor of the file: its GGUF name, numpy shape (``[out, in]``), type, and where its data comes from."""

    name: str
    shape: tuple[int, ...]
    qtype: object  # gguf.GGMLQuantizationType
    group: object  # "embed" | "final" | "rope" | a Block
    key: str | None  # the block_tensors / model_tensors key; None for an all-zero tensor
    heads: int = 0  # > 0: permute rows for llama.cpp's rotary layout, this many heads

    @property
    def nbytes(self) -> int:
        import gguf

        block, type_size = gguf.GGML_QUANT_SIZES[self.qtype]
        return math.prod(self.shape[:-1]) * self.shape[-1] // block * type_size


@dataclass
class Layout:
    """Everything decided before a byte is written: architecture, per-layer values, tensors and notes."""

    arch: str
    blocks: list[Block]  # the blocks written, in order (identity blocks left out)
    head_count: list[int]
    head_count_kv: list[int]
    ffn_length: list[int]
    tensors: list[Tensor]
    notes: list[str]  # what was padded or left out, for the card and the report
    tokenizer: str = ""  # a one-line description of the tokenizer written

    def num_params(self) -> int:
        """Parameters in the file (zero padding included)."""
        return sum(math.prod(t.shape) for t in self.tensors)


def _weight_type(outtype: str, shape: tuple[int, ...]):
    """The type of a weight: 1-D tensors stay F32; Q8_0 needs a row length that is a multiple of 32 (else F16)."""
    import gguf

    T = gguf.GGMLQuantizationType
    if len(shape) == 1 or outtype == "f32":
        return T.F32
    if outtype == "q8_0":
        return T.Q8_0 if shape[-1] % 32 == 0 else T.F16
    return {"f16": T.F16, "bf16": T.BF16}[outtype]


def _attention_tensors(add, spec: ModelSpec, b: Block, i: int, p: str, notes: list) -> tuple[int, int]:
    """List the attention tensors of written layer ``i`` (via ``add``); returns its (head_count, head_count_kv)."""
    d, hd = spec.hidden, spec.head_dim
    if b.attention == "full":
        add(p + "attn_norm.weight", (d,), b, "attn_norm")
        for name, key, rows, heads in (("attn_q", "q", b.q_heads * hd, b.q_heads),
                                       ("attn_k", "k", b.kv_heads * hd, b.kv_heads),
                                       ("attn_v", "v", b.kv_heads * hd, 0)):
            add(p + name + ".weight", (rows, d), b, key, heads)
            if b.qkv_bias:
                add(p + name + ".bias", (rows,), b, key + "_bias", heads)
        add(p + "attn_output.weight", (d, b.q_heads * hd), b, "o")
        if b.o_bias:
            add(p + "attn_output.bias", (d,), b, "o_bias")
        return b.q_heads, b.kv_heads
    if b.attention == "linear" or i == 0:
        if b.attention == "linear" and (b.qkv_bias or b.o_bias):
            raise ExportError(
                f"layer {b.source}: value_only_attention with a bias (v_proj or o_proj) cannot be written to "
                "GGUF: llama.cpp's linear attention applies no bias. Formats that carry it: the transformers "
                "checkpoint (model.save_pretrained)")
        zero = b.attention == "none"
        add(p + "attn_norm.weight", (d,), b, None if zero else "attn_norm")
        add(p + "attn_output.weight", (d, d), b, None if zero else "linear")
        if zero:
            notes.append(f"layer {b.source}: no attention, written as a zero linear attention (d x d = {d * d} "
                         "parameters of padding) because llama.cpp takes its head size from the first layer")
        elif d * d > 2 * d * b.kv_heads * hd:
            notes.append(f"layer {b.source}: value-only attention as one d x d matrix, {d * d - 2 * d * b.kv_heads * hd} "
                         "parameters more than the model's v_proj and o_proj (llama.cpp's linear attention)")
        return spec.num_heads, 0
    return 0, 0


def _mlp_tensors(add, spec: ModelSpec, b: Block, p: str, outtype: str, notes: list) -> int:
    """List the MLP tensors of a written layer (via ``add``); returns its feed_forward_length."""
    d, width = spec.hidden, b.mlp_width
    if outtype == "q8_0" and width % 32:  # zero channels, so that ffn_down's rows quantize (exact)
        padded = -(-width // 32) * 32
        notes.append(f"layer {b.source}: MLP width {width} padded to {padded} with zero channels for Q8_0")
        width = padded
    if width == 0:
        width = ZERO_MLP_WIDTH
        notes.append(f"layer {b.source}: no MLP, written as a {width}-wide all-zero MLP ({3 * width * d} parameters "
                     "of padding; llama.cpp drops the attention of a layer without MLP)")
    real = b.mlp_width > 0
    add(p + "ffn_norm.weight", (d,), b, "mlp_norm" if real else None)
    for name, key, shape in (("ffn_gate", "gate", (width, d)), ("ffn_up", "up", (width, d)),
                             ("ffn_down", "down", (d, width))):
        add(p + name + ".weight", shape, b, key if real else None)
        if real and (b.mlp_out_bias if key == "down" else b.mlp_in_bias):
            add(p + name + ".bias", shape[:1], b, key + "_bias")
    return width


def plan_layout(spec: ModelSpec, outtype: str) -> Layout:
    """Decide how every block is written (or refuse), from shapes alone."""
    import gguf

    T = gguf.GGMLQuantizationType
    if outtype not in OUTTYPES:
        raise ExportError(f"unknown GGUF outtype {outtype!r}; choose one of {', '.join(OUTTYPES)}")
    kind = spec.rope_scaling and spec.rope_scaling.get("rope_type", spec.rope_scaling.get("type"))
    if kind not in (None, "linear", "llama3"):
        raise ExportError(f"rope scaling {kind!r} is not supported by the GGUF export (default, linear and llama3 "
                          "are); serve this model in transformers or vLLM")
    arch = ("qwen2" if spec.arch == "qwen2" else "llama") if spec.uniform else "deci"
    d, notes = spec.hidden, []
    if spec.sliding_window:
        notes.append(f"the sliding window ({spec.sliding_window} tokens) is not expressed: context_length is set to it "
                     "(exact up to that many tokens)")
    written = [b for b in spec.blocks if not b.is_identity]
    if not written:
        raise ExportError("every decoder layer of this model is empty (no attention, no MLP): nothing to export")
    if len(written) < len(spec.blocks):
        notes.append(f"layers {[b.source for b in spec.blocks if b.is_identity]} have neither attention nor MLP and "
                     "are left out")
    tensors = [Tensor("token_embd.weight", (spec.vocab_size, d), _weight_type(outtype, (1, d)), "embed", "embed")]
    if kind == "llama3":
        tensors.append(Tensor("rope_freqs.weight", (spec.head_dim // 2,), T.F32, "rope", "rope"))
    permute = arch != "qwen2"  # llama.cpp's llama/deci graphs use interleaved rotary pairs; qwen2 uses halves

    def add(name, shape, group, key, heads=0):
        qtype = _weight_type(outtype, shape) if len(shape) == 2 else T.F32
        tensors.append(Tensor(name, tuple(shape), qtype, group, key, heads if permute else 0))

    head_count, head_count_kv, ffn_length = [], [], []
    for i, b in enumerate(written):
        heads, kv = _attention_tensors(add, spec, b, i, f"blk.{i}.", notes)
        head_count.append(heads)
        head_count_kv.append(kv)
        ffn_length.append(_mlp_tensors(add, spec, b, f"blk.{i}.", outtype, notes))
    tensors.append(Tensor("output_norm.weight", (d,), T.F32, "final", "final_norm"))
    if not spec.tied_embeddings:
        tensors.append(Tensor("output.weight", (spec.vocab_size, d), _weight_type(outtype, (1, d)), "final", "lm_head"))
    fallback = [t.name for t in tensors if outtype == "q8_0" and len(t.shape) == 2 and t.qtype == T.F16]
    if fallback:
        notes.append(f"{len(fallback)} tensors kept in F16 (their rows are not a multiple of 32 long): "
                     f"{', '.join(fallback[:6])}{' ...' if len(fallback) > 6 else ''}")
    return Layout(arch, written, head_count, head_count_kv, ffn_length, tensors, notes)


def _permute_rows(x: torch.Tensor, heads: int) -> torch.Tensor:
    """HF's rotate-half layout -> llama.cpp's interleaved pairs, per head: rows [h, 2, hd/2] -> [h, hd/2, 2]."""
    shape = x.shape
    return x.reshape(heads, 2, shape[0] // heads // 2, *shape[1:]).transpose(1, 2).reshape(shape)


def _llama3_factors(model, spec: ModelSpec) -> torch.Tensor:
    """llama.cpp's ``rope_freqs`` for llama3 rope scaling: default inverse frequencies / scaled ones ([hd/2])."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](model.config, "cpu")
    base = 1.0 / (spec.rope_theta ** (torch.arange(0, spec.head_dim, 2, dtype=torch.float64) / spec.head_dim))
    return (base / scaled.double()).float()


def _encode(t: Tensor, value: torch.Tensor | None) -> np.ndarray:
    import gguf

    arr = np.zeros(t.shape, dtype=np.float32)
    if value is not None:
        if value.ndim != len(t.shape) or any(a > b for a, b in zip(value.shape, t.shape)):
            raise ExportError(f"{t.name}: the model's tensor has shape {tuple(value.shape)}, expected {t.shape}")
        arr[tuple(slice(0, n) for n in value.shape)] = value.numpy()  # zero padding beyond the model's width
    if t.qtype == gguf.GGMLQuantizationType.F32:
        return np.ascontiguousarray(arr, dtype=np.float32)
    return gguf.quants.quantize(np.ascontiguousarray(arr, dtype=np.float32), t.qtype)


def _add_metadata(writer, spec: ModelSpec, layout: Layout, outtype: str, name: str) -> None:
    import gguf

    uniform = layout.arch != "deci"
    writer.add_name(name)
    writer.add_type("model")
    writer.add_context_length(spec.sliding_window or spec.context_length)
    writer.add_embedding_length(spec.hidden)
    writer.add_block_count(len(layout.blocks))
    writer.add_feed_forward_length(layout.ffn_length[0] if uniform else [int(x) for x in layout.ffn_length])
    writer.add_head_count(layout.head_count[0] if uniform else [int(x) for x in layout.head_count])
    writer.add_head_count_kv(layout.head_count_kv[0] if uniform else [int(x) for x in layout.head_count_kv])
    writer.add_key_length(spec.head_dim)
    writer.add_value_length(spec.head_dim)
    writer.add_rope_dimension_count(spec.head_dim)
    writer.add_rope_freq_base(spec.rope_theta)
    writer.add_layer_norm_rms_eps(spec.rms_eps)
    writer.add_vocab_size(spec.vocab_size)
    kind = spec.rope_scaling and spec.rope_scaling.get("rope_type", spec.rope_scaling.get("type"))
    if kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(spec.rope_scaling["factor"]))
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[outtype]
    writer.add_file_type(int(file_type))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def write_gguf(model, spec: ModelSpec, path: str | os.PathLike, *, outtype: str, tokenizer, name: str) -> Layout:
    """Write ``model`` (described by ``spec``) to the GGUF file ``path``; returns the layout that was written.

    The file appears under its name only once complete (written to ``<path>.partial`` and renamed).
    """
    import gguf

    from .gguf_vocab import add_vocabulary

    layout = plan_layout(spec, outtype)
    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    writer = gguf.GGUFWriter(partial, layout.arch)
    try:
        _add_metadata(writer, spec, layout, outtype, name)
        layout.tokenizer = add_vocabulary(writer, tokenizer, spec.vocab_size)
        for t in layout.tensors:
            writer.add_tensor_info(t.name, t.shape, np.dtype(np.float32), t.nbytes, raw_dtype=t.qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        cache: tuple[object, dict] = (None, {})
        for t in layout.tensors:
            if cache[0] is not t.group:  # one read per layer (or per global tensor group)
                if isinstance(t.group, Block):
                    cache = (t.group, block_tensors(model, t.group))
                elif t.group == "rope":
                    cache = (t.group, {"rope": _llama3_factors(model, spec)})
                else:
                    cache = (t.group, model_tensors(model, t.group))
            value = cache[1][t.key] if t.key is not None else None
            if value is not None and t.heads:
                value = _permute_rows(value, t.heads)
            writer.write_tensor_data(_encode(t, value))
        writer.close()
        os.replace(partial, path)
    except BaseException:
        writer.close()
        partial.unlink(missing_ok=True)
        raise
    logger.info("wrote %s (%s, %s, %d layers)", path, layout.arch, outtype, len(layout.blocks))
    return layout
