"""vLLM export without vLLM: the DeciLM config and weights, and a numpy reference of vLLM's ``DeciLMForCausalLM``
(global query heads, ``n_heads_in_group``, ``no_op`` sublayers, global bias switches) run on the exported files."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file
from test_export_gguf import IDS, MIXED_OPS, _hf_logits, _pruned, _rms, _rope
from tiny_models import tiny_bpe_tokenizer

from hf_pruning.export import ExportError, export

VLLM_OPS = [op for op in MIXED_OPS if op["op"] != "value_only_attention"] + [{"op": "remove_layers", "layers": [4]}]


@pytest.fixture(scope="module")
def bpe():
    return tiny_bpe_tokenizer()


def reference_logits(folder, ids: list[int]) -> np.ndarray:
    """Logits [T, vocab] of vLLM's DeciLM graph (nemotron_nas.py) computed in float64 from the folder alone."""
    cfg = json.loads((folder / "config.json").read_text())
    w = {k: v.astype(np.float64) for k, v in load_file(folder / "model.safetensors").items()}
    H, hd, eps = cfg["num_attention_heads"], cfg["head_dim"], cfg["rms_norm_eps"]
    theta = cfg["rope_parameters"]["rope_theta"]
    x = w["model.embed_tokens.weight"][ids]
    T = len(ids)
    causal = np.triu(np.full((T, T), -np.inf), 1)
    for i, block in enumerate(cfg["block_configs"]):
        p = f"model.layers.{i}."

        def lin(name, h, p=p):
            y = h @ w[p + name + ".weight"].T
            return y + w[p + name + ".bias"] if p + name + ".bias" in w else y

        if not block["attention"]["no_op"]:
            kv = H // block["attention"]["n_heads_in_group"]
            h = _rms(x, w[p + "input_layernorm.weight"], eps)
            q = _rope(lin("self_attn.q_proj", h).reshape(T, H, hd), theta, False)
            k = _rope(lin("self_attn.k_proj", h).reshape(T, kv, hd), theta, False)
            v = lin("self_attn.v_proj", h).reshape(T, kv, hd)
            k, v = np.repeat(k, H // kv, axis=1), np.repeat(v, H // kv, axis=1)
            s = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(hd) + causal
            a = np.exp(s - s.max(-1, keepdims=True))
            a /= a.sum(-1, keepdims=True)
            x = x + lin("self_attn.o_proj", np.einsum("hqk,khd->qhd", a, v).reshape(T, -1))
        if not block["ffn"]["no_op"]:
            h = _rms(x, w[p + "post_attention_layernorm.weight"], eps)
            g, u = lin("mlp.gate_proj", h), lin("mlp.up_proj", h)
            x = x + lin("mlp.down_proj", g / (1 + np.exp(-g)) * u)
    x = _rms(x, w["model.norm.weight"], eps)
    return x @ w.get("lm_head.weight", w["model.embed_tokens.weight"]).T


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_decilm_export_in_the_reference_graph_matches_the_model(tmp_path, bpe, arch):
    model = _pruned(arch, VLLM_OPS)
    report = export(model, tmp_path, "vllm", tokenizer=bpe)
    assert report.architecture == "DeciLMForCausalLM"
    got = reference_logits(tmp_path, IDS)
    assert np.abs(got - _hf_logits(model, IDS)).max() < 1e-4
    assert np.abs(got - _hf_logits(_pruned(arch, []), IDS)).max() > 1e-2  # the comparison can fail


def test_block_configs_and_padding(tmp_path, bpe):
    model = _pruned("llama", VLLM_OPS)
    report = export(model, tmp_path, "vllm", tokenizer=bpe)
    cfg = json.loads((tmp_path / "config.json").read_text())
    blocks = cfg["block_configs"]
    assert cfg["num_hidden_layers"] == len(blocks) == 5 and cfg["model_type"] == "nemotron-nas"
    # layer 0: no attention but an MLP -> a zero attention with one KV head (vLLM's layer 0 starts the residual)
    assert blocks[0]["attention"] == {"no_op": False, "n_heads_in_group": 8}
    # layer 1: 6 query heads in 3 KV groups -> 8 query heads in 4 groups of 2 (zero heads added)
    assert blocks[1]["attention"]["n_heads_in_group"] == 2
    assert blocks[2]["ffn"] == {"no_op": True} and blocks[3]["ffn"]["intermediate_size"] == 48
    assert cfg["mlp_bias"] is True  # FLAP's bias on layer 3's down_proj: every MLP gets a (zero) bias
    w = load_file(tmp_path / "model.safetensors")
    assert not w["model.layers.0.self_attn.o_proj.weight"].any()
    assert not w["model.layers.0.mlp.down_proj.bias"].any() and w["model.layers.3.mlp.down_proj.bias"].shape == (64,)
    assert w["model.layers.1.self_attn.q_proj.weight"].shape == (64, 64)
    assert (tmp_path / "configuration_decilm.py").exists() and (tmp_path / "tokenizer.json").exists()
    assert any("padded to 8 / 4" in n for n in report.notes)


def test_the_config_loads_with_its_own_remote_code(tmp_path, bpe):
    from transformers import AutoConfig

    export(_pruned("qwen2", VLLM_OPS), tmp_path, "vllm", tokenizer=bpe)
    cfg = AutoConfig.from_pretrained(tmp_path, trust_remote_code=True)
    assert cfg.block_configs[2].ffn.no_op is True and not hasattr(cfg.block_configs[3].ffn, "ffn_mult")
    assert cfg.block_configs[3].ffn.intermediate_size == 48 and cfg.qkv_bias is True


def test_uniform_models_are_saved_as_their_stock_class(tmp_path, bpe):
    from transformers import AutoModelForCausalLM

    model = _pruned("llama", [{"op": "remove_layers", "layers": [1, 2]}])
    report = export(model, tmp_path, "vllm", tokenizer=bpe)
    assert report.architecture == "LlamaForCausalLM" and report.command == f"vllm serve {tmp_path}"
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()  # no remote code
    with torch.no_grad():
        assert torch.equal(reloaded(torch.tensor([IDS])).logits, model(torch.tensor([IDS])).logits)


def test_value_only_attention_is_refused_for_vllm(tmp_path, bpe):
    with pytest.raises(ExportError, match=r"layer 4: value_only_attention.*format='gguf'"):
        export(_pruned("llama", [{"op": "value_only_attention", "layer": 4}]), tmp_path / "v", "vllm", tokenizer=bpe)
    assert not (tmp_path / "v").exists()


def test_weights_are_sharded_as_they_are_written(tmp_path, bpe, monkeypatch):
    from hf_pruning.export import vllm_folder

    monkeypatch.setattr(vllm_folder, "SHARD_BYTES", 60_000)  # a few layers per shard
    model = _pruned("llama", VLLM_OPS)
    report = export(model, tmp_path, "vllm", tokenizer=bpe)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and shards == [f for f in report.files if f.startswith("model-")]
    assert not list(tmp_path.glob("*.partial"))
    merged = {}
    for f in shards:
        merged.update(load_file(tmp_path / f))
    assert set(merged) == set(index["weight_map"]) and "model.layers.4.mlp.down_proj.weight" in merged


def test_a_tokenizer_folder_is_loaded_once_for_every_writer(tmp_path, bpe):
    bpe.save_pretrained(tmp_path / "tok")
    stock = _pruned("llama", [{"op": "remove_layers", "layers": [1]}])
    export(stock, tmp_path / "stock", "vllm", tokenizer=str(tmp_path / "tok"))
    export(_pruned("llama", VLLM_OPS), tmp_path / "deci", "vllm", tokenizer=tmp_path / "tok")
    report = export(stock, tmp_path / "gguf", "gguf", tokenizer=str(tmp_path / "tok"), name="tiny")
    assert (tmp_path / "stock" / "tokenizer.json").exists() and (tmp_path / "deci" / "tokenizer.json").exists()
    assert report.tokenizer.startswith("gpt2 tokenizer, 320 tokens")
