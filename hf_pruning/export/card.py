"""The README.md written next to an export: what runs it, how it maps, what was padded, the parameter saving."""

from __future__ import annotations


def _layers_table(report) -> list[str]:
    if report.format == "gguf":
        rows = ["| layer (model) | attention | head_count | head_count_kv | feed_forward_length |", "|---|---|---|---|---|"]
        rows += [f"| {r['source']} | {r['attention']} | {r['head_count']} | {r['head_count_kv']} | {r['ffn_length']} |"
                 for r in report.layers]
    else:
        rows = ["| layer (model) | attention | KV heads | MLP width |", "|---|---|---|---|"]
        rows += [f"| {r['source']} | {r['attention']} | {r['kv_heads']} | {r['mlp_width']} |" for r in report.layers]
    return rows


def export_card(report, spec) -> str:
    """Markdown for the exported folder's README.md."""
    saving = 1 - report.params_written / report.params_dense if report.params_dense else 0.0
    lines = [
        f"# {report.files[0] if report.format == 'gguf' else 'vLLM checkpoint'}: a pruned {spec.arch} model",
        "",
        f"Exported by hf_pruning for **{'llama.cpp' if report.format == 'gguf' else 'vLLM'}** "
        f"(architecture `{report.architecture}`, {report.outtype}).",
        "",
        f"- Parameters written: {report.params_written:,} ({saving:.1%} fewer than the dense model's "
        f"{report.params_dense:,}; the pruned model in memory has {report.params_model:,}).",
        f"- Tokenizer: {report.tokenizer or 'none'}.",
        "",
        "## Run it",
        "",
        "```bash",
        report.command,
        "```",
    ]
    if report.format == "gguf":
        lines += ["", "ollama: `ollama create pruned -f Modelfile && ollama run pruned`.",
                  "", "Python: `llama_cpp.Llama(model_path=...)` (llama-cpp-python)."]
    lines += ["", "## Padding and omissions", ""]
    lines += [f"- {n}" for n in report.notes] or ["- none: every layer maps exactly, without padding."]
    lines += ["", "## Layers", "", *_layers_table(report), ""]
    return "\n".join(lines)
