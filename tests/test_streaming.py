"""The streaming save of offloaded models (hf_pruning.engine.streaming) against transformers' save of the same model
in memory: same files, keys and tensors; reloads with device_map="auto"; holds one tensor at a time."""

from __future__ import annotations

import json
import weakref
from pathlib import Path

import pytest
import torch
from offload_models import offload_hooks_in_place, offloaded_model
from safetensors import safe_open
from test_save_reload import STRUCTURAL
from tiny_models import ARCHS, tokens
from transformers import AutoModelForCausalLM

import hf_pruning
from hf_pruning.engine import offload_hook, onloaded, streaming, write_param
from hf_pruning.remote.hf_pruning_surgery import adapter_for

SHARD = "20KB"  # many shards, so the split and the index are checked too


def mask_(model) -> None:
    """Zero a seeded half of every decoder linear weight through the one write path (an unstructured 50% mask)."""
    g = torch.Generator().manual_seed(0)
    for layer in adapter_for(model).decoder_layers(model):
        with onloaded(layer):
            for module in layer.modules():
                if isinstance(module, torch.nn.Linear):
                    keep = torch.rand(module.weight.shape, generator=g) < 0.5  # [out, in]
                    write_param(module, "weight", module.weight.detach().cpu() * keep)


def weight_files(folder: Path) -> dict[str, dict[str, torch.Tensor]]:
    files = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(path, "pt") as f:
            files[path.name] = {k: f.get_tensor(k) for k in f.keys()}
    return files


def assert_same_save(got: Path, want: Path) -> None:
    names = sorted(p.name for p in want.iterdir())
    assert sorted(p.name for p in got.iterdir()) == names
    for name in names:
        if name.endswith(".json"):
            assert json.loads((got / name).read_text()) == json.loads((want / name).read_text()), name
    a, b = weight_files(got), weight_files(want)
    assert {f: sorted(t) for f, t in a.items()} == {f: sorted(t) for f, t in b.items()}
    for f in b:
        for key in b[f]:
            assert torch.equal(a[f][key], b[f][key]), (f, key)


@pytest.mark.parametrize("mode", ["cpu", "disk"])
@pytest.mark.parametrize("arch", ARCHS)
def test_streamed_save_equals_in_memory_save(arch, mode, tmp_path):
    ref = offloaded_model(arch, "memory", str(tmp_path))
    mask_(ref)
    ref.save_pretrained(tmp_path / "want", max_shard_size=SHARD)
    model = offloaded_model(arch, mode, str(tmp_path / "offload"))
    mask_(model)
    hooks = offload_hooks_in_place(model)
    stats = streaming.save_streamed(model, tmp_path / "got", max_shard_size=SHARD)
    assert_same_save(tmp_path / "got", tmp_path / "want")
    assert offload_hooks_in_place(model) == hooks > 0
    assert stats.largest == max(t.numel() * t.element_size() for t in streaming.saved_state(ref).values())
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "got", device_map="auto", dtype="auto")
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x).logits, ref(x).logits, rtol=0, atol=1e-6)


def test_writer_holds_one_tensor_at_a_time(tmp_path, monkeypatch):
    """Every tensor the writer reads is freed before it reads the next (weak references to what it was handed)."""
    model = offloaded_model("llama", "disk", str(tmp_path))
    mask_(model)  # the edited layers are read from the offload folder, the others from the checkpoint
    alive, seen, sizes = [], [], []
    read = streaming.read_tensor

    def watched(m, name):
        seen.append(sum(ref() is not None for ref in alive))  # tensors still held when the next one is read
        tensor = read(m, name)
        alive.append(weakref.ref(tensor))
        sizes.append(tensor.numel() * tensor.element_size())
        return tensor

    monkeypatch.setattr(streaming, "read_tensor", watched)
    stats = streaming.save_streamed(model, tmp_path / "out")
    assert len(seen) == stats.tensors > 50
    assert max(seen) == 0 and all(ref() is None for ref in alive)
    assert stats.largest == max(sizes) < stats.bytes / 10


@pytest.mark.parametrize("mode", ["cpu", "disk"])
def test_hf_pruning_save_streams_offloaded_models(mode, tmp_path):
    """hf_pruning.save_pretrained takes the streaming path for an offloaded model (transformers' own save fails on
    accelerate.cpu_offload's meta parameters) and writes the same weights as for the model in memory."""
    ref = offloaded_model("qwen2", "memory", str(tmp_path))
    mask_(ref)
    hf_pruning.save_pretrained(ref, tmp_path / "want", card=False)
    model = offloaded_model("qwen2", mode, str(tmp_path / "offload"))
    mask_(model)
    assert streaming.needs_streaming(model)
    hf_pruning.save_pretrained(model, tmp_path / "got", card=False)
    assert_same_save(tmp_path / "got", tmp_path / "want")


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_streamed_save_of_a_pruned_class_in_memory(arch, tmp_path):
    """The writer on a Pruned* model (config.pruning_plan, remote code) writes what transformers writes."""
    ref = hf_pruning.apply_plan_(offloaded_model(arch, "memory", str(tmp_path)), STRUCTURAL)
    streaming.save_streamed(ref, tmp_path / "got", max_shard_size=SHARD)
    type(ref).save_pretrained(ref, tmp_path / "want", max_shard_size=SHARD)
    assert_same_save(tmp_path / "got", tmp_path / "want")
    assert any(p.suffix == ".py" for p in (tmp_path / "got").iterdir())  # the remote code


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_streamed_save_of_a_pruned_class(arch, tmp_path):
    """A plan applied to an offloaded model (Pruned* class, config.pruning_plan) saves and reloads with its remote
    code."""
    ref = hf_pruning.apply_plan_(offloaded_model(arch, "memory", str(tmp_path)), STRUCTURAL)
    hf_pruning.save_pretrained(ref, tmp_path / "want", card=False)
    model = offloaded_model(arch, "disk", str(tmp_path / "offload"))
    x = tokens()
    hf_pruning.apply_plan_(model, STRUCTURAL)
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, ref(x).logits, rtol=0, atol=1e-6)
    hf_pruning.save_pretrained(model, tmp_path / "got", card=False)
    assert_same_save(tmp_path / "got", tmp_path / "want")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "got", device_map="auto", dtype="auto",
                                                    trust_remote_code=True)
    assert reloaded.config.pruning_plan == ref.config.pruning_plan
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x).logits, ref(x).logits, rtol=0, atol=1e-6)


def test_offload_settings(tmp_path):
    settings = streaming.offload_settings("1GiB", tmp_path / "off", gpus={0: "20GiB"})
    assert settings == {"device_map": "auto", "max_memory": {0: "20GiB", "cpu": "1GiB"},
                        "offload_folder": str(tmp_path / "off")}
    assert (tmp_path / "off").is_dir()


def test_from_pretrained_reads_disk_offloaded_weights_from_the_checkpoint(tmp_path):
    """hf_pruning.from_pretrained passes device_map/max_memory/offload_folder to transformers: with 20 kB of RAM
    for weights the layers go to disk, read from the checkpoint's own safetensors file (nothing copied into the
    offload folder), and the model computes what it computed in memory."""
    ref = offloaded_model("qwen2", "memory", str(tmp_path))
    ref.save_pretrained(tmp_path / "ckpt")
    model = hf_pruning.from_pretrained(tmp_path / "ckpt", **streaming.offload_settings("20kB", tmp_path / "off"))
    assert "disk" in model.hf_device_map.values() and streaming.needs_streaming(model)
    assert list((tmp_path / "off").iterdir()) == []
    hook = next(h for m in model.modules() if (h := offload_hook(m)) is not None)
    entry = hook.weights_map.dataset.index[hook.weights_map.prefix + "weight"]
    assert Path(entry["safetensors_file"]).parent == tmp_path / "ckpt"
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, ref(x).logits, rtol=0, atol=1e-6)


def test_release_offload_moves_edits_into_the_save(tmp_path):
    """release_offload=True deletes the edited weights' offload files once saved and reads them from the saved
    shards afterwards: the model still computes the same, and saves the same again."""
    ref = offloaded_model("llama", "memory", str(tmp_path))
    mask_(ref)
    ref.save_pretrained(tmp_path / "want", max_shard_size=SHARD)
    model = offloaded_model("llama", "disk", str(tmp_path / "offload"))
    mask_(model)
    dat = sorted((tmp_path / "offload" / "offload").glob("*.dat"))
    assert len(dat) >= 7 * 4  # the four offloaded layers' edited linear weights
    streaming.save_streamed(model, tmp_path / "got", max_shard_size=SHARD, release_offload=True)
    assert not any(p.exists() for p in dat)
    assert_same_save(tmp_path / "got", tmp_path / "want")
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, ref(x).logits, rtol=0, atol=1e-6)
    streaming.save_streamed(model, tmp_path / "again", max_shard_size=SHARD)
    assert_same_save(tmp_path / "again", tmp_path / "want")
