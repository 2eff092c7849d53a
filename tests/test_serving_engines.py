"""Exported models in the real engines: llama.cpp (llama-cpp-python) and vLLM's CPU build (its own virtualenv).

Marked ``serving``: ``make test-serving`` builds the engines once (``make serve-deps``, cached outside the
repository) and runs these; ``make test`` leaves them out. With ``HF_PRUNING_REQUIRE_ENGINES=1`` (set by
``make test-serving``) a missing engine is a failure, not a skip.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_export_gguf import MIXED_OPS, _pruned
from tiny_models import tiny_bpe_tokenizer

import hf_pruning
from benchmarks.serving import hf_reference, llama_cpp_check, open_gguf
from hf_pruning.export import export

pytestmark = pytest.mark.serving
REQUIRE = os.environ.get("HF_PRUNING_REQUIRE_ENGINES") == "1"
VLLM_PYTHON = os.environ.get("HF_PRUNING_VLLM_PYTHON", os.path.expanduser("~/.cache/hf_pruning/vllm-venv/bin/python"))
TEXT = "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in want of"


def _need_llama_cpp():
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        if REQUIRE:
            pytest.fail("llama-cpp-python is not installed: run make serve-deps")
        pytest.skip("llama-cpp-python is not installed (make serve-deps)")


@pytest.fixture(scope="module")
def bpe():
    return tiny_bpe_tokenizer()


def _ids(tokenizer, n: int = 64) -> list[int]:
    ids = tokenizer(TEXT * 8)["input_ids"][:n]
    assert len(ids) == n
    return ids


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_llama_cpp_runs_the_pruned_model_as_transformers_does(tmp_path, bpe, arch):
    _need_llama_cpp()
    ops = [op for op in MIXED_OPS if not (arch == "qwen2" and op["op"] == "value_only_attention")]
    model = _pruned(arch, ops)
    ids = _ids(bpe)
    report = export(model, tmp_path, "gguf", tokenizer=bpe, name="tiny")
    result = llama_cpp_check(tmp_path / report.files[0], ids, hf_reference(model, ids))
    assert result["max_abs_logprob_diff"] <= 1e-3
    assert result["greedy_equal"]
    assert result["engine_params"] == report.params_written < report.params_dense


@pytest.mark.parametrize("outtype, tol", [("f16", 0.05), ("bf16", 0.3), ("q8_0", 0.3)])
def test_llama_cpp_runs_the_smaller_types(tmp_path, bpe, outtype, tol):
    _need_llama_cpp()
    model = _pruned("llama", MIXED_OPS)
    ids = _ids(bpe)
    report = export(model, tmp_path, "gguf", tokenizer=bpe, outtype=outtype, name="tiny")
    result = llama_cpp_check(tmp_path / report.files[0], ids, hf_reference(model, ids))
    assert result["max_abs_logprob_diff"] <= tol and result["engine_params"] == report.params_written


@pytest.mark.parametrize("ops", [[], MIXED_OPS], ids=["stock", "deci"])
def test_llama3_rope_scaling_in_llama_cpp(tmp_path, bpe, ops):
    """Llama-3.1's rope scaling travels as llama.cpp's rope_freqs tensor (computed with transformers' own rope code)."""
    _need_llama_cpp()
    scaling = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    model = _pruned("llama", ops, rope_parameters=scaling)
    ids = _ids(bpe)
    report = export(model, tmp_path, "gguf", tokenizer=bpe, name="tiny")
    result = llama_cpp_check(tmp_path / report.files[0], ids, hf_reference(model, ids))
    assert result["max_abs_logprob_diff"] <= 1e-3 and result["greedy_equal"]


def test_llama_cpp_tokenizes_text_as_the_tokenizer_does(tmp_path, bpe):
    _need_llama_cpp()
    report = export(_pruned("llama", []), tmp_path, "gguf", tokenizer=bpe, name="tiny")
    llm = open_gguf(tmp_path / report.files[0], n_ctx=256)
    text = TEXT + " -- 1234, said she.\n\nYes!"
    assert llm.tokenize(text.encode(), add_bos=False, special=False) == bpe(text)["input_ids"]


@pytest.mark.real
def test_smollm2_pruned_in_llama_cpp(tmp_path):
    """The real model: HARP-style value-only attention on the top layers, a dropped MLP and uneven widths."""
    _need_llama_cpp()
    from benchmarks.assets import load_smollm2

    model, tokenizer = load_smollm2()
    ops = [{"op": "value_only_attention", "layer": i} for i in range(25, 30)]
    ops += [{"op": "drop_mlp", "layer": 3}, {"op": "shrink_mlp", "layer": 10, "keep": list(range(0, 1536, 3))}]
    hf_pruning.prune_(model, hf_pruning.PlanConfig(plan={"ops": ops}))
    ids = _ids(tokenizer)
    report = export(model, tmp_path, "gguf", tokenizer=tokenizer, name="smollm2")
    result = llama_cpp_check(tmp_path / report.files[0], ids, hf_reference(model, ids))
    assert result["max_abs_logprob_diff"] <= 1e-3 and result["greedy_equal"]
    llm = open_gguf(tmp_path / report.files[0], n_ctx=256)
    assert llm.tokenize(TEXT.encode(), add_bos=False) == tokenizer(TEXT)["input_ids"]


# ----- vLLM (a subprocess in its own virtualenv) -------------------------------------------------------------------
VLLM_OPS = [
    {"op": "drop_attention", "layer": 0},
    {"op": "remove_heads", "layer": 1, "heads": [0]},  # uneven: padded back to 4 query heads for vLLM
    {"op": "drop_mlp", "layer": 2},
    {"op": "shrink_mlp", "layer": 3, "keep": list(range(0, 96, 2)), "bias": True},
    {"op": "remove_layers", "layers": [5]},
]


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_vllm_runs_the_pruned_model_as_transformers_does(tmp_path, bpe, arch):
    if not Path(VLLM_PYTHON).exists():
        if REQUIRE:
            pytest.fail(f"vLLM's virtualenv is missing ({VLLM_PYTHON}): run make serve-deps")
        pytest.skip("vLLM's virtualenv is missing (make serve-deps)")
    model = _pruned(arch, VLLM_OPS, hidden_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=32)
    ids = _ids(bpe)
    reference = hf_reference(model, ids)
    np.savez(tmp_path / "reference.npz", ids=np.array(ids), log_probs=reference["log_probs"],
             greedy=np.array(reference["greedy"]))
    report = export(model, tmp_path / "vllm", "vllm", tokenizer=bpe)
    assert report.architecture == "DeciLMForCausalLM"
    script = Path(__file__).parents[1] / "benchmarks" / "serving_vllm.py"
    proc = subprocess.run([VLLM_PYTHON, str(script), str(tmp_path / "vllm"), str(tmp_path / "reference.npz")],
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "PYTHONPATH": ""})
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    assert proc.returncode == 0 and lines, (proc.stderr or proc.stdout)[-3000:]
    result = json.loads(lines[-1])
    assert result["max_abs_logprob_diff"] <= 1e-3 and result["greedy_equal"], result


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-v"]))
