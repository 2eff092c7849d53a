"""Writing a pruned model as a checkpoint vLLM runs with its own code.

A model whose layers all keep their shapes is saved as its stock class (every engine runs it). Otherwise the
checkpoint is DeciLM (``nemotron-nas``, vLLM's ``DeciLMForCausalLM``): per-layer ``block_configs`` with
attention/MLP ``no_op``, ``n_heads_in_group`` and the exact MLP ``intermediate_size``; the configuration class
is a small remote-code file written next to the weights (``configuration_decilm.py``), the model code is vLLM's.
How each block maps:

- full attention: vLLM's query-head count is global (``num_attention_heads``) and KV heads are
  ``num_attention_heads / n_heads_in_group``; a layer with fewer query heads is padded back with zero query heads
  (zero ``q_proj`` rows, zero ``o_proj`` columns), and with zero KV heads up to a count that divides the query
  heads: exact, the K/V saving is kept where the count divides, the Q/O saving is lost;
- no attention: ``attention.no_op``, except in the first layer (vLLM's layer 0 needs an attention to start its
  residual stream): there a one-KV-head attention with all-zero weights (exact, padding);
- no MLP: ``ffn.no_op``; both gone: the layer is left out;
- value-only attention: refused (vLLM has no linear attention; GGUF and the transformers checkpoint carry it);
- biases are global switches in vLLM (``qkv_bias``, ``attention_bias`` for the output, ``mlp_bias``): when any
  layer has one, every layer gets one, zero where the model had none.

Weights are read one layer at a time and written into safetensors shards of about 2 GiB as each fills (so at most
one shard and one layer are held), in the model's dtype; the shards are renamed into place once all are written,
``config.json`` last.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import torch

from ..accounting import parameter_count
from .blocks import Block, ExportError, ModelSpec, block_tensors, model_tensors
from .report import ExportReport

logger = logging.getLogger(__name__)

SHARD_BYTES = 2 * 2**30
CONFIG_CODE = "configuration_decilm.py"


def _kv_groups(heads: int, kv: int, group: int) -> int:
    """The fewest KV heads >= ``kv`` that divide ``heads`` into groups of at least ``group`` query heads."""
    for n in range(kv, heads + 1):
        if heads % n == 0 and heads // n >= group:
            return n
    raise ExportError(f"cannot lay out {kv} KV heads of {group} query heads each within {heads} query heads")


def _regroup(t: dict, b: Block, heads: int, hd: int) -> tuple[dict, int]:
    """Pad a layer's attention to ``heads`` query heads in ``n`` equal KV groups; returns (tensors, n)."""
    group = b.q_heads // b.kv_heads
    n = _kv_groups(heads, b.kv_heads, group)
    slots = heads // n
    if n == b.kv_heads and slots == group:
        return t, n
    out = dict(t)
    q_rows = torch.cat([torch.arange(j * slots, j * slots + group) for j in range(b.kv_heads)])  # new head index
    q_idx = (q_rows[:, None] * hd + torch.arange(hd)).reshape(-1)  # [q_heads*hd] rows in the padded layout

    def scatter_rows(x, rows, total):
        y = x.new_zeros(total, *x.shape[1:])
        y[rows] = x
        return y

    out["q"] = scatter_rows(t["q"], q_idx, heads * hd)
    out["o"] = scatter_rows(t["o"].T, q_idx, heads * hd).T.contiguous()
    if "q_bias" in t:
        out["q_bias"] = scatter_rows(t["q_bias"], q_idx, heads * hd)
    for key in ("k", "v", "k_bias", "v_bias"):  # the real KV heads first, zero heads after
        if key in t:
            out[key] = scatter_rows(t[key], torch.arange(t[key].shape[0]), n * hd)
    return out, n


def _stock_save(model, out: Path, tokenizer) -> None:
    from ..publish import save_pretrained

    save_pretrained(model, out, tokenizer=tokenizer, card=False)


def check_vllm(spec: ModelSpec) -> None:
    """Refuse what vLLM cannot run, before anything is written."""
    for b in spec.blocks:
        if b.attention == "linear":
            raise ExportError(f"layer {b.source}: value_only_attention cannot be written for vLLM (it has no linear "
                              "attention); formats that carry it: format='gguf' (llama.cpp) and the transformers "
                              "checkpoint (model.save_pretrained)")


def write_vllm(model, spec: ModelSpec, out: Path, *, tokenizer, name: str):
    """Write the vLLM checkpoint of ``model`` into ``out``; returns an :class:`~hf_pruning.export.ExportReport`."""
    check_vllm(spec)
    stock = spec.uniform and not str(getattr(model.config, "model_type", "")).startswith("hf_pruning_")
    written = [b for b in spec.blocks if not b.is_identity]
    notes = []
    if spec.sliding_window:
        notes.append(f"the sliding window ({spec.sliding_window}) is not expressed: exact up to that many tokens")
    command = f"vllm serve {out} --trust-remote-code" if not stock else f"vllm serve {out}"
    layers = [dict(source=b.source, attention=b.attention, kv_heads=b.kv_heads, mlp_width=b.mlp_width)
              for b in written]
    if stock:
        _stock_save(model, out, tokenizer)
        return ExportReport(format="vllm", path=str(out), files=["config.json", "model.safetensors"],
                            architecture=type(model).__name__, outtype=str(model.dtype).removeprefix("torch."),
                            layers=layers, params_written=parameter_count(model), params_model=0, params_dense=0, notes=notes,
                            tokenizer="saved" if tokenizer is not None else "", command=command)
    return _write_decilm(model, spec, out, written, tokenizer, notes, layers, command)


class _Shards:
    """safetensors shards written as they fill (about SHARD_BYTES each), renamed into place by :meth:`finish`."""

    def __init__(self, out: Path, dtype: torch.dtype):
        self.out, self.dtype, self.params = out, dtype, 0
        self.shard: dict[str, torch.Tensor] = {}  # the shard being filled
        self.done: list[tuple[Path, list[str], int]] = []  # (partial file, tensor names, bytes)

    def put(self, key: str, value: torch.Tensor) -> None:
        if sum(v.numel() * v.element_size() for v in self.shard.values()) > SHARD_BYTES:
            self._flush()
        self.shard[key] = value.to(self.dtype).contiguous()
        self.params += value.numel()

    def _flush(self) -> None:
        from safetensors.torch import save_file

        if self.shard:
            partial = self.out / f"model-{len(self.done) + 1:05d}.safetensors.partial"
            save_file(self.shard, str(partial), metadata={"format": "pt"})
            self.done.append((partial, list(self.shard), sum(v.numel() * v.element_size() for v in self.shard.values())))
            self.shard = {}

    def finish(self) -> list[str]:
        """Write the last shard, rename all into place (and the index when several); returns the file names."""
        self._flush()
        n = len(self.done)
        names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        for (partial, _, _), fname in zip(self.done, names):
            os.replace(partial, self.out / fname)
        if n > 1:
            index = {"metadata": {"total_size": sum(b for _, _, b in self.done)},
                     "weight_map": {k: f for (_, keys, _), f in zip(self.done, names) for k in keys}}
            (self.out / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
        return names


def _put_block(shards: _Shards, spec: ModelSpec, i: int, b: Block, t: dict, biases: dict, notes: list) -> dict:
    """Write one layer's tensors as ``model.layers.<i>.*``; returns its ``block_configs`` entry."""
    H, hd, d = spec.num_heads, spec.head_dim, spec.hidden
    p = f"model.layers.{i}."
    attn: dict = {"no_op": b.attention == "none"}
    if b.attention == "none" and i == 0 and b.mlp_width:
        notes.append(f"layer {b.source}: no attention, written as a zero attention with one KV head (vLLM starts "
                     "its residual stream in layer 0's attention)")
        t.update(attn_norm=torch.ones(d), q=torch.zeros(H * hd, d), k=torch.zeros(hd, d), v=torch.zeros(hd, d),
                 o=torch.zeros(d, H * hd))
        b = Block(b.source, "full", H, 1, b.mlp_width, b.qkv_bias, b.o_bias, b.mlp_in_bias, b.mlp_out_bias)
        attn = {"no_op": False}
    if b.attention == "full":
        t, n_kv = _regroup(t, b, H, hd)
        if (n_kv, H) != (b.kv_heads, b.q_heads) and b.kv_heads:
            notes.append(f"layer {b.source}: {b.q_heads} query / {b.kv_heads} KV heads padded to {H} / {n_kv} "
                         "with zero heads (vLLM's query-head count is global)")
        attn["n_heads_in_group"] = H // n_kv
        shards.put(p + "input_layernorm.weight", t["attn_norm"])
        for key in ("q", "k", "v", "o"):
            shards.put(p + f"self_attn.{key}_proj.weight", t[key])
            if biases["o" if key == "o" else "qkv"]:
                shards.put(p + f"self_attn.{key}_proj.bias", t.get(f"{key}_bias", torch.zeros(t[key].shape[0])))
    ffn: dict = {"no_op": b.mlp_width == 0}
    if b.mlp_width:
        ffn["intermediate_size"] = b.mlp_width
        shards.put(p + "post_attention_layernorm.weight", t["mlp_norm"])
        for key in ("gate", "up", "down"):
            shards.put(p + f"mlp.{key}_proj.weight", t[key])
            if biases["mlp"]:
                shards.put(p + f"mlp.{key}_proj.bias", t.get(f"{key}_bias", torch.zeros(t[key].shape[0])))
    return {"attention": attn, "ffn": ffn}


def _write_decilm(model, spec, out: Path, written: list[Block], tokenizer, notes, layers, command):
    biases = {"qkv": any(b.qkv_bias for b in written), "o": any(b.o_bias for b in written),
              "mlp": any(b.mlp_in_bias or b.mlp_out_bias for b in written)}
    shards = _Shards(out, model.dtype)
    shards.put("model.embed_tokens.weight", model_tensors(model, "embed")["embed"])
    blocks_cfg = [_put_block(shards, spec, i, b, block_tensors(model, b), biases, notes) for i, b in enumerate(written)]
    final = model_tensors(model, "final")
    shards.put("model.norm.weight", final["final_norm"])
    if "lm_head" in final:
        shards.put("lm_head.weight", final["lm_head"])
    names = shards.finish()
    shutil.copyfile(Path(__file__).with_name(CONFIG_CODE), out / CONFIG_CODE)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    else:
        notes.append("no tokenizer written: pass tokenizer=... (vLLM needs one next to the weights)")
    config = _decilm_config(model.config, spec, blocks_cfg, biases, model.dtype)
    partial = out / "config.json.partial"
    partial.write_text(json.dumps(config, indent=1) + "\n")
    os.replace(partial, out / "config.json")
    return ExportReport(format="vllm", path=str(out), files=["config.json", *names, CONFIG_CODE],
                        architecture="DeciLMForCausalLM", outtype=str(model.dtype).removeprefix("torch."),
                        layers=layers, params_written=shards.params, params_model=0, params_dense=0, notes=notes,
                        tokenizer="saved" if tokenizer is not None else "", command=command)


def _decilm_config(config, spec: ModelSpec, blocks: list[dict], biases: dict, dtype) -> dict:
    rope = {"rope_theta": spec.rope_theta, "rope_type": "default", **(spec.rope_scaling or {})}
    return {
        "architectures": ["DeciLMForCausalLM"],
        "model_type": "nemotron-nas",
        "auto_map": {"AutoConfig": "configuration_decilm.DeciLMConfig"},
        "hidden_size": spec.hidden,
        "num_attention_heads": spec.num_heads,
        "num_key_value_heads": spec.num_kv_heads,
        "head_dim": spec.head_dim,
        "intermediate_size": spec.intermediate_size,
        "num_hidden_layers": len(blocks),
        "hidden_act": getattr(config, "hidden_act", "silu"),
        "rms_norm_eps": spec.rms_eps,
        "vocab_size": spec.vocab_size,
        "max_position_embeddings": spec.sliding_window or spec.context_length,
        "rope_parameters": rope,
        "rope_theta": spec.rope_theta,
        "tie_word_embeddings": spec.tied_embeddings,
        "attention_bias": biases["o"],
        "qkv_bias": biases["qkv"],
        "mlp_bias": biases["mlp"],
        "bos_token_id": getattr(config, "bos_token_id", None),
        "eos_token_id": getattr(config, "eos_token_id", None),
        "dtype": str(dtype).removeprefix("torch."),
        "block_configs": blocks,
    }
