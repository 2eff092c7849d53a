"""One memory measurement in this (fresh) process: build a random LLaMA and calibration ids, then prune once.

Run by :mod:`benchmarks.memory`, one process per measurement (a process's peak resident memory only ever
grows, so two measurements in one process would see each other's peaks)::

    python -m benchmarks.memory_probe '<json spec>'            # prints one JSON line: the measurement
    python -m benchmarks.memory_probe --prepare '<json spec>'  # writes the dense and the Wanda-pruned weights

The peak extra memory of a run is the process's peak resident set during ``prune_`` minus its resident set
just before it, when the model, the calibration ids, torch and the package are loaded and one short forward
has initialised the kernels. The peak is the kernel's ``VmHWM``, reset just before the run by writing ``5``
to ``/proc/self/clear_refs``; where that cannot be written, ``ru_maxrss`` stands in (then the baseline's own
earlier peak, e.g. from building the model, may hide a smaller run's peak: ``hwm_reset`` in the output says
which was used). :mod:`benchmarks.memory` runs it with glibc's mmap threshold fixed (``PROBE_ENV``), so the
peak follows the live tensors rather than the order in which the allocator happened to keep freed blocks.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import os
import resource
import sys
import tempfile
import time
import warnings

os.environ.setdefault("TQDM_DISABLE", "1")  # the library's progress bars: the measurement prints one line


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def rss_bytes() -> int:
    """This process's resident set now."""
    return _status_kb("VmRSS") * 1024


def reset_peak() -> bool:
    """Reset the kernel's peak resident set (``VmHWM``) to the current one; False where it cannot be."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_bytes(reset_worked: bool) -> int:
    """The peak resident set since :func:`reset_peak` (``VmHWM``), or since the start (``ru_maxrss``)."""
    if reset_worked:
        return _status_kb("VmHWM") * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _trim() -> None:
    """Collect garbage and hand freed heap back to the system, so the baseline is what is live."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def build_model(shape: dict, seed: int = 0):
    """A random LLaMA in float32, eval mode: ``shape`` has hidden, layers, inter, vocab, heads, kv_heads."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=shape["vocab"], hidden_size=shape["hidden"], num_hidden_layers=shape["layers"],
                         intermediate_size=shape["inter"], num_attention_heads=shape["heads"],
                         num_key_value_heads=shape["kv_heads"], max_position_embeddings=4096,
                         tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    config._attn_implementation = "sdpa"
    return LlamaForCausalLM(config).eval()


def calibration_ids(spec: dict):
    """Random token ids ``[rows, tokens]`` (seeded)."""
    import torch

    g = torch.Generator().manual_seed(spec.get("seed", 0) + 1)
    return torch.randint(3, spec["model"]["vocab"], (spec["rows"], spec["tokens"]), generator=g)


def prepare(spec: dict) -> None:
    """For LLM-Barber on a Wanda-pruned model: the dense weights (a checkpoint folder, Barber's dense reference)
    and the Wanda-pruned weights (one safetensors file) in ``spec["workdir"]``."""
    from safetensors.torch import save_file

    import hf_pruning

    model = build_model(spec["model"], spec.get("seed", 0))
    model.save_pretrained(os.path.join(spec["workdir"], "dense"))
    hf_pruning.prune_(model, hf_pruning.WandaConfig(sparsity=spec["settings"].get("sparsity", 0.5)),
                      calibration_ids(spec))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              os.path.join(spec["workdir"], "wanda.safetensors"))


def measure(spec: dict) -> dict:
    """Build, load, warm up, then prune once with ``spec["method"]`` / ``spec["settings"]``; the measurement."""
    import torch

    import hf_pruning
    from hf_pruning.config import PruningConfig

    model = build_model(spec["model"], spec.get("seed", 0))
    settings = dict(spec["settings"])
    if spec.get("prepared"):  # LLM-Barber: start from the Wanda-pruned weights, dense reference on disk
        from safetensors.torch import load_file

        model.load_state_dict(load_file(os.path.join(spec["workdir"], "wanda.safetensors")))
        settings["dense_reference"] = os.path.join(spec["workdir"], "dense")
    ids = calibration_ids(spec)
    config = PruningConfig.from_dict({"method": spec["method"], **settings})
    with torch.no_grad():
        model(ids[:1, :16], use_cache=False)  # kernels and lazy state initialised outside the measurement
    _trim()
    baseline = rss_bytes()
    reset = reset_peak()
    start = time.perf_counter()
    disk = spec.get("activations_on_disk")
    if disk and spec.get("workdir"):
        os.makedirs(spec["workdir"], exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="activations_", dir=spec.get("workdir")) if disk else \
            contextlib.nullcontext() as folder:
        hf_pruning.prune_(model, config, ids, activations_dir=folder)
    seconds = time.perf_counter() - start
    peak = peak_bytes(reset)
    return {"baseline_bytes": baseline, "peak_bytes": peak, "extra_bytes": max(0, peak - baseline),
            "prune_s": round(seconds, 2), "hwm_reset": reset,
            "model_bytes": sum(p.numel() * p.element_size() for p in model.parameters())}


def main(argv: list[str]) -> None:
    warnings.filterwarnings("ignore")
    torch_threads = os.environ.get("OMP_NUM_THREADS")
    if torch_threads:
        import torch

        torch.set_num_threads(int(torch_threads))
    if argv and argv[0] == "--prepare":
        prepare(json.loads(argv[1]))
        return
    print(json.dumps(measure(json.loads(argv[0]))), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
