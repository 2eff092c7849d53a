"""GGUF export without an engine: metadata, per-layer arrays, tensor shapes, refusals, and a numpy reference of
llama.cpp's ``llama``/``qwen2``/``deci`` graphs run on the file's own tensors against the model's logits."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from tiny_models import BPE_VOCAB, tiny_bpe_tokenizer, tiny_export_model, tiny_model

import hf_pruning
from hf_pruning.export import ExportError, export
from hf_pruning.export.gguf_vocab import pre_tokenizer_name

gguf = pytest.importorskip("gguf")

#: one of every op a serving engine must express, on a 6-layer model (8 query heads, 4 KV heads on LLaMA)
MIXED_OPS = [
    {"op": "drop_attention", "layer": 0},
    {"op": "remove_heads", "layer": 1, "heads": [0, 1, 5]},  # a whole KV group and an uneven one
    {"op": "drop_mlp", "layer": 2},
    {"op": "shrink_mlp", "layer": 3, "keep": list(range(0, 96, 2)), "bias": True},
    {"op": "value_only_attention", "layer": 4},
    {"op": "scale_output", "layer": 5, "sublayer": "attention", "alpha": 0.5},
]


@pytest.fixture(scope="module")
def bpe():
    return tiny_bpe_tokenizer()


def _pruned(arch: str, ops: list[dict], **sizes):
    model = tiny_export_model(arch, **sizes)
    if ops:
        hf_pruning.prune_(model, hf_pruning.PlanConfig(plan={"ops": ops}))
    return model


# ----- a numpy reference of llama.cpp's graphs, reading nothing but the GGUF file ---------------------------------
def _read(path):
    reader = gguf.GGUFReader(path)
    arch = reader.fields["general.architecture"].contents()
    meta = {k.split(".", 1)[1]: f.contents() for k, f in reader.fields.items() if k.startswith(arch + ".")}
    tensors = {t.name: gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float64).reshape(
        [int(x) for x in reversed(t.shape)]) for t in reader.tensors}
    return arch, meta, tensors


def _per_layer(value, n):
    return list(value) if isinstance(value, list) else [value] * n


def _rms(x, w, eps):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def _rope(x, theta, interleaved):  # x: [T, heads, hd]
    T, _, hd = x.shape
    inv = theta ** (-np.arange(0, hd, 2) / hd)  # [hd/2]
    ang = np.arange(T)[:, None] * inv[None, :]  # [T, hd/2]
    cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
    if interleaved:  # llama.cpp NORM rope: pairs (2i, 2i+1)
        a, b = x[..., 0::2], x[..., 1::2]
        out = np.empty_like(x)
        out[..., 0::2], out[..., 1::2] = a * cos - b * sin, a * sin + b * cos
        return out
    a, b = x[..., : hd // 2], x[..., hd // 2:]  # NEOX: halves
    return np.concatenate([a * cos - b * sin, a * sin + b * cos], -1)


def reference_logits(path, ids: list[int]) -> np.ndarray:
    """Logits [T, vocab] of llama.cpp's graph for ``ids``, computed in float64 from the file alone."""
    arch, meta, t = _read(path)
    n = meta["block_count"]
    heads, kvs, ffs = (_per_layer(meta[k], n) for k in ("attention.head_count", "attention.head_count_kv",
                                                            "feed_forward_length"))
    eps, theta, hd = meta["attention.layer_norm_rms_epsilon"], meta["rope.freq_base"], meta["attention.key_length"]
    x = t["token_embd.weight"][ids]  # [T, d]
    T = len(ids)
    causal = np.triu(np.full((T, T), -np.inf), 1)
    for i in range(n):
        p = f"blk.{i}."

        def lin(name, h, p=p):
            y = h @ t[p + name + ".weight"].T
            return y + t[p + name + ".bias"] if p + name + ".bias" in t else y

        if heads[i] > 0 and kvs[i] > 0:
            h = _rms(x, t[p + "attn_norm.weight"], eps)
            q = _rope(lin("attn_q", h).reshape(T, heads[i], hd), theta, arch != "qwen2")
            k = _rope(lin("attn_k", h).reshape(T, kvs[i], hd), theta, arch != "qwen2")
            v = lin("attn_v", h).reshape(T, kvs[i], hd)
            rep = heads[i] // kvs[i]
            k, v = np.repeat(k, rep, axis=1), np.repeat(v, rep, axis=1)
            s = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(hd) + causal
            a = np.exp(s - s.max(-1, keepdims=True))
            a /= a.sum(-1, keepdims=True)
            x = x + lin("attn_output", np.einsum("hqk,khd->qhd", a, v).reshape(T, -1))
        elif heads[i] > 0:  # linear attention: wo . norm(x), no bias
            x = x + _rms(x, t[p + "attn_norm.weight"], eps) @ t[p + "attn_output.weight"].T
        if ffs[i] > 0:
            h = _rms(x, t[p + "ffn_norm.weight"], eps)
            g, u = lin("ffn_gate", h), lin("ffn_up", h)
            x = x + lin("ffn_down", g / (1 + np.exp(-g)) * u)
    x = _rms(x, t["output_norm.weight"], eps)
    return x @ t.get("output.weight", t["token_embd.weight"]).T


def _hf_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].double().numpy()


IDS = [5, 17, 250, 3, 99, 180, 42, 7, 311, 64, 128, 200]


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_pruned_model_in_the_reference_graph_matches_the_model(tmp_path, bpe, arch):
    ops = [op for op in MIXED_OPS if not (arch == "qwen2" and op["op"] == "value_only_attention")]
    model = _pruned(arch, ops)
    report = export(model, tmp_path, "gguf", tokenizer=bpe, name="tiny")
    path = tmp_path / report.files[0]
    assert report.architecture == "deci"
    got, want = reference_logits(path, IDS), _hf_logits(model, IDS)
    assert np.abs(got - want).max() < 1e-4
    # the unpruned model does not match this file: the comparison can fail
    assert np.abs(got - _hf_logits(tiny_export_model(arch), IDS)).max() > 1e-2


def test_deci_metadata_is_per_layer_and_padding_is_reported(tmp_path, bpe):
    model = _pruned("llama", MIXED_OPS)
    report = export(model, tmp_path, "gguf", tokenizer=bpe, name="tiny")
    _, meta, tensors = _read(tmp_path / "tiny-f32.gguf")
    # layer 0: no attention -> a zero linear attention (llama.cpp sizes heads from layer 0); layer 1: 3 of 4 KV
    # groups left, padded to 2 query heads each; layer 2: no MLP -> a 32-wide zero MLP; layer 3: 48 channels;
    # layer 4: value-only -> linear attention (kv 0)
    assert meta["attention.head_count"] == [8, 6, 8, 8, 8, 8]
    assert meta["attention.head_count_kv"] == [0, 3, 4, 4, 0, 4]
    assert meta["feed_forward_length"] == [96, 96, 32, 48, 96, 96]
    assert not tensors["blk.0.attn_output.weight"].any() and "blk.0.attn_q.weight" not in tensors
    assert not tensors["blk.2.ffn_down.weight"].any()
    assert tensors["blk.1.attn_q.weight"].shape == (6 * 8, 64)
    assert tensors["blk.3.ffn_down.weight"].shape == (64, 48) and "blk.3.ffn_down.bias" in tensors
    assert tensors["blk.4.attn_output.weight"].shape == (64, 64)
    assert any("layer 0" in n for n in report.notes) and any("layer 2" in n for n in report.notes)
    assert report.params_written < report.params_dense
    card = (tmp_path / "README.md").read_text()
    assert "deci" in card and "32-wide" in card
    assert json.loads((tmp_path / "export.json").read_text())["architecture"] == "deci"
    assert (tmp_path / "Modelfile").read_text().startswith("FROM ./tiny-f32.gguf")


@pytest.mark.parametrize("arch, stock", [("llama", "llama"), ("qwen2", "qwen2")])
def test_uniform_models_are_written_as_the_stock_architecture(tmp_path, bpe, arch, stock):
    model = _pruned(arch, [{"op": "remove_layers", "layers": [1, 4]},
                           {"op": "scale_output", "layer": 0, "sublayer": "mlp", "alpha": 0.7}])
    report = export(model, tmp_path, "gguf", tokenizer=bpe, name="tiny")
    assert report.architecture == stock and report.notes == []
    got_arch, meta, _ = _read(tmp_path / report.files[0])
    assert got_arch == stock and meta["block_count"] == 4 and meta["attention.head_count"] == 8
    assert np.abs(reference_logits(tmp_path / report.files[0], IDS) - _hf_logits(model, IDS)).max() < 1e-4


def test_a_layer_with_neither_sublayer_is_left_out(tmp_path, bpe):
    model = _pruned("llama", [{"op": "drop_attention", "layer": 3}, {"op": "drop_mlp", "layer": 3}])
    report = export(model, tmp_path, "gguf", tokenizer=bpe, name="tiny")
    assert [r["source"] for r in report.layers] == [0, 1, 2, 4, 5]
    assert np.abs(reference_logits(tmp_path / report.files[0], IDS) - _hf_logits(model, IDS)).max() < 1e-4


@pytest.mark.parametrize("outtype, tol", [("f16", 0.05), ("bf16", 0.3), ("q8_0", 0.3)])
def test_smaller_outtypes_stay_close_and_are_smaller(tmp_path, bpe, outtype, tol):
    model = _pruned("llama", MIXED_OPS)
    f32 = export(model, tmp_path / "f32", "gguf", tokenizer=bpe, name="tiny")
    small = export(model, tmp_path / outtype, "gguf", tokenizer=bpe, outtype=outtype, name="tiny")
    size = {r: (tmp_path / r / rep.files[0]).stat().st_size for r, rep in (("f32", f32), (outtype, small))}
    assert size[outtype] < 0.6 * size["f32"]
    reader = gguf.GGUFReader(tmp_path / outtype / small.files[0])
    kinds = {t.name: t.tensor_type.name for t in reader.tensors}
    assert kinds["blk.0.attn_norm.weight"] == "F32"  # 1-D tensors stay F32
    assert kinds["blk.1.attn_q.weight"] == outtype.upper()
    diff = np.abs(reference_logits(tmp_path / outtype / small.files[0], IDS) - _hf_logits(model, IDS)).max()
    assert diff < tol


def test_q8_0_pads_mlp_widths_to_a_multiple_of_32_with_zero_channels(tmp_path, bpe):
    model = _pruned("llama", [{"op": "shrink_mlp", "layer": 2, "keep": list(range(40)), "bias": True}])
    report = export(model, tmp_path, "gguf", tokenizer=bpe, outtype="q8_0", name="tiny")
    _, meta, tensors = _read(tmp_path / report.files[0])
    kinds = {t.name: t.tensor_type.name for t in gguf.GGUFReader(tmp_path / report.files[0]).tensors}
    assert kinds["blk.2.ffn_down.weight"] == "Q8_0" and meta["feed_forward_length"][2] == 64
    assert not tensors["blk.2.ffn_down.weight"][:, 40:].any() and not tensors["blk.2.ffn_gate.weight"][40:].any()
    assert any("width 40 padded to 64" in n for n in report.notes)
    assert np.abs(reference_logits(tmp_path / report.files[0], IDS) - _hf_logits(model, IDS)).max() < 0.3


def test_the_tokenizer_is_in_the_file(tmp_path, bpe):
    report = export(_pruned("llama", []), tmp_path, "gguf", tokenizer=bpe, name="tiny")
    reader = gguf.GGUFReader(tmp_path / report.files[0])
    assert reader.fields["tokenizer.ggml.model"].contents() == "gpt2"
    assert reader.fields["tokenizer.ggml.pre"].contents() == "gpt-2"
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    assert len(tokens) == BPE_VOCAB and tokens[bpe.convert_tokens_to_ids("<|endoftext|>")] == "<|endoftext|>"
    assert len(reader.fields["tokenizer.ggml.merges"].contents()) > 0
    assert reader.fields["tokenizer.ggml.eos_token_id"].contents() == bpe.eos_token_id


def test_pre_tokenizer_names():
    assert pre_tokenizer_name({"pre_tokenizer": {"type": "ByteLevel", "use_regex": True}}) == "gpt-2"
    digits = {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True},
                                                    {"type": "ByteLevel"}]}
    assert pre_tokenizer_name({"pre_tokenizer": digits}) == "smollm"
    qwen = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
            r"|\s+(?!\S)|\s+")
    split = {"type": "Sequence", "pretokenizers": [{"type": "Split", "pattern": {"Regex": qwen}},
                                                   {"type": "ByteLevel", "use_regex": False}]}
    assert pre_tokenizer_name({"pre_tokenizer": split}) == "qwen2"
    assert pre_tokenizer_name({"pre_tokenizer": {"type": "Whitespace"}}) == "default"


# ----- refusals: named, before anything is written ----------------------------------------------------------------
def test_value_only_attention_with_a_bias_is_refused_naming_layer_and_formats(tmp_path, bpe):
    model = _pruned("qwen2", [{"op": "value_only_attention", "layer": 4}])  # Qwen2's v_proj has a bias
    with pytest.raises(ExportError, match=r"layer 4: value_only_attention with a bias.*save_pretrained"):
        export(model, tmp_path / "out", "gguf", tokenizer=bpe)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("arch", ["gemma2", "opt"])
def test_architectures_without_a_serving_layout_are_refused(tmp_path, bpe, arch):
    with pytest.raises(ExportError, match=f"'{arch}'.*save_pretrained"):
        export(tiny_model(arch), tmp_path, "gguf", tokenizer=bpe)


def test_bad_arguments_are_refused(tmp_path, bpe):
    model = _pruned("llama", [])
    with pytest.raises(ExportError, match="unknown export format 'onnx'"):
        export(model, tmp_path, "onnx", tokenizer=bpe)
    with pytest.raises(ExportError, match="unknown GGUF outtype 'q4_k'.*q8_0"):
        export(model, tmp_path / "a", "gguf", tokenizer=bpe, outtype="q4_k")
    with pytest.raises(ExportError, match="pass tokenizer="):
        export(model, tmp_path / "b", "gguf")
    assert not list((tmp_path / "b").glob("*.gguf")) and not list((tmp_path / "b").glob("*.partial"))
    (tmp_path / "file").write_text("x")
    with pytest.raises(ExportError, match="not a folder"):
        export(model, tmp_path / "file", "gguf", tokenizer=bpe)


def test_peft_models_must_be_merged_first(tmp_path, bpe):
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(_pruned("llama", []), peft.LoraConfig(target_modules=["q_proj"], r=2))
    with pytest.raises(ExportError, match="merge_and_unload"):
        export(model, tmp_path, "gguf", tokenizer=bpe)


def test_cli_exports_a_saved_model(tmp_path, bpe, capsys):
    from hf_pruning.cli import main

    model = _pruned("llama", MIXED_OPS)
    hf_pruning.save_pretrained(model, tmp_path / "saved", tokenizer=bpe)
    assert main(["export", str(tmp_path / "saved"), str(tmp_path / "gguf"), "--outtype", "q8_0"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["architecture"] == "deci" and out["files"][0] == "saved-q8_0.gguf"
    assert (tmp_path / "gguf" / "saved-q8_0.gguf").exists()
    assert main(["export", str(tmp_path / "saved"), str(tmp_path / "vllm"), "--format", "vllm"]) == 2  # value-only
    assert "value_only_attention" in capsys.readouterr().err and not (tmp_path / "vllm").exists()


@pytest.mark.parametrize("mode", ["cpu", "disk"])
def test_an_offloaded_model_exports_the_same_file(tmp_path, bpe, mode):
    from offload_models import offload_hooks_in_place, offloaded_model

    model = _pruned("llama", MIXED_OPS)
    export(model, tmp_path / "memory", "gguf", tokenizer=bpe, outtype="q8_0", name="tiny")
    offloaded = offloaded_model("llama", mode, str(tmp_path), model=_pruned("llama", MIXED_OPS))
    assert offload_hooks_in_place(offloaded) > 0
    export(offloaded, tmp_path / mode, "gguf", tokenizer=bpe, outtype="q8_0", name="tiny")
    assert (tmp_path / mode / "tiny-q8_0.gguf").read_bytes() == (tmp_path / "memory" / "tiny-q8_0.gguf").read_bytes()
    assert offload_hooks_in_place(offloaded) > 0  # still offloaded afterwards


def test_rope_scaling_travels_or_is_refused(tmp_path, bpe):
    import gguf as g

    llama3 = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
              "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    model = tiny_export_model("llama", rope_parameters=llama3)
    report = export(model, tmp_path / "l3", "gguf", tokenizer=bpe, name="tiny")
    freqs = {t.name: t for t in g.GGUFReader(tmp_path / "l3" / report.files[0]).tensors}["rope_freqs.weight"]
    factors = np.asarray(freqs.data)
    assert factors.shape == (4,) and factors.min() == 1.0 and factors.max() == 8.0  # hd 8: 4 frequencies
    yarn = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64}
    with pytest.raises(ExportError, match="rope scaling 'yarn'"):
        export(tiny_export_model("llama", rope_parameters=yarn), tmp_path / "y", "gguf", tokenizer=bpe)


def test_a_sliding_window_becomes_the_context_length(tmp_path, bpe):
    model = tiny_export_model("mistral", sliding_window=7)
    report = export(model, tmp_path, "gguf", tokenizer=bpe, name="tiny")
    _, meta, _ = _read(tmp_path / report.files[0])
    assert meta["context_length"] == 7 and any("sliding window (7 tokens)" in n for n in report.notes)


def test_the_dense_count_includes_removed_layers(tmp_path, bpe):
    dense = export(_pruned("llama", []), tmp_path / "d", "gguf", tokenizer=bpe, name="tiny")
    depth = export(_pruned("llama", [{"op": "remove_layers", "layers": [1, 4]}]), tmp_path / "r", "gguf",
                   tokenizer=bpe, name="tiny")
    assert depth.params_dense == dense.params_dense == dense.params_written > depth.params_written
