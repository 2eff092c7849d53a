"""``hf-prune export MODEL OUT --format gguf|vllm``: the export's subcommand (registered by ``hf_pruning.cli``)."""

from __future__ import annotations

import json
import sys


def cmd_export(args) -> int:
    from transformers import AutoTokenizer

    from ..api import from_pretrained
    from . import export

    model = from_pretrained(args.model)
    try:
        tokenizer = AutoTokenizer.from_pretrained(args.model)
    except (OSError, ValueError):
        tokenizer = None  # the GGUF export then says that it needs one
    report = export(model, args.out, args.format, tokenizer=tokenizer, outtype=args.outtype, name=args.name)
    keys = ("path", "files", "architecture", "outtype", "params_written", "params_dense", "notes", "command")
    sys.stdout.write(json.dumps({k: report.to_dict()[k] for k in keys}, indent=2) + "\n")
    return 0


def add_export_command(sub) -> None:
    """Add the ``export`` subcommand to the ``hf-prune`` subparsers ``sub``."""
    p = sub.add_parser("export", help="export a (pruned) model for llama.cpp (GGUF) or vLLM, without remote code")
    p.add_argument("model", help="model folder or Hub name (LLaMA, Mistral or Qwen2, pruned or not)")
    p.add_argument("out", help="output folder, created when missing")
    p.add_argument("--format", choices=("gguf", "vllm"), default="gguf")
    p.add_argument("--outtype", choices=("f32", "f16", "bf16", "q8_0"), default="f32", help="GGUF tensor type")
    p.add_argument("--name", default=None, help="model name in the file (default: the model folder's name)")
    p.set_defaults(func=cmd_export)
