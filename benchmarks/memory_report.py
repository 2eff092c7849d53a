"""The memory benchmark's results file and its markdown page (benchmarks/results/memory.{json,md})."""

from __future__ import annotations

import json
from pathlib import Path

MIB, GIB = 2**20, 2**30


def load(path: Path, protocol: dict) -> dict:
    """The results in ``path`` when they were measured with ``protocol``, else an empty set of results."""
    if path.exists():
        data = json.loads(path.read_text())
        if data.get("protocol") == protocol:
            return data
    return {"protocol": protocol, "methods": []}


def _f(value, fmt: str = "{:.1f}") -> str:
    return "-" if value is None else fmt.format(value)


def _pct(value) -> str:
    return "-" if value is None else ("0%" if round(100 * value) == 0 else f"{100 * value:+.0f}%")


def measured_table(results: dict) -> list[str]:
    p = results["protocol"]
    m = p["model"]
    lines = [
        f"Random LLaMA in float32: hidden {m['hidden']}, {m['layers']} layers, intermediate {m['inter']}, "
        f"vocabulary {m['vocab']}, {m['heads']} heads ({m['kv_heads']} KV); {p['tokens']} tokens per row, "
        f"{p['rows']} rows ({p['search_rows']} for the SLEB/FinerCut searches). Each cell is a fresh process.",
        "",
        "`extra` = peak RSS while pruning - RSS after loading the model and calibration, with the activation "
        "stores on disk (`prune_(..., activations_dir=...)`); `H` = rows x tokens x hidden x 4 B; `bound` = 3 H + "
        "2 layers' weights (+ one batch of 4 rows of float32 logits where the method runs the LM head). `2L`: "
        "layers doubled; `2n`: rows doubled (growth of the bytes). Target: extra <= bound, both growths < 10%. "
        "`RAM stores`: extra / H of the same run with the stores in CPU memory (the default; a store spills to "
        "disk only when the machine's available memory runs short). `accounting`: what "
        "`hf_pruning.engine.accounting` predicts for this run with the stores in CPU memory (device + host + "
        "store).",
        "",
        "| method | rows | H MiB | extra MiB | extra / H | bound / H | within | 2L extra MiB | 2L growth | "
        "2n extra MiB | 2n growth | prune s | meets target | RAM stores: extra / H | accounting / H |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results.get("methods", []):
        sizes = r.get("sizes", {})
        base, two_l, two_n = sizes.get("base", {}), sizes.get("layers", {}), sizes.get("rows", {})
        errors = "; ".join(f"{s}: {v['error']}" for s, v in sizes.items() if v.get("error"))
        mark = {True: "yes", False: "**no**"}
        lines.append(
            f"| {r['key']} | {base.get('rows', '-')} | {_f(r.get('H_bytes') and r['H_bytes'] / MIB)} | "
            f"{_f(r.get('extra_bytes') and r['extra_bytes'] / MIB)} | {_f(r.get('extra_H'))} | "
            f"{_f(r.get('bound_H'))} | {mark.get(r.get('within_bound'), '-')} | "
            f"{_f(two_l.get('extra_bytes') and two_l['extra_bytes'] / MIB)} | {_pct(r.get('growth_layers'))} | "
            f"{_f(two_n.get('extra_bytes') and two_n['extra_bytes'] / MIB)} | {_pct(r.get('growth_rows'))} | "
            f"{_f(base.get('prune_s'))} | {mark.get(r.get('meets_target'), '-')}"
            + (f" (errors: {errors})" if errors else "") + f" | {_f(r.get('ram_extra_H'))} | "
            + _f(r.get("accounting_bytes") and r.get("H_bytes") and r["accounting_bytes"] / r["H_bytes"]) + " |")
    lines += ["", "magnitude is data-free (no calibration, no activations): not measured."]
    return lines


def accounting_table(acc: dict) -> list[str]:
    calib = acc["calibration"]
    lines = [
        f"From `hf_pruning.engine.accounting` at {calib['rows']} x {calib['tokens']} tokens, batches of "
        f"{calib['batch_rows']} rows, bf16 weights, float32/float64 statistics. GPU: what the execution device "
        "holds with the weights offloaded (one layer onloaded per stage, plus the LM head where a method needs "
        "it); CPU RAM: what the method holds on the host besides the weights; store: the activation store, in "
        "CPU RAM or on disk (`store_folder`). The weights themselves go where the `device_map` puts them.",
        "",
    ]
    for name, model in acc["models"].items():
        lines += [f"**{name}** (weights {model['weights_bytes'] / GIB:.1f} GiB)", "",
                  "| method | GPU GiB | GPU GiB, searches scoring 1 row | CPU RAM GiB | store GiB (CPU RAM or disk) |",
                  "|---|---|---|---|---|"]
        for method, est in model["methods"].items():
            one = est.get("device_one_row_chunks", est["device"])
            lines.append(f"| {method} | {est['device'] / GIB:.2f} | "
                         f"{'=' if one == est['device'] else f'{one / GIB:.2f}'} | {est['host'] / GIB:.2f} | "
                         f"{est['store'] / GIB:.1f} |")
        lines.append("")
    lines += ["llm-compressor's documented figures (quantization/sparsification on its sequential pipeline):", "",
              "| what | figure | source |", "|---|---|---|"]
    lines += [f"| {p['what']} | {p['figure']} | {p['source']} |" for p in acc["peers"]]
    first = next(iter(acc["models"].values()))["methods"]
    seen: dict[str, str] = {}
    for est in first.values():
        for terms in est["stages"].values():
            for t in terms:
                seen.setdefault(t["name"].split(" (")[0], t["why"])
    lines += ["", "Terms and their assumptions:", ""]
    lines += [f"- {name}: {why}" for name, why in seen.items() if why]
    return lines


def readme_table(acc: dict) -> list[str]:
    """The README's table: device and store GiB per method for Llama-3-8B and 70B (device with searches scoring
    one row at a time in brackets where it differs)."""
    (small, a), (big, b) = list(acc["models"].items())[:2]
    tag = {name: name.replace("Llama-3-", "") for name in (small, big)}

    def device(est):
        one = est.get("device_one_row_chunks", est["device"])
        return f"{est['device'] / GIB:.2f}" + ("" if one == est["device"] else f" ({one / GIB:.2f} scoring 1 row)")

    lines = [f"| method | {tag[small]} GPU GiB | {tag[small]} store GiB | {tag[big]} GPU GiB | {tag[big]} store GiB |",
             "|---|---|---|---|---|"]
    for m, est in a["methods"].items():
        lines.append(f"| {m} | {device(est)} | {est['store'] / GIB:.1f} | {device(b['methods'][m])} | "
                     f"{b['methods'][m]['store'] / GIB:.1f} |")
    return lines


def markdown(results: dict) -> str:
    mach = results.get("machine", {})
    lines = ["# Peak memory of the calibration methods", "",
             "Written by `python -m benchmarks.memory` (`--quick`: memory-quick.md); do not edit by hand.", ""]
    if mach:
        lines += [f"Measured {mach.get('date')} on {mach.get('processor')} ({mach.get('cpus')} CPUs, "
                  f"{mach.get('ram_bytes', 0) / GIB:.0f} GiB RAM, {mach.get('platform')}), OMP_NUM_THREADS="
                  f"{mach.get('omp_num_threads')}, {' '.join(f'{k}={v}' for k, v in mach.get('probe_env', {}).items())}; torch {mach.get('torch')}, transformers "
                  f"{mach.get('transformers')}, accelerate {mach.get('accelerate')}, hf_pruning "
                  f"{mach.get('hf_pruning')} at {str(mach.get('commit'))[:10]}.", ""]
    lines += ["## Measured", ""]
    lines += measured_table(results) if results.get("methods") else ["Not measured yet: run "
                                                                     "`python -m benchmarks.memory`."]
    if results.get("accounting"):
        lines += ["", "## The engine's accounting: Llama-3-8B and Llama-3-70B", ""]
        lines += accounting_table(results["accounting"])
    return "\n".join(lines) + "\n"


def write(path: Path, results: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1) + "\n")
    path.with_suffix(".md").write_text(markdown(results))
    if results.get("accounting") and path.resolve() == Path(__file__).resolve().parent / "results" / "memory.json":
        from .readme import replace_block

        replace_block("memory-accounting", readme_table(results["accounting"]))
