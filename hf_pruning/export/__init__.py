"""Export a pruned model to serving engines that cannot run hf_pruning's remote code.

    hf_pruning.export(model, "out/gguf", format="gguf", tokenizer=tok, outtype="q8_0")   # llama.cpp, ollama
    hf_pruning.export(model, "out/vllm", format="vllm", tokenizer=tok)                   # vLLM

Every format reads the live model through one description (:mod:`.blocks`); each op maps exactly, maps with
zero padding (reported), or is refused with :class:`ExportError` naming the layer, the op and the formats that
can carry it. The op-by-format table is in docs/SERVING.md.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from ..accounting import parameter_count
from ..engine.distributed import main_rank_only
from ..publish.summary import dense_reference
from .blocks import EXPORTABLE, ExportError, describe
from .report import ExportReport

logger = logging.getLogger(__name__)

FORMATS = ("gguf", "vllm")
REPORT_NAME = "export.json"


def _write_text(path: Path, text: str) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text, encoding="utf-8")
    os.replace(partial, path)


@main_rank_only("the export")
def export(model, path: str | os.PathLike, format: str = "gguf", *, tokenizer=None, outtype: str = "f32",
           name: str | None = None) -> ExportReport:
    """Export ``model`` (LLaMA, Mistral or Qwen2, pruned by any method, or not pruned) into the folder ``path``.

    ``format="gguf"``: one ``<name>-<outtype>.gguf`` file for llama.cpp (``outtype`` f32, f16, bf16 or q8_0),
    plus an ollama ``Modelfile``. ``format="vllm"``: a checkpoint vLLM runs with its own code (a stock class when
    every layer keeps its shape, else DeciLM ``nemotron-nas`` with a config-only remote code file). Both write a
    ``README.md`` card (what runs it, what was padded) and ``export.json`` (this report). ``tokenizer`` (a fast
    tokenizer, or a folder / Hub name) is written with the model; GGUF requires one.

    Each file appears whole (written under a temporary name, then renamed). Raises :class:`ExportError` for what
    the format cannot carry, before anything is written. Under a ``torch.distributed`` process group only rank 0
    writes (the others return None once it is done).
    """
    if format not in FORMATS:
        raise ExportError(f"unknown export format {format!r}; choose one of {', '.join(FORMATS)}")
    spec = describe(model)
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out} exists and is not a folder; export writes a folder of files")
    if isinstance(tokenizer, (str, os.PathLike)):  # a folder or Hub name: loaded once, for every writer
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer))
    params_model, params_dense = parameter_count(model), parameter_count(dense_reference(model))
    stem = name or Path(str(getattr(model.config, "_name_or_path", "") or "model")).name or "model"
    if format == "gguf":
        from .gguf_file import plan_layout, write_gguf

        plan_layout(spec, outtype)  # refuses before any file is created
        out.mkdir(parents=True, exist_ok=True)
        file = out / f"{stem}-{outtype}.gguf"
        layout = write_gguf(model, spec, file, outtype=outtype, tokenizer=tokenizer, name=stem)
        layers = [dict(source=b.source, attention=b.attention, head_count=h, head_count_kv=kv, ffn_length=f)
                  for b, h, kv, f in zip(layout.blocks, layout.head_count, layout.head_count_kv, layout.ffn_length)]
        report = ExportReport(
            format="gguf", path=str(out), files=[file.name, "Modelfile", "README.md", REPORT_NAME],
            architecture=layout.arch, outtype=outtype, layers=layers, params_written=layout.num_params(),
            params_model=params_model, params_dense=params_dense,
            notes=layout.notes, tokenizer=layout.tokenizer,
            command=f"llama-cli -m {file.name} -p 'Hello' -n 32",
        )
        _write_text(out / "Modelfile", f"FROM ./{file.name}\n")
    else:
        from .vllm_folder import check_vllm, write_vllm

        check_vllm(spec)
        out.mkdir(parents=True, exist_ok=True)
        report = write_vllm(model, spec, out, tokenizer=tokenizer, name=stem)
        report.params_model, report.params_dense = params_model, params_dense
    from .card import export_card

    _write_text(out / "README.md", export_card(report, spec))
    _write_text(out / REPORT_NAME, json.dumps(report.to_dict(), indent=1) + "\n")
    logger.info("exported to %s: %s", out, ", ".join(report.files))
    return report


__all__ = ["EXPORTABLE", "FORMATS", "ExportError", "ExportReport", "export"]
