"""Peak memory of every calibration method on a random LLaMA, and the engine's accounting for Llama-3-8B/70B.

    python -m benchmarks.memory                 # -> benchmarks/results/memory.{json,md} (about 20 minutes, 2 cores)
    python -m benchmarks.memory --quick         # a small model and few rows -> memory-quick.{json,md} (minutes)
    python -m benchmarks.memory --only wanda,sleb --jobs 2
    python -m benchmarks.memory --table         # only the accounting table (no measurement), into memory.md

Every measurement runs in a fresh process (:mod:`benchmarks.memory_probe`): the peak extra memory of a run is
the peak resident set while pruning minus the resident set after loading the model and the calibration. It is
reported in units of ``H`` = rows x tokens x hidden x 4 bytes (one float32 copy of the calibration hidden
states) and checked against ``3 H + 2 layers' weights (+ one batch of float32 logits for methods that run the LM
head)``. Each method is measured with its activation stores on disk (``prune_(..., activations_dir=...)``, the
configuration for models whose activations do not fit in RAM) three times: as is, with the layers doubled and
with the rows doubled (growth of the bytes, 10% target); and once as is with the stores in CPU memory (the
default), which adds the stores themselves: 2 H for the layer-by-layer methods, about one H per layer kept for
the searches and gradient methods.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from hf_pruning.engine.accounting import (
    HEAD_METHODS,
    LLAMA3_8B,
    LLAMA3_70B,
    CalibrationShape,
    MemoryEstimate,
    ModelShape,
    memory_table,
    method_memory,
)

ROOT = Path(__file__).resolve().parent.parent
#: the random LLaMA (float32) and calibration sizes: ``rows`` for most methods, ``search_rows`` for the depth
#: searches, whose cost grows with candidates x rows (SLEB, FinerCut)
FULL = {"model": {"hidden": 256, "layers": 8, "inter": 704, "vocab": 32000, "heads": 8, "kv_heads": 4},
        "rows": 32, "search_rows": 8, "tokens": 256, "stores": "disk; ram for the 'ram' size"}
QUICK = {"model": {"hidden": 256, "layers": 4, "inter": 704, "vocab": 8000, "heads": 8, "kv_heads": 4},
         "rows": 8, "search_rows": 4, "tokens": 256, "stores": "disk; ram for the 'ram' size"}
#: rows a batch holds (engine.LAYER_BATCH): the logits term of the bound is one batch
BATCH_ROWS = 4
GROWTH_TARGET = 0.10
#: the probes' environment. glibc's mmap threshold is fixed: by default it adapts to the sizes freed, and
#: whether a freed 1-30 MB tensor goes back to the system then depends on the order of frees (which varies
#: with Python's hash seed): peaks moved by 10 MiB between otherwise identical runs. With every block over
#: 64 KiB mapped on its own, the peak follows the live tensors (runs agree to 0.2 MiB). The hash seed is fixed too.
PROBE_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "PYTHONHASHSEED": "0", "TQDM_DISABLE": "1"}

#: (key, method, settings, accounting key, calibration rows: "rows" or "search_rows"). magnitude is data-free.
CASES = [
    ("wanda", "wanda", {"sparsity": 0.5}, "wanda", "rows"),
    ("wanda_two_pass", "wanda", {"sparsity": 0.5, "one_pass": False}, "wanda_two_pass", "rows"),
    ("sparsegpt", "sparsegpt", {"sparsity": 0.5}, "sparsegpt", "rows"),
    ("llm_barber", "llm_barber", {"init": "existing", "sparsity": 0.5, "threshold": 0.1}, "llm_barber", "rows"),
    ("shortgpt", "shortgpt", {"num_removals": 2}, "shortgpt", "rows"),
    ("sleb", "sleb", {"num_removals": 1}, "sleb", "search_rows"),
    ("finercut", "finercut", {"num_removals": 1}, "finercut", "search_rows"),
    ("gradmap", "gradmap", {"num_removals": 2, "compensate": False}, "gradmap", "rows"),
    ("gradmap_compensated", "gradmap", {"num_removals": 2, "compensate": True}, "gradmap_compensated", "rows"),
    ("taylor", "taylor", {"num_removals": 2}, "taylor", "rows"),
    ("harp", "harp", {"num_layers": 1, "grid": [0.0, 0.5, 1.0]}, "harp", "rows"),
    ("flap", "flap", {"param_ratio": 0.0833}, "flap", "rows"),
    ("heads", "heads", {"score": "wanda", "unit": "group", "per_layer": 1}, "heads", "rows"),
]
#: base, layers doubled, rows doubled (stores on disk); ram: base with the stores in CPU memory
SIZES = ("base", "layers", "rows", "ram")
#: llm-compressor's documented figures (../shared/docs/SCALE.md, section B)
PEERS = [
    ("SparseGPT, Llama-3-8B, one GPU", 'GPU memory "mem(1 Layer) * 2 ~= 1Gb"',
     "https://github.com/vllm-project/llm-compressor/blob/main/docs/guides/memory.md"),
    ("Llama-3-8B, distributed oneshot (1/2/4 GPUs: 745/372/264 s)", "5.8 GB max memory",
     "https://github.com/vllm-project/llm-compressor/blob/main/docs/guides/big_models_and_distributed/"
     "distributed_oneshot.md"),
    ("Llama-3.3-70B, sequential onloading", "quantized on one GPU (model over 80 GB)",
     "https://docs.vllm.ai/projects/llm-compressor/en/0.11.0/examples/big_models_with_sequential_onloading/"),
]


def spec_for(case: tuple, size: str, protocol: dict, workdir: str) -> dict:
    key, method, settings, _, rows_key = case
    model = dict(protocol["model"])
    rows = protocol[rows_key]
    if size == "layers":
        model["layers"] *= 2
    if size == "rows":
        rows *= 2
    return {"method": method, "settings": settings, "model": model, "rows": rows, "tokens": protocol["tokens"],
            "seed": 0, "workdir": os.path.join(workdir, f"{key}-{size}"), "prepared": method == "llm_barber",
            "activations_on_disk": size != "ram"}


def _run_probe(args: list[str], timeout: float) -> tuple[dict | None, str | None]:
    env = {**os.environ, **PROBE_ENV, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    try:
        proc = subprocess.run([sys.executable, "-m", "benchmarks.memory_probe", *args], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None, f"timed out after {timeout:.0f} s"
    if proc.returncode != 0:
        return None, (proc.stderr.strip().splitlines() or ["exit code %d" % proc.returncode])[-1][:300]
    lines = proc.stdout.strip().splitlines()
    return (json.loads(lines[-1]) if lines else None), None


def measure_one(case: tuple, size: str, protocol: dict, workdir: str, timeout: float) -> dict:
    """One fresh-process measurement (after the preparation run LLM-Barber needs)."""
    spec = spec_for(case, size, protocol, workdir)
    if spec["prepared"]:
        os.makedirs(spec["workdir"], exist_ok=True)
        _, error = _run_probe(["--prepare", json.dumps(spec)], timeout)
        if error:
            return {"error": f"preparation: {error}", "rows": spec["rows"], "layers": spec["model"]["layers"]}
    result, error = _run_probe([json.dumps(spec)], timeout)
    out = {"rows": spec["rows"], "layers": spec["model"]["layers"], "tokens": spec["tokens"]}
    return {**out, **(result or {}), **({"error": error} if error else {})}


def summarize(case: tuple, sizes: dict, protocol: dict) -> dict:
    """H, the bound, the multiples of H and the growths of one method's measurements."""
    key, method, settings, acc_key, rows_key = case
    shape = ModelShape(protocol["model"]["hidden"], protocol["model"]["layers"], protocol["model"]["inter"],
                       protocol["model"]["vocab"], 4, protocol["model"]["heads"], protocol["model"]["kv_heads"])
    head = acc_key in HEAD_METHODS
    row = {"key": key, "method": method, "settings": settings, "needs_head": head, "sizes": sizes}
    h_of = {s: m["rows"] * protocol["tokens"] * shape.hidden * 4 for s, m in sizes.items()}
    for s, m in sizes.items():
        if m.get("extra_bytes") is not None:
            m["H_bytes"] = h_of[s]
            m["extra_H"] = m["extra_bytes"] / h_of[s]
    base = sizes.get("base", {})
    if base.get("extra_bytes") is None:
        return row
    logits = BATCH_ROWS * protocol["tokens"] * shape.vocab * 4 if head else 0
    bound = 3 * h_of["base"] + 2 * shape.layer_bytes(4) + logits
    row.update(H_bytes=h_of["base"], extra_bytes=base["extra_bytes"], extra_H=base["extra_H"], bound_bytes=bound,
               bound_H=bound / h_of["base"], within_bound=base["extra_bytes"] <= bound)
    doubled_l, doubled_n = sizes.get("layers", {}), sizes.get("rows", {})
    if doubled_l.get("extra_bytes") is not None:
        row["growth_layers"] = doubled_l["extra_bytes"] / max(base["extra_bytes"], 1) - 1
    if doubled_n.get("extra_bytes") is not None:
        row["growth_rows"] = doubled_n["extra_bytes"] / max(base["extra_bytes"], 1) - 1
    if sizes.get("ram", {}).get("extra_bytes") is not None:
        row["ram_extra_H"] = sizes["ram"]["extra_H"]
    checks = [row["within_bound"]] + [row[k] < GROWTH_TARGET for k in ("growth_layers", "growth_rows") if k in row]
    row["meets_target"] = all(checks)
    return row


def predict(row: dict, protocol: dict) -> None:
    """The engine's accounting for the measured run (everything on the CPU: device + host + store), beside the
    measurement: what the methods should hold once they run on the engine."""
    case = next((c for c in CASES if c[0] == row["key"]), None)
    base = row.get("sizes", {}).get("base", {})
    if case is None or "rows" not in base:
        return
    m = protocol["model"]
    shape = ModelShape(m["hidden"], m["layers"], m["inter"], m["vocab"], 4, m["heads"], m["kv_heads"])
    # a model in memory: the searches score one row at a time (DepthRunner chunk_rows)
    est = method_memory(case[3], shape, CalibrationShape(base["rows"], protocol["tokens"], BATCH_ROWS, chunk_rows=1))
    est = MemoryEstimate(est.method, {k: [t for t in terms if not t.why.startswith("CUDA only")]
                                      for k, terms in est.stages.items()})  # the run is on the CPU
    row["accounting_bytes"] = est.device + est.host + est.store


def machine() -> dict:
    import accelerate
    import torch
    import transformers

    import hf_pruning

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = None
    with open("/proc/meminfo") as f:
        ram = int(f.readline().split()[1]) * 1024
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "ram_bytes": ram, "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__,
            "accelerate": accelerate.__version__, "hf_pruning": hf_pruning.__version__, "commit": commit,
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS", "1"), "probe_env": PROBE_ENV,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def accounting(calib: CalibrationShape | None = None) -> dict:
    """The engine's accounting for Llama-3-8B and 70B (bf16) at 128 x 2048 tokens, batches of 4 rows."""
    calib = calib or CalibrationShape(128, 2048, 4)
    out = {"calibration": vars(calib), "models": {}}
    for name, shape in (("Llama-3-8B", LLAMA3_8B), ("Llama-3-70B", LLAMA3_70B)):
        one_row = memory_table(shape, CalibrationShape(calib.rows, calib.tokens, calib.batch_rows, chunk_rows=1))
        methods = {m: {**e.to_dict(), "device_one_row_chunks": one_row[m].device}
                   for m, e in memory_table(shape, calib).items()}
        out["models"][name] = {"shape": vars(shape), "weights_bytes": shape.weight_bytes(), "methods": methods}
    out["peers"] = [{"what": w, "figure": f, "source": u} for w, f, u in PEERS]
    return out


def measure_all(cases: list, sizes: list[str], protocol: dict, jobs: int, timeout: float) -> list[dict]:
    with tempfile.TemporaryDirectory(prefix="hf_pruning_memory_") as workdir:
        work = [(case, size) for case in cases for size in sizes]
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            results = list(pool.map(lambda cs: measure_one(cs[0], cs[1], protocol, workdir, timeout), work))
    by_case: dict = {}
    for (case, size), result in zip(work, results):
        by_case.setdefault(case[0], {})[size] = result
        print(f"{case[0]:20s} {size:6s} " + (f"error: {result['error']}" if "error" in result else
              f"extra {result['extra_bytes'] / 2**20:8.1f} MiB in {result['prune_s']:.1f} s"), flush=True)
    return [summarize(case, by_case[case[0]], protocol) for case in cases]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a small model and few rows (minutes)")
    parser.add_argument("--only", default=None, help="comma-separated keys, e.g. wanda,sleb (others kept)")
    parser.add_argument("--sizes", default=",".join(SIZES), help="base, layers (doubled), rows (doubled)")
    parser.add_argument("--table", action="store_true", help="only rewrite the accounting table (no measurement)")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                        help="measurements run at once (each its own process, one thread)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per measurement")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args(argv)
    from .memory_report import load, write

    name = "memory-quick" if args.quick else "memory"
    path = Path(args.out) / f"{name}.json"
    protocol = QUICK if args.quick else FULL
    results = load(path, protocol)
    if not args.table:
        only = set(filter(None, (args.only or "").split(",")))
        unknown = only - {c[0] for c in CASES}
        if unknown:
            parser.error(f"unknown --only keys {sorted(unknown)}; known: {', '.join(c[0] for c in CASES)}")
        cases = [c for c in CASES if not only or c[0] in only]
        sizes = [s for s in args.sizes.split(",") if s]
        if set(sizes) - set(SIZES) or "base" not in sizes:
            parser.error(f"--sizes must include base and be among {SIZES}, got {args.sizes}")
        fresh = {r["key"]: r for r in measure_all(cases, sizes, protocol, args.jobs, args.timeout)}
        results["methods"] = [fresh.get(c[0]) or old for c in CASES
                              for old in [next((r for r in results["methods"] if r["key"] == c[0]), None)]
                              if fresh.get(c[0]) or old]
        results["machine"] = machine()
    for row in results["methods"]:
        predict(row, protocol)
    results["accounting"] = accounting()
    write(path, results)
    print(f"wrote {path} and {path.with_suffix('.md')}")


if __name__ == "__main__":
    main()
