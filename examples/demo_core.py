"""The main job on the embedded default: prune the real SmolLM2-135M with a hand-written plan, evaluate,
save, reload in a fresh process without hf_pruning, generate, and export to GGUF for llama.cpp.

    make demo            # or: python examples/demo_core.py [--out DIR] [--windows N]
    make serve-demo      # then: generate with the exported GGUF file in llama.cpp (builds its binding once)

The plan exercises the core ops on the real model: value-only attention with a rescale in the top three
layers (HARP's operator, alpha not yet searched), a whole KV group of heads removed in layer 10 and one head
removed unevenly inside a GQA group in layer 14.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch
from common import load_smollm2  # examples/common.py: the repository's SmolLM2 loader (benchmarks/assets.py)

import hf_pruning
from hf_pruning.calibration import default_text, evaluation_windows
from hf_pruning.evaluation import perplexity
from hf_pruning.publish.verify import reload_in_fresh_process

DEMO_PLAN = {
    "ops": [
        *({"op": "value_only_attention", "layer": layer} for layer in (27, 28, 29)),
        *({"op": "scale_output", "layer": layer, "sublayer": "attention", "alpha": 0.5} for layer in (27, 28, 29)),
        {"op": "remove_heads", "layer": 10, "heads": [0, 1, 2]},
        {"op": "remove_heads", "layer": 14, "heads": [4]},
    ]
}
PROMPT = "It is a truth universally acknowledged, that"


def kv_bytes_per_token(model) -> int:
    from hf_pruning.remote.hf_pruning_surgery import inspect_model

    return sum(s.kv_bytes_per_token(4) for s in inspect_model(model))


def main(model=None, tokenizer=None, plan: dict = DEMO_PLAN, out_dir: str = "outputs/demo-smollm2-pruned",
         windows: int = 8, seq_len: int = 512, max_new_tokens: int = 30) -> dict:
    if model is None:
        model, tokenizer = load_smollm2()
    eval_ids = evaluation_windows(tokenizer, default_text("evaluation"), seq_len, windows)
    dense = {"ppl": perplexity(model, eval_ids), "params": hf_pruning.parameter_count(model),
             "kv_bytes_per_token": kv_bytes_per_token(model)}
    print(f"dense : perplexity {dense['ppl']:.2f} on {eval_ids.numel()} tokens, {dense['params']:,} parameters")

    start = time.perf_counter()
    hf_pruning.prune_(model, hf_pruning.PlanConfig(plan=plan))
    prune_s = time.perf_counter() - start
    pruned = {"ppl": perplexity(model, eval_ids), "params": hf_pruning.parameter_count(model),
              "kv_bytes_per_token": kv_bytes_per_token(model)}
    print(f"pruned: perplexity {pruned['ppl']:.2f}, {pruned['params']:,} parameters "
          f"({1 - pruned['params'] / dense['params']:.2%} fewer), KV cache "
          f"{1 - pruned['kv_bytes_per_token'] / dense['kv_bytes_per_token']:.2%} smaller, class {type(model).__name__}")

    hf_pruning.save_pretrained(model, out_dir, tokenizer=tokenizer)
    prompt_ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    check_ids = torch.cat([prompt_ids, eval_ids[:1, : 64]], dim=1)
    with torch.no_grad():
        expected = model(check_ids, use_cache=False).logits
    reloaded = reload_in_fresh_process(out_dir, prompt_ids, max_new_tokens=max_new_tokens)
    again = reload_in_fresh_process(out_dir, check_ids)
    identical = torch.equal(again["logits"], expected)
    text = tokenizer.decode(reloaded["generated"][0], skip_special_tokens=True)
    print(f"saved to {out_dir}; reloaded without hf_pruning as {reloaded['class']}: logits identical = {identical}")
    print(f"generated: {text!r}")
    summary = {"dense": dense, "pruned": pruned, "prune_s": prune_s, "eval_tokens": eval_ids.numel(),
               "reload_identical_logits": identical,
               "generate_cache_matches_no_cache": torch.equal(reloaded["generated"], reloaded["generated_no_cache"]),
               "generated": text, "saved_to": str(out_dir), "plan": plan}
    if not identical:
        raise SystemExit("reloaded logits differ from the in-memory pruned model")
    report = hf_pruning.export(model, gguf_dir(out_dir), "gguf", tokenizer=tokenizer, outtype="q8_0",
                               name="smollm2-pruned")
    gguf_file = Path(gguf_dir(out_dir), report.files[0])
    summary["gguf"] = {"file": str(gguf_file), "architecture": report.architecture,
                       "bytes": gguf_file.stat().st_size, "notes": report.notes}
    print(f"exported to {gguf_file} (llama.cpp architecture {report.architecture}, Q8_0, "
          f"{gguf_file.stat().st_size / 2**20:.0f} MB); run it:")
    print(f"  llama-cli -m {gguf_file} -p {PROMPT!r} -n {max_new_tokens}      # or: make serve-demo")
    Path(out_dir, "demo_summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def gguf_dir(out_dir: str) -> str:
    """Where the demo writes its GGUF export: beside the saved model folder."""
    return str(out_dir).rstrip("/") + "-gguf"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="outputs/demo-smollm2-pruned", help="where to save the pruned model")
    parser.add_argument("--windows", type=int, default=8, help="512-token evaluation windows")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    main(out_dir=args.out, windows=args.windows)
