"""The main job on the embedded default: prune the real SmolLM2-135M with the benchmark's best setting for a
real speed-up, evaluate, save, reload in a fresh process without hf_pruning, generate, and export to GGUF for
llama.cpp.

    make demo            # or: python examples/demo_core.py [--out DIR] [--windows N]
    make serve-demo      # then: generate with the exported GGUF file in llama.cpp (builds its binding once)

The setting: GradMAP removing 4 of SmolLM2's 30 blocks (13.3% of decoder parameters) with its fused mean-shift
compensation, the structured row with the lowest perplexity at that budget in benchmarks/results/smollm2.md
(38.5 against dense 32.0 on the benchmark's text, zero-shot accuracy kept, about 1.1x faster prefill and decode in
PyTorch). Unstructured and 2:4 masks keep every weight in the file and give no speed-up in PyTorch, so they are
not the demo. Calibration: 16 x 512 tokens of the embedded text's calibration part; evaluation: its other part.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import time
from pathlib import Path

import torch
from common import load_smollm2  # examples/common.py: the repository's SmolLM2 loader (benchmarks/assets.py)

import hf_pruning
from hf_pruning.calibration import build_calibration, default_text, evaluation_windows
from hf_pruning.evaluation import compare_speed, perplexity
from hf_pruning.publish.verify import reload_in_fresh_process

#: the benchmark row the demo reproduces (benchmarks/results/smollm2.md: gradmap {"param_ratio": 0.1333})
DEMO_CONFIG = {"method": "gradmap", "param_ratio": 0.1333}
PROMPT = "It is a truth universally acknowledged, that"


def folder_bytes(folder) -> int:
    """Bytes of a checkpoint folder's weight files."""
    return sum(p.stat().st_size for p in Path(folder).glob("*.safetensors"))


def kv_bytes_per_token(model) -> int:
    from hf_pruning.remote.hf_pruning_surgery import inspect_model

    return sum(s.kv_bytes_per_token(4) for s in inspect_model(model))


def main(model=None, tokenizer=None, config: dict = DEMO_CONFIG, out_dir: str = "outputs/demo-smollm2-pruned",
         windows: int = 8, seq_len: int = 512, max_new_tokens: int = 30, calib_samples: int = 16,
         speed_repeats: int = 3) -> dict:
    if model is None:
        model, tokenizer = load_smollm2()
    eval_ids = evaluation_windows(tokenizer, default_text("evaluation"), seq_len, windows)
    calibration = build_calibration(tokenizer, source="default:calibration", n_samples=calib_samples, seq_len=512)
    dense_model = copy.deepcopy(model)  # kept for the speed comparison
    dense = {"ppl": perplexity(model, eval_ids), "params": hf_pruning.parameter_count(model),
             "kv_bytes_per_token": kv_bytes_per_token(model)}
    print(f"dense : perplexity {dense['ppl']:.2f} on {eval_ids.numel()} tokens, {dense['params']:,} parameters")

    start = time.perf_counter()
    hf_pruning.prune_(model, config, calibration=calibration)
    prune_s = time.perf_counter() - start
    pruned = {"ppl": perplexity(model, eval_ids), "params": hf_pruning.parameter_count(model),
              "kv_bytes_per_token": kv_bytes_per_token(model)}
    print(f"pruned: {config} in {prune_s:.0f} s: perplexity {pruned['ppl']:.2f}, {pruned['params']:,} parameters "
          f"({1 - pruned['params'] / dense['params']:.2%} fewer), KV cache "
          f"{1 - pruned['kv_bytes_per_token'] / dense['kv_bytes_per_token']:.2%} smaller, class {type(model).__name__}")
    speed = compare_speed(dense_model, model, prefill_tokens=1024, decode_tokens=64, repeats=speed_repeats)
    del dense_model
    print(f"speed : prefill {speed['dense_prefill_tok_s']:.0f} -> {speed['pruned_prefill_tok_s']:.0f} tokens/s "
          f"({speed['prefill_speedup']:.2f}x), decode {speed['dense_decode_tok_s']:.1f} -> "
          f"{speed['pruned_decode_tok_s']:.1f} tokens/s ({speed['decode_speedup']:.2f}x), PyTorch on this CPU")

    hf_pruning.save_pretrained(model, out_dir, tokenizer=tokenizer)
    prompt_ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    check_ids = torch.cat([prompt_ids, eval_ids[:1, : 64]], dim=1)
    with torch.no_grad():
        expected = model(check_ids, use_cache=False).logits
    reloaded = reload_in_fresh_process(out_dir, prompt_ids, max_new_tokens=max_new_tokens)
    again = reload_in_fresh_process(out_dir, check_ids)
    identical = torch.equal(again["logits"], expected)
    text = tokenizer.decode(reloaded["generated"][0], skip_special_tokens=True)
    dense_file = getattr(model.config, "_name_or_path", "")
    sizes = {"pruned": folder_bytes(out_dir), "dense": folder_bytes(dense_file) if Path(dense_file).is_dir() else None}
    print(f"saved to {out_dir} ({sizes['pruned'] / 2**20:.0f} MB of weights"
          + (f", dense {sizes['dense'] / 2**20:.0f} MB" if sizes["dense"] else "") + f"); reloaded without hf_pruning "
          f"as {reloaded['class']}: logits identical = {identical}")
    print(f"generated: {text!r}")
    summary = {"dense": dense, "pruned": pruned, "prune_s": prune_s, "eval_tokens": eval_ids.numel(),
               "speed": speed, "file_bytes": sizes, "config": config,
               "reload_identical_logits": identical,
               "generate_cache_matches_no_cache": torch.equal(reloaded["generated"], reloaded["generated_no_cache"]),
               "generated": text, "saved_to": str(out_dir)}
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
