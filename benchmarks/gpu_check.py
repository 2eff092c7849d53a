"""The CUDA path, checked on a GPU machine (nothing in the project needs one; run this where there is one).

    python benchmarks/gpu_check.py --out benchmarks/results/gpu_check.json [--timing]

1. **Parity**: every method on tiny models of all five architectures (built in code), once on the CPU and once
   on CUDA (float32, same calibration ids). Structural decisions (the plan) must match exactly; the pruned
   models' logits on the same tokens are compared (both on the CPU), and the CUDA-pruned model is saved and
   reloaded with the stock Auto class to check that what a GPU user saves loads anywhere.
2. **Timing** (``--timing``): each method on a model of SmolLM2-135M's shape with random weights (the real
   weights do not travel to the GPU machine; cost does not depend on weight values) on CUDA in float32, with
   the benchmark protocol's calibration sizes (16 x 512 tokens, 4 x 128 for depth searches). Prune time and
   passes (the same unit as the CPU benchmark: one forward over the calibration tokens, synchronised).

Writes one JSON file; benchmarks/results/gpu_check.md is made from it (``--markdown``).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import hf_pruning  # noqa: E402
from hf_pruning.evaluation.cost import measure_pruning  # noqa: E402

#: (name, config) per method on the tiny models (6 layers, 8 heads, width 64)
TINY_CASES = [
    ("magnitude 50%", {"method": "magnitude", "sparsity": 0.5}),
    ("wanda 2:4", {"method": "wanda", "pattern": "2:4"}),
    ("sparsegpt 50%", {"method": "sparsegpt", "sparsity": 0.5}),
    ("llm_barber wanda", {"method": "llm_barber", "init": "wanda", "sparsity": 0.5}),
    ("llm_barber sparsegpt recon+verify", {"method": "llm_barber", "init": "sparsegpt", "sparsity": 0.5,
                                           "granularity": "block", "reconstruct": True, "verify": True}),
    ("shortgpt", {"method": "shortgpt", "num_removals": 2}),
    ("sleb", {"method": "sleb", "num_removals": 2}),
    ("taylor", {"method": "taylor", "num_removals": 2}),
    ("gradmap + comp", {"method": "gradmap", "num_removals": 2}),
    ("finercut", {"method": "finercut", "num_removals": 3}),
    ("harp", {"method": "harp", "num_layers": 2}),
    ("flap", {"method": "flap", "ratio": 0.2}),
    ("heads", {"method": "heads", "score": "wanda", "unit": "group", "per_layer": 1}),
]

#: (name, config, depth calibration?) on the SmolLM2-shaped model
TIMING_CASES = [
    ("wanda 50%", {"method": "wanda", "sparsity": 0.5}, False),
    ("sparsegpt 50%", {"method": "sparsegpt", "sparsity": 0.5}, False),
    ("llm_barber wanda 50%", {"method": "llm_barber", "init": "wanda", "sparsity": 0.5, "threshold": 0.1}, False),
    ("llm_barber sparsegpt 50% recon+verify", {"method": "llm_barber", "init": "sparsegpt", "sparsity": 0.5,
                                               "granularity": "block", "threshold": 0.1, "reconstruct": True,
                                               "verify": True}, False),
    ("gradmap 7 blocks + comp", {"method": "gradmap", "param_ratio": 0.2333}, True),
    ("sleb 7 blocks", {"method": "sleb", "param_ratio": 0.2333}, True),
    ("finercut 25% sublayers", {"method": "finercut", "sublayer_ratio": 0.25}, True),
    ("harp 10 layers", {"method": "harp", "num_layers": 10}, False),
    ("flap 8.33%", {"method": "flap", "param_ratio": 0.0833}, False),
]


def _mask_agreement(a, b) -> float | None:
    agree, total = 0, 0
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        if p.ndim == 2 and "layers" in n and p.shape == q.shape:
            za, zb = p.detach().cpu() == 0, q.detach().cpu() == 0
            agree += int((za == zb).sum())
            total += za.numel()
    return agree / total if total else None


def parity(archs, cases, device: str = "cuda") -> list[dict]:
    from tiny_models import tiny_model, tokens
    from transformers import AutoModelForCausalLM

    calib, probe = tokens(8, 24, seed=1), tokens(2, 16, seed=2)
    rows = []
    for arch in archs:
        for name, cfg in cases:
            row = {"arch": arch, "case": name}
            try:
                cpu = hf_pruning.prune_(tiny_model(arch), hf_pruning.PruningConfig.from_dict(cfg), calibration=calib)
                gpu = hf_pruning.prune_(tiny_model(arch).to(device), hf_pruning.PruningConfig.from_dict(cfg),
                                        calibration=calib)
                row["same_plan"] = hf_pruning.get_plan(cpu).to_dict() == hf_pruning.get_plan(gpu).to_dict()
                row["mask_agreement"] = _mask_agreement(cpu, gpu)
                with torch.no_grad():
                    lc = cpu(probe, use_cache=False).logits
                    lg = gpu(probe.to(device), use_cache=False).logits.cpu()
                row["max_logit_diff"] = float((lc - lg).abs().max())
                row["logit_scale"] = float(lc.abs().max())
                with tempfile.TemporaryDirectory() as tmp:
                    hf_pruning.save_pretrained(gpu, tmp)
                    # the same attention kernel as the pruned model (older transformers default Gemma2 to SDPA)
                    back = AutoModelForCausalLM.from_pretrained(tmp, trust_remote_code=True, dtype=torch.float32,
                                                                attn_implementation=gpu.config._attn_implementation)
                    with torch.no_grad():  # the saved model against the CUDA-pruned one, both on the CPU
                        lb = back(probe, use_cache=False).logits
                        lgc = gpu.cpu()(probe, use_cache=False).logits
                row["reload_max_diff"] = float((lb - lgc).abs().max())
            except Exception as e:  # recorded, the check goes on
                row["error"] = f"{type(e).__name__}: {e}"
                row["trace"] = traceback.format_exc(limit=4)
            logging.info("parity %s", row)
            rows.append(row)
    return rows


def timing(cases, repeats_unit: int = 3) -> list[dict]:
    from transformers import LlamaConfig, LlamaForCausalLM

    # SmolLM2-135M's shape (ASSETS.md); random weights
    config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
                         tie_word_embeddings=True, rms_norm_eps=1e-5, rope_theta=100000.0)
    torch.manual_seed(0)
    base = LlamaForCausalLM(config).eval()
    g = torch.Generator().manual_seed(0)
    calib = torch.randint(10, 49152, (16, 512), generator=g)
    calib_depth = torch.randint(10, 49152, (4, 128), generator=g)
    rows = []
    for name, cfg, depth in cases:
        row = {"case": name, "config": cfg}
        try:
            model = copy.deepcopy(base).cuda()
            c = calib_depth if depth else calib
            for _ in range(repeats_unit):  # warm-up (kernels, allocator)
                with torch.no_grad():
                    model(c[:4].cuda(), use_cache=False)
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            cost = measure_pruning(lambda m=model, c=c, cfg=cfg: hf_pruning.prune_(m, hf_pruning.PruningConfig.from_dict(cfg),
                                                                          calibration=c), model, c)
            row.update({k: cost[k] for k in ("prune_s", "forward_s", "passes")})
            row["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
            del model
            torch.cuda.empty_cache()
        except Exception as e:
            row["error"] = f"{type(e).__name__}: {e}"
            row["trace"] = traceback.format_exc(limit=4)
        logging.info("timing %s", row)
        rows.append(row)
    return rows


def markdown(results: dict) -> str:
    lines = [f"# CUDA check ({results['device']}, torch {results['torch']}, transformers {results['transformers']}, "
             f"{results.get('date', '')})",
             "", "Made by `python benchmarks/gpu_check.py --timing` on a GPU machine; see the script's docstring.", ""]
    par = results.get("parity", [])
    if par:
        same = [r for r in par if "error" not in r and r["same_plan"] and r.get("mask_agreement") in (None, 1.0)]
        exact = [r for r in par if "error" not in r and r["reload_max_diff"] == 0.0]
        lines += ["## Parity CPU vs CUDA (tiny models, float32)", "",
                  f"- {len(same)} of {len(par)} (architecture, method) pairs: the same plan and the same zero mask on both.",
                  f"- {len(exact)} of {len(par)}: the CUDA-pruned model, saved and reloaded with the stock Auto class, "
                  "gives bit-identical logits to the pruned model itself (both on the CPU).", "",
                  "| arch | method | same plan | mask agreement | max logit diff (scale) | reload diff | error |",
                  "|---|---|---|---|---|---|---|"]
        for r in par:
            ma = "" if r.get("mask_agreement") is None else f"{r['mask_agreement']:.4f}"
            lines.append(f"| {r['arch']} | {r['case']} | {r.get('same_plan', '')} | {ma} | "
                         f"{r.get('max_logit_diff', float('nan')):.2e} ({r.get('logit_scale', float('nan')):.1f}) | "
                         f"{r.get('reload_max_diff', float('nan')):.1e} | {r.get('error', '')} |")
    tim = results.get("timing", [])
    if tim:
        lines += ["", "## Timing on CUDA (SmolLM2-135M shape, random weights, float32)", "",
                  "| method | prune s | forward s (unit) | passes | peak GPU MiB | error |", "|---|---|---|---|---|---|"]
        for r in tim:
            if "error" in r:
                lines.append(f"| {r['case']} | | | | | {r['error']} |")
            else:
                lines.append(f"| {r['case']} | {r['prune_s']:.2f} | {r['forward_s']:.3f} | {r['passes']:.1f} | "
                             f"{r['peak_gpu_mib']:.0f} | |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="benchmarks/results/gpu_check.json")
    p.add_argument("--timing", action="store_true", help="also time the methods on a SmolLM2-shaped model")
    p.add_argument("--archs", default="llama,mistral,qwen2,gemma2,opt")
    p.add_argument("--device", default="cuda", help="the device compared with the CPU ('cpu': a dry run)")
    p.add_argument("--markdown", action="store_true", help="only (re)write the .md beside --out from its JSON")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    out = Path(args.out)
    if args.markdown:
        out.with_suffix(".md").write_text(markdown(json.loads(out.read_text())))
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        logging.error("no CUDA device: this check runs on a GPU machine")
        return 2
    import transformers

    results = {"device": torch.cuda.get_device_name() if args.device == "cuda" else args.device, "torch": torch.__version__,
               "transformers": transformers.__version__, "python": platform.python_version(),
               "date": time.strftime("%Y-%m-%d")}
    results["parity"] = parity(args.archs.split(","), TINY_CASES, args.device)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    if args.timing:
        results["timing"] = timing(TIMING_CASES)
        out.write_text(json.dumps(results, indent=1))
    out.with_suffix(".md").write_text(markdown(results))
    bad = [r for r in results["parity"] if "error" in r or not r["same_plan"] or r["reload_max_diff"] > 1e-5]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
