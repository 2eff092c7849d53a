"""What an export wrote (:class:`ExportReport`) and the parameter counts it quotes."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from .blocks import Block, ModelSpec


@dataclass
class ExportReport:
    """What an export wrote: the files, the engine architecture, per-layer shapes, parameter counts and notes."""

    format: str
    path: str
    files: list[str]
    architecture: str
    outtype: str
    layers: list[dict]
    params_written: int  # parameters in the exported files (padding included)
    params_model: int  # parameters of the model in memory
    params_dense: int  # parameters of the unpruned model of the same configuration
    notes: list[str] = field(default_factory=list)
    tokenizer: str = ""
    command: str = ""  # how to run it

    def to_dict(self) -> dict:
        return asdict(self)


def dense_params(spec: ModelSpec) -> int:
    """Parameters of the unpruned model: every layer of the base model (removed ones too) at its original shape."""
    full = Block(source=0, attention="full", q_heads=spec.num_heads, kv_heads=spec.num_kv_heads,
                 mlp_width=spec.intermediate_size, qkv_bias=spec.arch == "qwen2", o_bias=False, mlp_in_bias=False,
                 mlp_out_bias=False)
    return _block_params(spec, full) * max(spec.base_layers, len(spec.blocks)) + _global_params(spec)


def _global_params(spec) -> int:
    return spec.vocab_size * spec.hidden * (1 if spec.tied_embeddings else 2) + spec.hidden


def _block_params(spec, b) -> int:
    d, hd = spec.hidden, spec.head_dim
    n = 0
    if b.attention == "full":
        n += d + 2 * d * b.q_heads * hd + 2 * d * b.kv_heads * hd
        n += (b.q_heads + 2 * b.kv_heads) * hd if b.qkv_bias else 0
    elif b.attention == "linear":
        n += d + d * d
    n += d if b.o_bias and b.attention != "none" else 0
    if b.mlp_width:
        n += d + 3 * d * b.mlp_width + (d if b.mlp_out_bias else 0) + (2 * b.mlp_width if b.mlp_in_bias else 0)
    return n


