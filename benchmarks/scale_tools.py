"""Pieces of benchmarks/scale.py: a Llama-3-8B-shaped random checkpoint written tensor by tensor, peak RSS per
phase, digests of a model's tensors read one at a time, and the results files (scale.json, scale.md)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import threading
import time
import zlib
from pathlib import Path

import torch

from hf_pruning.engine.streaming import read_tensor, saved_state, write_safetensors

RESULTS = Path(__file__).parent / "results"
GIB = 1024**3

#: Llama-3-8B's shape (meta-llama/Meta-Llama-3-8B config.json)
LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0,
                 rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=128000, eos_token_id=128001)


def llama_config(layers: int | None = None, scale_down: int = 1):
    """The Llama-3-8B config, optionally with fewer layers and every width (and the vocab) divided by
    ``scale_down`` (head size stays 128)."""
    from transformers import LlamaConfig

    shape = dict(LLAMA3_8B)
    if layers is not None:
        shape["num_hidden_layers"] = layers
    for key in ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "vocab_size"):
        shape[key] = max(1, shape[key] // scale_down)
    if scale_down > 1:  # Llama-3's special token ids lie beyond a smaller vocab
        shape.update(bos_token_id=1, eos_token_id=2)
    return LlamaConfig(**shape)


def make_checkpoint(path: Path, config, dtype: torch.dtype, seed: int = 0, max_shard_size: str = "5GB") -> dict:
    """Write a random checkpoint of ``config`` (a Llama) to ``path``: safetensors shards, their index and
    config.json, generated one tensor at a time (N(0, 0.02) weights, unit norms, seeded per tensor name), so
    memory never holds more than one tensor whatever the model's size."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from transformers import AutoModelForCausalLM

    path.mkdir(parents=True, exist_ok=True)
    config.dtype = str(dtype).removeprefix("torch.")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    specs = saved_state(model)  # [shape, dtype] of every saved tensor, on meta

    def fetch(name: str) -> torch.Tensor:
        spec = specs[name]
        if spec.ndim == 1:  # RMSNorm gains
            return torch.ones(spec.shape, dtype=dtype)
        g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
        return (torch.randn(spec.shape, generator=g) * 0.02).to(dtype)

    split = split_torch_state_dict_into_shards(specs, max_shard_size=max_shard_size)
    for shard, names in split.filename_to_tensors.items():
        write_safetensors(path / shard, {n: specs[n] for n in names}, fetch, {"format": "pt"})
    if split.is_sharded:
        index = {"metadata": dict(split.metadata), "weight_map": split.tensor_to_filename}
        (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    config.save_pretrained(path)
    n = sum(t.numel() for t in specs.values())
    return {"parameters": n, "bytes_on_disk": sum(t.numel() * t.element_size() for t in specs.values()),
            "fp32_bytes": 4 * n, "dtype": str(dtype)}


def _status(field: str) -> int:
    """A field of /proc/self/status in bytes (VmHWM: peak resident set, VmRSS: current)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


class Phases:
    """Wall time and peak RSS of each phase of a run: the kernel's peak (VmHWM, reset at each phase's start; it
    counts pages of memory-mapped checkpoint files too) and, sampled every 20 ms, the peak of anonymous memory
    (RssAnon: what the process allocated itself) and of file-backed pages (RssFile: mapped safetensors files,
    which the kernel can drop under pressure)."""

    def __init__(self):
        self.rows: dict[str, dict] = {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        with contextlib.suppress(OSError):
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        start, rss0 = time.perf_counter(), _status("VmRSS")
        peaks, done = {"RssAnon": 0, "RssFile": 0}, threading.Event()

        def sample():
            while True:
                for field in peaks:
                    peaks[field] = max(peaks[field], _status(field))
                if done.wait(0.02):
                    return

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            yield
        finally:
            done.set()
            sampler.join()
            self.rows[name] = {"seconds": round(time.perf_counter() - start, 2), "rss_start_gib": rss0 / GIB,
                               "peak_rss_gib": _status("VmHWM") / GIB, "peak_anon_gib": peaks["RssAnon"] / GIB,
                               "peak_file_gib": peaks["RssFile"] / GIB}

    def peak(self, field: str = "peak_rss_gib") -> float:
        return max((r.get(field, 0.0) for r in self.rows.values()), default=0.0)


def digests(model) -> dict[str, str]:
    """sha256 of every saved tensor of ``model`` (offloaded ones read from their hooks), one tensor at a time."""
    out = {}
    for name in saved_state(model):
        tensor = read_tensor(model, name)
        out[name] = hashlib.sha256(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().data).hexdigest()
        del tensor
    return out


def zero_fraction(model) -> float:
    """Fraction of exact zeros over the decoder layers' 2-D weights (read one tensor at a time)."""
    zeros = total = 0
    for name, spec in saved_state(model).items():
        if ".layers." in name and spec.ndim == 2:
            tensor = read_tensor(model, name)
            zeros += int((tensor == 0).sum())
            total += tensor.numel()
    return zeros / max(total, 1)


def record(key: str, row: dict, name: str = "scale") -> None:
    """Merge ``row`` into results/<name>.json under ``key`` and rewrite results/<name>.md from it (``name`` may
    be a path without suffix instead)."""
    stem = Path(name) if "/" in name else RESULTS / name
    stem.parent.mkdir(parents=True, exist_ok=True)
    path = stem.with_suffix(".json")
    data = json.loads(path.read_text()) if path.is_file() else {}
    data[key] = row
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    lines = ["# Scale runs (benchmarks/scale.py)", "",
             "Peak RSS: the process's VmHWM over all phases (it counts pages of memory-mapped checkpoint files); "
             "peak anon: the largest RssAnon sampled every 20 ms (memory the process allocated). GiB = 2^30 bytes.",
             "",
             "| run | model | weights in memory | method | rows x tokens | load s | prune s | save s | peak RSS GiB "
             "| peak anon GiB | model GiB (run dtype) | note |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for run, r in sorted(data.items()):
        ph = r.get("phases", {})
        secs = [str(ph.get(p, {}).get("seconds", "-")) for p in ("load", "prune", "save")]
        lines.append(f"| {run} | {r.get('model', '')} | {r.get('max_memory', 'all')} | {r.get('method', '')} | "
                     f"{r.get('rows', '-')} x {r.get('tokens', '-')} | {' | '.join(secs)} | "
                     f"{r.get('peak_rss_gib', 0):.2f} | {r.get('peak_anon_gib', 0):.2f} | {r.get('model_gib', 0):.2f} | "
                     f"{r.get('note', '')} |")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    if stem.resolve() == (RESULTS / "scale").resolve():
        write_readme(data)


def write_readme(data: dict) -> None:
    """Rewrite the README's ``scale`` block from the results ``data`` (results/scale.json)."""
    from .readme import replace_block

    replace_block("scale", readme_lines(data))


QWEN_VOCAB = 151_936


def readme_lines(data: dict) -> list[str]:
    """The README's block of scale results: the runs bigger than RAM, then the Qwen2.5-Coder-1.5B comparison per
    method (disk offload and ``cpu_offload`` against the in-memory run) with the issue's targets."""
    lines = ["| run | weights in RAM | prune s | save s | peak RSS GiB (allocated) | model GiB |", "|---|---|---|---|---|---|"]
    for run, r in sorted(data.items()):
        if run.startswith("8b-"):
            ph = r.get("phases", {})
            lines.append(f"| {r.get('method')} 50%, {r.get('model')} | {r.get('max_memory')} | "
                         f"{ph.get('prune', {}).get('seconds', '-')} | {ph.get('save', {}).get('seconds', '-')} | "
                         f"{r.get('peak_rss_gib', 0):.2f} ({r.get('peak_anon_gib', 0):.2f}) | {r.get('model_gib', 0):.1f} |")
    qwen = {run[len("qwen-"):].rsplit("-", 1)[0]: None for run in sorted(data) if run.startswith("qwen-")}
    if not qwen:
        return lines
    some = next(r for run, r in data.items() if run.startswith("qwen-"))
    model_gib = some["model_gib"]
    logits = some["rows"] * some["tokens"] * QWEN_VOCAB * 4 / GIB
    lines += ["", f"Qwen2.5-Coder-1.5B in fp32 ({model_gib:.2f} GiB), {some['rows']} x {some['tokens']} calibration "
              f"tokens. Targets: peak RSS with 1 GiB of RAM for weights <= 0.35 x the model + one batch = "
              f"{0.35 * model_gib:.2f} GiB ({0.35 * model_gib + logits:.2f} GiB with a batch of logits); time <= 3x "
              "the in-memory run offloaded to disk, <= 1.3x with accelerate's `cpu_offload`.", "",
              "| method | settings | in memory: prune s | disk offload: peak RSS GiB | disk offload: time x | "
              "`cpu_offload`: time x | same weights and plan |", "|---|---|---|---|---|---|---|"]
    def ratio(r):
        return f"{r['prune_time_vs_memory']:.2f}" if "prune_time_vs_memory" in r else "-"

    for method in qwen:
        mem, off, cpu = (data.get(f"qwen-{method}-{side}", {}) for side in ("memory", "offloaded", "cpu_offload"))
        same = all(r.get("same_weights_as_memory") for r in (off, cpu) if r)
        lines.append(f"| {method} | `{json.dumps(mem.get('settings', {}))}` | "
                     f"{mem.get('phases', {}).get('prune', {}).get('seconds', '-')} | "
                     f"{off.get('peak_rss_gib', 0):.2f} | {ratio(off)} | {ratio(cpu)} | {'yes' if same else 'NO'} |")
    return lines
