"""Pruned models in real serving engines: tiny models with every op and SmolLM2 pruned by every method, exported,
run in llama.cpp and vLLM.

    python -m benchmarks.serving [--only TEXT ...] [--skip-vllm] [--readme]   -> benchmarks/results/serving.{json,md}

For each SmolLM2 row: prune SmolLM2-135M (small calibration: this measures the export, not the method), export GGUF F32
and Q8_0, and in llama.cpp (llama-cpp-python, built by ``make serve-deps``) compare next-token log-probs with the
pruned model in transformers on 64 tokens of held-out text, compare 32-token greedy continuations, and time
prefill and decode of dense and pruned files on this CPU. With vLLM's CPU build in its own virtualenv
(``make serve-deps``), the ``vllm`` export of the same model is checked the same way (benchmarks/serving_vllm.py).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

RESULTS = Path(__file__).parent / "results"
#: the rows: (method, settings); small calibration for all (benchmarks/grid.py has the published settings)
ROWS: list[tuple[str, dict]] = [
    ("dense", {}),
    ("magnitude", {"sparsity": 0.5}),
    ("wanda", {"pattern": "2:4"}),
    ("sparsegpt", {"sparsity": 0.5}),
    ("llm_barber", {"init": "wanda", "sparsity": 0.5, "granularity": "output1", "threshold": 0.1}),
    ("shortgpt", {"param_ratio": 0.2333}),
    ("sleb", {"param_ratio": 0.2333}),
    ("taylor", {"param_ratio": 0.2333}),
    ("gradmap", {"param_ratio": 0.2333}),
    ("finercut", {"param_ratio": 0.2333}),
    ("harp", {"num_layers": 10}),
    ("harp", {"num_layers": 10, "flap_match": True}),
    ("flap", {"param_ratio": 0.0833}),
    ("heads", {"score": "wanda", "unit": "group", "per_layer": 1}),
]
EVAL_TOKENS = 64
GREEDY_TOKENS = 32
SPEED_PROMPT = 128
SPEED_DECODE = 64
SPEED_REPEATS = 3


def log_probs(scores: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax in float64."""
    s = np.asarray(scores, dtype=np.float64)
    m = s.max(-1, keepdims=True)
    return s - m - np.log(np.exp(s - m).sum(-1, keepdims=True))


def hf_reference(model, ids: list[int], new_tokens: int = GREEDY_TOKENS) -> dict:
    """The model's log-probs on ``ids`` [T, vocab] and its greedy continuation of ``ids``."""
    x = torch.tensor([ids])
    greedy: list[int] = []
    with torch.no_grad():
        out = model(x, use_cache=True)
        lp = torch.log_softmax(out.logits[0].double(), -1).numpy()
        for _ in range(new_tokens):  # argmax decoding with the KV cache; the end-of-text token is not suppressed
            greedy.append(int(out.logits[0, -1].argmax()))
            out = model(torch.tensor([greedy[-1:]]), past_key_values=out.past_key_values, use_cache=True)
    import copy

    with torch.no_grad():  # the same model in float64: how far transformers' own float32 forward is from exact
        lp64 = torch.log_softmax(copy.deepcopy(model).double()(x).logits[0], -1).numpy()
    return {"log_probs": lp, "greedy": greedy, "log_probs_fp64": lp64}


def open_gguf(path: str | os.PathLike, **kwargs):
    """``llama_cpp.Llama`` on a GGUF file, with llama.cpp's extra CPU buffer types off: in llama-cpp-python 0.3.36
    built natively on this CPU (AMX), repacking quantized weights into them crashes (segfault), also on GGUF files
    llama.cpp's own converter wrote."""
    import llama_cpp.llama_cpp as low
    from llama_cpp import Llama

    defaults = low.llama_model_default_params

    def params():
        p = defaults()
        p.use_extra_bufts = False
        return p

    low.llama_model_default_params = params
    try:
        return Llama(model_path=str(path), verbose=False, **kwargs)
    finally:
        low.llama_model_default_params = defaults


def llama_cpp_check(path: str | os.PathLike, ids: list[int], reference: dict, threads: int = 2) -> dict:
    """Log-probs and greedy tokens of the GGUF file in llama.cpp against ``reference`` (see :func:`hf_reference`)."""
    exact_cache = dict(type_k=0, type_v=0)  # float32 KV cache: the comparison is of the weights, not the cache
    llm = open_gguf(path, logits_all=True, n_ctx=512, n_threads=threads, **exact_cache)
    llm.eval(ids)
    lp = log_probs(np.array(llm.scores[: len(ids)]))
    greedy = []
    for _ in range(len(reference["greedy"])):
        tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        greedy.append(tok)
        llm.eval([tok])
    import llama_cpp

    out = {
        "max_abs_logprob_diff": float(np.abs(lp - reference["log_probs"]).max()),
        "max_abs_logprob_diff_fp64": float(np.abs(lp - reference["log_probs_fp64"]).max()),
        "hf_fp32_vs_fp64": float(np.abs(reference["log_probs"] - reference["log_probs_fp64"]).max()),
        "greedy_equal": greedy == reference["greedy"],
        "greedy_first_diff": next((i for i, (a, b) in enumerate(zip(greedy, reference["greedy"])) if a != b), None),
        "engine_params": int(llama_cpp.llama_model_n_params(llm.model)),
        "file_bytes": os.path.getsize(path),
    }
    llm.close()
    return out


def llama_cpp_speed(path: str | os.PathLike, ids: list[int], threads: int = 2) -> dict:
    """Prefill and decode tokens per second of a GGUF file in llama.cpp (default KV cache, greedy completion)."""
    llm = open_gguf(path, n_ctx=512, n_threads=threads, n_batch=512)
    prompt = (ids * (SPEED_PROMPT // len(ids) + 1))[:SPEED_PROMPT]
    no_eos = {llm.token_eos(): -1e9}  # every run decodes exactly max_tokens tokens
    llm.create_completion(prompt[:8], max_tokens=2, temperature=0.0)  # warm up

    def seconds(max_tokens: int) -> float:
        llm.reset()
        t0 = time.perf_counter()
        done = llm.create_completion(prompt, max_tokens=max_tokens, temperature=0.0, logit_bias=no_eos)
        assert done["usage"]["completion_tokens"] == max_tokens, done["usage"]
        return time.perf_counter() - t0

    prefill = min(seconds(1) for _ in range(SPEED_REPEATS))  # best of SPEED_REPEATS
    total = min(seconds(SPEED_DECODE + 1) for _ in range(SPEED_REPEATS))
    llm.close()
    return {"prefill_tok_s": SPEED_PROMPT / prefill, "decode_tok_s": SPEED_DECODE / (total - prefill)}


TINY_ARCHS = ("llama", "mistral", "qwen2")


def _key(row: dict) -> str:
    return row["model"] if row.get("model", "").startswith("tiny") else _row_name(row["method"], row["settings"])


def _folder(method: str, settings: dict) -> str:
    return _row_name(method, settings).replace(" ", "_").replace('"', "").replace(":", "=")[:80]


def _row_name(method: str, settings: dict) -> str:
    return method + ("" if not settings else " " + json.dumps(settings, sort_keys=True))


def run_row(method: str, settings: dict, out: Path, ids: list[int], calibration, vllm_python: str | None) -> dict:
    """One SmolLM2 row: prune with ``method`` and check its exports."""
    import hf_pruning
    from benchmarks.assets import load_smollm2

    model, tokenizer = load_smollm2()
    t0 = time.perf_counter()
    if method != "dense":
        spec = hf_pruning.get_method(method)
        hf_pruning.prune_(model, spec.config_class(**settings), calibration if spec.needs_calibration else None)
    row = {"model": "SmolLM2-135M", "method": method, "settings": settings, "prune_s": time.perf_counter() - t0}
    folder = out / _folder(method, settings)
    return {**row, **check_exports(model, tokenizer, ids, folder, vllm_python, speed=True)}


def tiny_row(arch: str, out: Path, vllm_python: str | None) -> dict:
    """A tiny random model of ``arch`` (head size 32, as vLLM's CPU attention needs) with every op vLLM can carry
    (tests/test_serving_engines.py: VLLM_OPS), checked in both engines."""
    import hf_pruning

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from test_serving_engines import VLLM_OPS, _ids
    from tiny_models import tiny_bpe_tokenizer, tiny_export_model

    tokenizer = tiny_bpe_tokenizer()
    model = tiny_export_model(arch, hidden_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=32)
    hf_pruning.prune_(model, hf_pruning.PlanConfig(plan={"ops": VLLM_OPS}))
    row = {"model": f"tiny {arch}", "method": "plan", "settings": {"ops": "VLLM_OPS"}}
    return {**row, **check_exports(model, tokenizer, _ids(tokenizer), out / f"tiny-{arch}", vllm_python, speed=False)}


def check_exports(model, tokenizer, ids: list[int], folder: Path, vllm_python: str | None, speed: bool) -> dict:
    """Export ``model`` to GGUF F32 and Q8_0 (checked in llama.cpp) and for vLLM (checked when ``vllm_python``)."""
    from hf_pruning.export import ExportError, export

    reference = hf_reference(model, ids)
    row: dict = {}
    for outtype in ("f32", "q8_0"):
        try:
            report = export(model, folder / f"gguf-{outtype}", "gguf", tokenizer=tokenizer, outtype=outtype,
                            name="model")
        except ExportError as e:
            row[f"gguf_{outtype}"] = {"error": str(e)}
            continue
        gguf = folder / f"gguf-{outtype}" / report.files[0]
        entry = {"architecture": report.architecture, "params_written": report.params_written,
                 "params_dense": report.params_dense, "notes": report.notes}
        entry.update(llama_cpp_check(gguf, ids, reference))
        if speed:
            entry.update(llama_cpp_speed(gguf, ids))
        row[f"gguf_{outtype}"] = entry
    if vllm_python:
        np.savez(folder / "reference.npz", ids=np.array(ids), log_probs=reference["log_probs"],
                 greedy=np.array(reference["greedy"]))
        try:
            report = export(model, folder / "vllm", "vllm", tokenizer=tokenizer, name="model")
            row["vllm"] = {"architecture": report.architecture, "params_written": report.params_written,
                           "notes": report.notes, **_run_vllm(vllm_python, folder)}
        except ExportError as e:
            row["vllm"] = {"error": str(e)}
    return row


def _run_vllm(python: str, folder: Path) -> dict:
    cmd = [python, str(Path(__file__).with_name("serving_vllm.py")), str(folder / "vllm"), str(folder / "reference.npz")]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"})
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode or not lines:
        return {"error": (proc.stderr or proc.stdout)[-1500:]}
    return json.loads(lines[-1])


def table_lines(rows: list[dict]) -> list[str]:
    """The results table (markdown lines): also the README's generated ``serving`` block."""
    dense = next((r for r in rows if r["method"] == "dense"), {})
    base, q8_base = dense.get("gguf_f32", {}), dense.get("gguf_q8_0", {})
    lines = [
        "| model | method | llama.cpp arch | F32 max abs diff | vs float64: llama.cpp / transformers | greedy equal | params in "
        "file | vs dense | F32 decode tok/s | Q8_0 MB | Q8_0 decode tok/s | vLLM arch | vLLM max abs diff | vLLM greedy "
        "equal |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def speed(entry, ref):
        if "decode_tok_s" not in entry:
            return "-"
        rel = f" ({entry['decode_tok_s'] / ref['decode_tok_s']:.2f}x)" if "decode_tok_s" in ref else ""
        return f"{entry['decode_tok_s']:.0f}{rel}"

    for r in rows:
        f32, q8, vl = r.get("gguf_f32", {}), r.get("gguf_q8_0", {}), r.get("vllm", {})
        name = _row_name(r["method"], r["settings"])
        vllm = ["refused", "-", "-"] if "error" in vl and "architecture" not in vl else [
            vl.get("architecture", "-"), f"{vl['max_abs_logprob_diff']:.1e}" if "max_abs_logprob_diff" in vl else
            ("failed" if vl else "-"), str(vl.get("greedy_equal", "-"))]
        if "error" in f32:
            lines.append(f"| {r.get('model', '')} | {name} | refused | - | - | - | - | - | - | - | - | {' | '.join(vllm)} |")
            continue
        own = (f"{f32['max_abs_logprob_diff_fp64']:.1e} / {f32['hf_fp32_vs_fp64']:.1e}"
               if "hf_fp32_vs_fp64" in f32 else "-")
        lines.append(
            f"| {r.get('model', '')} | {name} | {f32['architecture']} | {f32['max_abs_logprob_diff']:.1e} | {own} | "
            f"{f32['greedy_equal']} | {f32['engine_params']:,} | {f32['engine_params'] / f32['params_dense']:.3f} | "
            f"{speed(f32, base)} | {q8.get('file_bytes', 0) / 2**20:.1f} | {speed(q8, q8_base)} | {' | '.join(vllm)} |")
    return lines


def _shorten(text: str, limit: int = 600) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + " ..."


def write_markdown(rows: list[dict], path: Path) -> None:
    lines = [
        "# Pruned SmolLM2-135M in serving engines",
        "",
        f"Produced by `python -m benchmarks.serving` (`make bench-serving`) on this CPU (2 cores; llama.cpp through "
        f"llama-cpp-python 0.3.36, 2 threads; vLLM: `vllm-cpu` 0.32.0, float32). Log-prob difference: llama.cpp, the "
        f"max over {EVAL_TOKENS} held-out tokens x the whole 49,152-token vocabulary of |engine - transformers| (F32 "
        f"file, F32 KV cache); beside it, the differences of llama.cpp and of transformers' float32 forward from the "
        f"same model run in float64 in transformers (where the first column exceeds 1e-3, these say which side is "
        f"off); vLLM, the same max over the whole vocabulary (float32). "
        f"Greedy: "
        f"{GREEDY_TOKENS} new tokens identical to transformers' argmax decoding. Speed: llama.cpp greedy decode after "
        f"a {SPEED_PROMPT}-token prompt, {SPEED_DECODE} tokens, relative to the dense file of the same type. "
        "'params in file' is llama.cpp's own count of the F32 file (padding included), 'vs dense' that count over "
        "the unpruned model's. Calibration: 4 x 128 tokens for every method (this measures the export, not the "
        "methods). The tiny rows are random models with every op vLLM can carry (the engine tests' plan).",
        "",
        *table_lines(rows),
    ]
    notes = [(_key(r), r.get("gguf_f32", {}).get("notes")) for r in rows
             if r.get("gguf_f32", {}).get("notes")]
    if notes:
        lines += ["", "Padding written into the F32 GGUF files (from each export's report):", ""]
        lines += [f"- {m}: {_shorten('; '.join(n))}" for m, n in notes]
    vnotes = [(_key(r), r["vllm"].get("notes") or r["vllm"].get("error"))
              for r in rows if r.get("vllm", {}).get("notes") or r.get("vllm", {}).get("error")]
    if vnotes:
        lines += ["", "vLLM padding, refusals and failures:", ""]
        lines += [f"- {m}: {_shorten(n if isinstance(n, str) else '; '.join(n))}" for m, n in vnotes]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def write_readme(rows: list[dict]) -> None:
    from benchmarks.readme import replace_block

    replace_block("serving", table_lines(rows))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", default=None, help="rows whose name contains one of these texts")
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--work", default=os.path.expanduser("~/.cache/hf_pruning/serving"))
    parser.add_argument("--vllm-python", default=os.path.expanduser("~/.cache/hf_pruning/vllm-venv/bin/python"))
    parser.add_argument("--skip-vllm", action="store_true")
    parser.add_argument("--vllm-only", action="store_true", help="re-run the vLLM checks of the last run")
    parser.add_argument("--speed-only", action="store_true", help="re-time the GGUF files of the last run (quiet machine)")
    parser.add_argument("--readme", action="store_true", help="only rewrite the README block and serving.md from serving.json")
    args = parser.parse_args(argv)
    if args.readme:
        rows = json.loads((Path(args.out) / "serving.json").read_text())["rows"]
        write_markdown(rows, Path(args.out) / "serving.md")
        write_readme(rows)
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(2)
    from benchmarks.assets import load_smollm2
    from benchmarks.grid import EVALUATION_BOOKS, BenchSettings, books

    settings = BenchSettings()
    _, tokenizer = load_smollm2()
    text = books(settings.data_dir, EVALUATION_BOOKS)
    ids = tokenizer(text[10_000:20_000])["input_ids"][:EVAL_TOKENS]
    calibration = settings.calibration(tokenizer, depth=True)
    if args.speed_only:  # re-time the files the last run left in --work (on a quiet machine), keep the checks
        out_json = Path(args.out) / "serving.json"
        rows = json.loads(out_json.read_text())["rows"]
        for r in rows:
            if "decode_tok_s" not in r.get("gguf_f32", {}):
                continue
            for outtype in ("f32", "q8_0"):
                gguf = next((Path(args.work) / _folder(r["method"], r["settings"]) / f"gguf-{outtype}").glob("*.gguf"))
                logging.info("timing %s", gguf)
                r[f"gguf_{outtype}"].update(llama_cpp_speed(gguf, ids))
        out_json.write_text(json.dumps({"rows": rows}, indent=1) + "\n")
        write_markdown(rows, Path(args.out) / "serving.md")
        write_readme(rows)
        return 0
    vllm_python = None if args.skip_vllm or not Path(args.vllm_python).exists() else args.vllm_python
    if args.vllm_only:  # re-run vLLM on the checkpoints and references the last run left in --work
        out_json = Path(args.out) / "serving.json"
        rows = json.loads(out_json.read_text())["rows"]
        for r in rows:
            if "max_abs_logprob_diff" in r.get("vllm", {}) and (not args.only or any(o in _key(r) for o in args.only)):
                folder = Path(args.work) / (_key(r).replace(" ", "-") if _key(r).startswith("tiny") else
                                            _folder(r["method"], r["settings"]))
                logging.info("vLLM on %s", folder)
                r["vllm"].update(_run_vllm(vllm_python, folder))
        out_json.write_text(json.dumps({"rows": rows}, indent=1) + "\n")
        write_markdown(rows, Path(args.out) / "serving.md")
        write_readme(rows)
        return 0
    out_json = Path(args.out) / "serving.json"
    rows = json.loads(out_json.read_text())["rows"] if out_json.exists() else []
    order = [f"tiny {a}" for a in TINY_ARCHS] + [_row_name(*x) for x in ROWS]
    key = {f"tiny {a}": (lambda a=a: tiny_row(a, Path(args.work), vllm_python)) for a in TINY_ARCHS}
    key.update({_row_name(m, st): (lambda m=m, st=st: run_row(m, st, Path(args.work), ids, calibration, vllm_python))
                for m, st in ROWS})
    for name in order:
        if args.only and not any(o in name for o in args.only):
            continue
        logging.info("row %s", name)
        row = key[name]()
        rows = [r for r in rows if _key(r) != name] + [row]
        rows.sort(key=lambda r: order.index(_key(r)))
        out_json.write_text(json.dumps({"rows": rows}, indent=1) + "\n")
        write_markdown(rows, Path(args.out) / "serving.md")
        if Path(args.out) == RESULTS:
            write_readme(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
