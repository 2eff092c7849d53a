"""The sequential engine's core on offloaded tiny models: stand-ins keep accelerate's hooks, a layer is read
from its offloaded copy once per stage (not once per batch), edits reach the offloaded copy, the activation
store round-trips on CPU and on disk."""

from __future__ import annotations

import pytest
import torch
from offload_models import MODES, offload_hooks_in_place, offloaded_model
from tiny_models import ARCHS, tokens

from hf_pruning.engine import (
    ActivationStore,
    capture,
    head_forward,
    onloaded,
    pass_through,
    propagate,
    sequential,
    substituted,
    write_param,
)
from hf_pruning.remote.hf_pruning_surgery import adapter_for

IDS = tokens(5, 10, seed=3)


def _layers(model):
    return adapter_for(model).decoder_layers(model)


@pytest.mark.parametrize("arch", ARCHS)
def test_capture_and_stand_ins_leave_hooks_and_logits(arch, tmp_path):
    reference = offloaded_model(arch, "memory", "")
    want = reference(IDS).logits
    ref_store, ref_kwargs = capture(reference, IDS, batch_size=2)
    for mode in ("cpu", "disk"):
        model = offloaded_model(arch, mode, str(tmp_path / mode))
        hooks = offload_hooks_in_place(model)
        assert hooks > 0
        store, kwargs = capture(model, IDS, batch_size=2)
        assert [b.shape[0] for b in store] == [2, 2, 1]
        for a, b in zip(store, ref_store):
            assert torch.equal(a, b)
        assert kwargs[0].keys() == ref_kwargs[0].keys()
        # a model forward with the top layer passed through, via a stand-in entry
        layers = _layers(model)
        with substituted(layers, pass_through(layers, [len(layers) - 1], tuple_out=False)):
            skipped = model(IDS).logits
        assert not torch.allclose(skipped, want)
        assert offload_hooks_in_place(model) == hooks
        torch.testing.assert_close(model(IDS).logits, want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("arch", ["llama", "gemma2", "opt"])
def test_layer_by_layer_equals_the_model(arch, tmp_path):
    """Propagating the captured inputs through every layer, then the model's own head, gives its logits."""
    for mode in MODES:
        model = offloaded_model(arch, mode, str(tmp_path / mode))
        store, kwargs = capture(model, IDS, batch_size=2)
        for layer, kw in zip(_layers(model), kwargs):
            with onloaded(layer):
                store = propagate(layer, store, kw)
        logits = torch.cat([head_forward(model, IDS[i : i + 2], h, tuple_out=False) for i, h in
                            zip(range(0, 5, 2), store)])
        torch.testing.assert_close(logits, model(IDS).logits, rtol=0, atol=1e-5)


def test_a_layer_is_read_from_disk_once_per_stage(tmp_path, monkeypatch):
    from accelerate.utils import OffloadedWeightsLoader

    model = offloaded_model("llama", "disk", str(tmp_path))
    reads: list[str] = []
    original = OffloadedWeightsLoader.__getitem__
    monkeypatch.setattr(OffloadedWeightsLoader, "__getitem__", lambda self, key: reads.append(key) or original(self, key))
    sequential(model, IDS, lambda i, layer, inputs, kwargs: {}, "test", batch_size=1)  # 5 batches per layer
    per_tensor = {key: reads.count(key) for key in reads}
    assert per_tensor and all(n == 1 for n in per_tensor.values()), per_tensor
    assert any(".layers.5." in key for key in per_tensor)


@pytest.mark.parametrize("mode", ["cpu", "disk"])
def test_write_param_reaches_the_offloaded_copy(mode, tmp_path):
    reference = offloaded_model("llama", "memory", "")
    model = offloaded_model("llama", mode, str(tmp_path))
    hooks = offload_hooks_in_place(model)
    top, ref_top = _layers(model)[-1], _layers(reference)[-1]
    with onloaded(top):  # edited while onloaded
        write_param(top.mlp.down_proj, "weight", top.mlp.down_proj.weight * 0.25)
    write_param(top.self_attn.o_proj, "weight", torch.zeros_like(ref_top.self_attn.o_proj.weight))  # not onloaded
    with torch.no_grad():
        ref_top.mlp.down_proj.weight.mul_(0.25)
        ref_top.self_attn.o_proj.weight.zero_()
    assert top.mlp.down_proj.weight.is_meta  # offloaded again
    torch.testing.assert_close(model(IDS).logits, reference(IDS).logits, rtol=0, atol=1e-6)
    assert offload_hooks_in_place(model) == hooks
    if mode == "disk":  # the checkpoint's own safetensors file is left alone: the edit went to the offload folder
        assert list((tmp_path / "offload").glob("*.down_proj.weight.dat"))


def test_an_in_place_edit_without_the_write_path_is_lost(tmp_path):
    """Why the write path exists: an onloaded tensor is dropped at offload, with any in-place change to it."""
    model = offloaded_model("llama", "disk", str(tmp_path))
    before = model(IDS).logits
    top = _layers(model)[-1]
    with onloaded(top), torch.no_grad():
        top.mlp.down_proj.weight.mul_(0.0)
    torch.testing.assert_close(model(IDS).logits, before, rtol=0, atol=0)


@pytest.mark.parametrize("folder", [None, True])
def test_activation_store_round_trip(folder):
    store = ActivationStore(folder)
    batches = [torch.randn(2, 3, 4), torch.randn(1, 3, 4)]
    for b in batches:
        store.append(b)
    assert len(store) == 2 and store.rows() == 3
    for got, want in zip(store, batches):
        assert torch.equal(got, want)
    store[1] = batches[1] * 2
    assert torch.equal(store.get(1, "cpu"), batches[1] * 2)
    path = store.folder
    store.close()
    assert len(store) == 0
    if folder:
        import os

        assert not os.path.exists(path)


def test_bf16_store_keeps_the_dtype_asked_for():
    store = ActivationStore(dtype=torch.bfloat16)
    store.append(torch.randn(2, 3))
    assert store[0].dtype == torch.bfloat16
