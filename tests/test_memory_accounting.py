"""The engine's memory accounting (hf_pruning.engine.accounting) and the memory benchmark (benchmarks/memory.py).

The accounting is arithmetic: these tests check how it scales (weights with d^2, the store with tokens and rows,
the device part not with depth), cross-check its parameter counts against a real transformers model, and bound
the Llama-3-8B figures by numbers computed here independently. The last test measures one method in a fresh
process with ``--quick`` (a few seconds of work plus the process start; cheap enough for every CI run).
"""

from __future__ import annotations

import dataclasses
import json
import time

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import benchmarks.memory as bench
from hf_pruning import list_methods
from hf_pruning.engine.accounting import (
    HEAD_METHODS,
    LLAMA3_8B,
    METHODS,
    CalibrationShape,
    ModelShape,
    hidden_states,
    logits_batch,
    memory_table,
    method_memory,
)

GB = 1e9
CALIB = CalibrationShape(128, 2048, 4)
#: methods whose store caches the residual stream at every layer's input (it grows with depth by design)
STREAM_CACHES = {"sleb", "finercut", "gradmap", "gradmap_compensated", "taylor"}
#: the depth searches: candidates per layer (blocks; attention and MLP sublayers)
SEARCHES = {"sleb": 1, "finercut": 2}


def scaled(shape: ModelShape, **changes) -> ModelShape:
    return dataclasses.replace(shape, **changes)


def test_layer_weights_scale_with_d_squared():
    small = ModelShape(hidden=1024, layers=4, intermediate=4096, vocab=1000, dtype_bytes=2, heads=8)
    big = scaled(small, hidden=2048, intermediate=8192)  # same heads: head_dim doubles with d
    matrices = lambda s: s.layer_params() - 2 * s.hidden  # noqa: E731  (norm gains are linear in d)
    assert matrices(big) == 4 * matrices(small)
    assert big.layer_bytes() == 4 * small.layer_bytes() - 2 * 2 * small.hidden * 2


def test_parameter_counts_match_a_real_llama():
    config = LlamaConfig(vocab_size=320, hidden_size=64, num_hidden_layers=3, intermediate_size=96,
                         num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    shape = ModelShape.from_config(config, dtype_bytes=4)
    assert shape.layer_params() == sum(p.numel() for p in model.model.layers[0].parameters())
    assert shape.weight_bytes() == sum(p.numel() for p in model.parameters()) * 4
    for name, (out, inp) in shape.linears().items():
        lin = getattr(getattr(model.model.layers[0], "self_attn" if name[0] in "qkvo" else "mlp"), name)
        assert tuple(lin.weight.shape) == (out, inp)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_store_scales_with_tokens_and_rows(method):
    base = method_memory(method, LLAMA3_8B, CALIB).store
    assert method_memory(method, LLAMA3_8B, dataclasses.replace(CALIB, tokens=4096)).store == 2 * base
    assert method_memory(method, LLAMA3_8B, dataclasses.replace(CALIB, rows=256)).store == 2 * base


@pytest.mark.parametrize("method", sorted(METHODS))
def test_device_part_does_not_grow_with_depth_or_rows(method):
    deeper = method_memory(method, scaled(LLAMA3_8B, layers=64), CALIB)
    more_rows = method_memory(method, LLAMA3_8B, dataclasses.replace(CALIB, rows=512))
    base = method_memory(method, LLAMA3_8B, CALIB)
    if method in SEARCHES:  # layer-major per chunk: one chunk's stream per candidate (C = L or 2 L) at once
        chunk_stream = CALIB.batch_rows * CALIB.tokens * LLAMA3_8B.hidden * 2
        assert deeper.device - base.device == SEARCHES[method] * 32 * chunk_stream
    else:
        assert deeper.device == base.device
    assert more_rows.device == base.device  # one batch on the device; the compensation's folds stop at 8
    assert deeper.host == base.host
    if method in STREAM_CACHES:  # every layer's input is cached (DepthRunner / the layer-wise backward)
        assert deeper.store > base.store
    else:
        assert deeper.store == base.store


def test_llama3_8b_within_bounds_computed_here():
    params = 8.03e9  # Llama-3-8B's published parameter count
    assert abs(LLAMA3_8B.weight_bytes() - 2 * params) / (2 * params) < 0.01
    h = 128 * 2048 * 4096 * 2
    assert hidden_states(LLAMA3_8B, CALIB) == h
    layer = (4096 * (4096 + 2 * 1024) + 4096 * 4096 + 3 * 4096 * 14336) * 2  # q, k, v, o and the MLP, bf16
    table = memory_table(LLAMA3_8B, CALIB)
    for method, est in table.items():
        assert est.device >= layer, method  # the layer in work is always on the device
        if method not in HEAD_METHODS:  # far below the whole model
            assert est.device < LLAMA3_8B.weight_bytes() / 2, method
        else:  # plus the LM head (1 GB) and float32 logits of one batch of 4 rows (4.2 GB) and their copies
            assert est.device < 25 * GB, method
    # Wanda: one layer, one batch's activations, a mask selection: under 2 GB; the store is 2 H, and down_proj's
    # inputs (14336 / 4096 H) for the staged schedule's one forward per layer (two-pass: 2 H)
    assert table["wanda"].device < 2 * GB and table["wanda"].store == int((2 + 14336 / 4096) * h)
    assert table["wanda_two_pass"].store == 2 * h
    # SparseGPT: at least down_proj's Hessian (float32) and its float64 factor; at most a few GB
    assert 14336**2 * (4 + 8) < table["sparsegpt"].device < 8 * GB
    # head methods hold the LM head and a batch of float32 logits [4, 2048, 128256]
    logits = 4 * 2048 * 128256 * 4
    assert logits == logits_batch(LLAMA3_8B, CALIB)
    for method in ("sleb", "finercut"):
        assert table[method].device > logits + 128256 * 4096 * 2
    # HARP's loss runs the head one row at a time: the head, a row of logits and its log-softmax
    assert 2 * logits // 4 + 128256 * 4096 * 2 < table["harp"].device < logits + 2 * table["wanda"].device
    assert table["finercut"].store == (32 + 2) * h  # every layer's input, the final and the dense final states
    # the estimates of issue 23 for today's code: 60 GB (Wanda), 88 GB (SLEB), 220 GB (FinerCut) in total
    # (13.3 GB with down_proj's inputs kept for one layer forward's work per layer; 5.7 GB for the two-pass flow)
    assert table["wanda"].device + table["wanda"].store < 14 * GB
    assert table["wanda_two_pass"].device + table["wanda_two_pass"].store < 10 * GB


def test_parts_split_the_store_to_host_or_disk():
    est = method_memory("sleb", LLAMA3_8B, CALIB)
    in_ram, on_disk = est.parts("host"), est.parts("disk")
    assert in_ram["device"] == on_disk["device"] == est.device
    assert in_ram["host"] == on_disk["host"] + est.store and on_disk["disk"] == est.store and in_ram["disk"] == 0
    with pytest.raises(ValueError, match="store_on"):
        est.parts("gpu")
    with pytest.raises(KeyError, match="known: magnitude"):
        method_memory("nope", LLAMA3_8B)


def test_every_method_is_accounted_and_benchmarked():
    methods = set(list_methods()) - {"plan"}  # a hand-written plan uses no calibration
    assert methods <= {key.split("_two_pass")[0].split("_compensated")[0] for key in METHODS}
    measured = {case[1] for case in bench.CASES}
    assert methods - {"magnitude"} <= measured  # magnitude is data-free
    assert {case[3] for case in bench.CASES} <= set(METHODS)
    assert HEAD_METHODS <= set(METHODS)


def test_summary_of_measurements():
    protocol = bench.QUICK
    case = next(c for c in bench.CASES if c[0] == "wanda")
    h = protocol["rows"] * protocol["tokens"] * protocol["model"]["hidden"] * 4
    sizes = {"base": {"rows": protocol["rows"], "extra_bytes": 2 * h},
             "layers": {"rows": protocol["rows"], "extra_bytes": int(2.1 * h)},
             "rows": {"rows": 2 * protocol["rows"], "extra_bytes": int(2.08 * h)},
             "ram": {"rows": protocol["rows"], "extra_bytes": 4 * h}}
    row = bench.summarize(case, sizes, protocol)
    assert row["extra_H"] == 2 and row["within_bound"] and row["ram_extra_H"] == 4
    assert row["growth_layers"] == pytest.approx(0.05, abs=1e-6)
    assert row["growth_rows"] == pytest.approx(0.04, abs=1e-6)  # stores on disk: the bytes must not grow
    assert row["meets_target"]
    sizes["rows"]["extra_bytes"] = 4 * h  # doubling the rows doubled the bytes: the target is missed
    assert not bench.summarize(case, sizes, protocol)["meets_target"]


def test_quick_measurement_of_one_method(tmp_path):
    start = time.perf_counter()
    bench.main(["--quick", "--only", "wanda", "--sizes", "base", "--out", str(tmp_path)])
    elapsed = time.perf_counter() - start
    results = json.loads((tmp_path / "memory-quick.json").read_text())
    (row,) = results["methods"]
    base = row["sizes"]["base"]
    assert "error" not in base, base
    assert base["hwm_reset"] and base["extra_bytes"] > 0 and row["extra_H"] > 0
    assert results["machine"]["torch"] == torch.__version__
    assert "Llama-3-70B" in results["accounting"]["models"]
    text = (tmp_path / "memory-quick.md").read_text()
    assert "| wanda |" in text and "mem(1 Layer) * 2" in text
    assert elapsed < 120  # about 10 s on an idle core: one process start and a small Wanda run
