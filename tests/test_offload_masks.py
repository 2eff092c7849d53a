"""The mask methods on the engine: offload parity and the staged schedule against an all-rows reference.

Parity: magnitude, Wanda (unstructured and 2:4), SparseGPT and LLM-Barber prune a tiny model of every
architecture in memory, with every weight offloaded to the CPU and with layers offloaded to disk: the same
weights (read back from the offloaded copies), the same logits, and accelerate's hooks still in place.

Staged schedule: Wanda and SparseGPT prune each layer group by group (q/k/v, o, gate/up, down), batch by batch.
The reference here is the all-rows computation the staged one replaces: ONE forward of the whole model over
every calibration row, in which each linear is pruned on the statistics of its own input just before it runs.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from offload_models import MODES, offload_hooks_in_place, offloaded_model
from tiny_models import ARCHS, tiny_model, tokens

import hf_pruning
from hf_pruning import LLMBarberConfig, MagnitudeConfig, SparseGPTConfig, WandaConfig

CALIB = tokens(batch=6, length=16, seed=5)  # two batches of LAYER_BATCH=4 and 2 rows
CONFIGS = {
    "magnitude": MagnitudeConfig(),
    "wanda": WandaConfig(),
    "wanda_2:4": WandaConfig(pattern="2:4"),
    "sparsegpt": SparseGPTConfig(blocksize=32),
    "llm_barber": LLMBarberConfig(init="wanda", threshold=0.5),
}
#: every write path of LLM-Barber (SparseGPT initializer, fixed-mask re-solve, verification), on two layouts
BARBER_FULL = LLMBarberConfig(init="sparsegpt", blocksize=32, threshold=0.3, reconstruct=True, verify=True)


def _weights(model) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of the model; an offloaded module's are read from accelerate's copies (its
    hook's ``weights_map``: what the model computes with on its next call)."""
    from hf_pruning.engine import offload_hook

    out = {}
    for prefix, module in model.named_modules():
        hook = offload_hook(module)
        for name, tensor in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            key = f"{prefix}.{name}" if prefix else name
            if hook is not None and name in hook.weights_map:
                tensor = hook.weights_map[name]
            assert tensor.device.type != "meta", key
            out[key] = tensor.detach().cpu().clone()
    return out


def _pruned(arch, mode, config, folder):
    model = offloaded_model(arch, mode, str(folder))
    hooks = offload_hooks_in_place(model)
    assert (hooks > 0) == (mode != "memory")
    hf_pruning.prune_(model, config, calibration=CALIB)
    assert offload_hooks_in_place(model) == hooks  # accelerate's hooks are still in place
    with torch.no_grad():
        logits = model(tokens(batch=2, length=12, seed=1)).logits.float()
    return model, _weights(model), logits


def _check_parity(arch, config, tmp_path):
    ref_model, ref, ref_logits = _pruned(arch, "memory", config, tmp_path / "memory")
    for mode in MODES[1:]:
        model, weights, logits = _pruned(arch, mode, config, tmp_path / mode)
        assert weights.keys() == ref.keys(), mode
        differ = [k for k in ref if not torch.equal(weights[k], ref[k])]
        assert not differ, (mode, differ[:5])
        torch.testing.assert_close(logits, ref_logits, rtol=0, atol=1e-6)
        assert model.hf_pruning_report["sparsity"] == ref_model.hf_pruning_report["sparsity"], mode
        assert model.config.pruning_config == ref_model.config.pruning_config, mode


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("case", sorted(CONFIGS))
def test_in_memory_cpu_and_disk_offload_prune_the_same(arch, case, tmp_path):
    _check_parity(arch, CONFIGS[case], tmp_path)


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_barber_reconstruct_verify_offload_parity(arch, tmp_path):
    _check_parity(arch, BARBER_FULL, tmp_path)


def _linears(model) -> dict[str, torch.nn.Linear]:
    from hf_pruning.remote.hf_pruning_surgery import adapter_for

    layers = adapter_for(model).decoder_layers(model)
    return {f"{i}.{n}": m for i, layer in enumerate(layers) for n, m in layer.named_modules()
            if isinstance(m, torch.nn.Linear)}


def _all_rows_reference(model, prune):
    """ONE forward of the whole model over all of REF_CALIB; each linear's pre-hook prunes it on its own input
    ``[tokens, in]`` (float32) over every row, on its first call, before it computes."""
    done = set()

    def pre(mod, args):
        if mod not in done:
            done.add(mod)
            prune(mod, args[0].reshape(-1, args[0].shape[-1]).float())

    handles = [lin.register_forward_pre_hook(pre) for lin in _linears(model).values()]
    with torch.no_grad():
        model(REF_CALIB, use_cache=False)
    for h in handles:
        h.remove()
    return model


def _wanda_reference(config):
    from hf_pruning.methods.masks.selection import select_mask

    def prune(lin, x):
        w = lin.weight
        score = w.abs() * x.pow(2).sum(0).sqrt()[None]
        w[select_mask(score, config.sparsity, config.nm, True, w == 0)] = 0

    return prune


def _sparsegpt_reference(config):
    from hf_pruning.methods.sparsegpt.pruner import add_to_hessian, new_hessian
    from hf_pruning.methods.sparsegpt.scoring import sparsegpt_solve_

    def prune(lin, x):
        stat = new_hessian(lin)
        add_to_hessian(stat, x)  # 2/N X^T X over every calibration token at once
        sparsegpt_solve_(lin.weight.data, stat["h"], config.sparsity, config.nm, config.blocksize, config.percdamp)

    return prune


#: 6 rows of 48 tokens: 288 tokens, more than any input width (96). With fewer tokens than inputs the Hessian is
#: singular but for SparseGPT's 1% damping, and float summation order alone (two batches against one) flips
#: near-tied mask choices (6 x 16 tokens: 24 of down_proj's 6144 weights in layer 0 of the tiny LLaMA)
REF_CALIB = tokens(batch=6, length=48, seed=5)
REFERENCES = {
    "wanda": (WandaConfig(), _wanda_reference),
    "wanda_2:4": (WandaConfig(pattern="2:4"), _wanda_reference),
    "sparsegpt": (SparseGPTConfig(blocksize=32), _sparsegpt_reference),
}


def _mask_mismatch(a, b, prefix: str = "") -> float:
    """Fraction of the decoder linears' weights (names starting with ``prefix``) pruned in one model only."""
    la, lb = _linears(a), _linears(b)
    pairs = [(la[n].weight == 0, lb[n].weight == 0) for n in la if n.startswith(prefix)]
    return sum(int((x != y).sum()) for x, y in pairs) / sum(x.numel() for x, _ in pairs)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("case", sorted(REFERENCES))
def test_staged_schedule_equals_the_all_rows_pass(arch, case, monkeypatch):
    """Staged = the all-rows one-pass computation. In one batch of every row: the same masks and (SparseGPT)
    the same updated weights. In two batches, Wanda's masks are still the same; SparseGPT's Hessians differ
    from the all-rows ones by float summation order only, which flips a few near-tied choices on some
    architectures (then every later layer differs a little): layer 0 is the same and under 1% of all weights
    differ, where the two-pass flow (statistics from the unpruned layer) differs by more than 1% (and twice as
    much)."""
    import hf_pruning.methods.masks.layerwise as layerwise

    config, make_reference = REFERENCES[case]
    reference = _all_rows_reference(tiny_model(arch), make_reference(config))
    monkeypatch.setattr(layerwise, "LAYER_BATCH", REF_CALIB.shape[0])
    one_batch = hf_pruning.prune_(tiny_model(arch), config, calibration=REF_CALIB)
    for name, lin in _linears(reference).items():
        got = _linears(one_batch)[name].weight
        assert torch.equal(got == 0, lin.weight == 0), name
        torch.testing.assert_close(got, lin.weight, rtol=1e-4, atol=1e-5)
    monkeypatch.setattr(layerwise, "LAYER_BATCH", 4)
    staged = hf_pruning.prune_(tiny_model(arch), config, calibration=REF_CALIB)  # batches of 4 and 2 rows
    assert _mask_mismatch(staged, reference, "0.") == 0
    mismatch = _mask_mismatch(staged, reference)
    assert mismatch == 0 if case.startswith("wanda") else mismatch < 0.01
    two_pass = hf_pruning.prune_(tiny_model(arch), dataclasses.replace(config, one_pass=False), calibration=REF_CALIB)
    assert _mask_mismatch(two_pass, reference) > max(0.01, 2 * mismatch)


def test_groups_follow_the_forward():
    """The stages are the linears grouped by the input tensor they read, in the order the forward reaches them."""
    from hf_pruning.engine import capture
    from hf_pruning.methods.masks.layerwise import input_groups
    from hf_pruning.remote.hf_pruning_surgery import adapter_for

    attention = [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]]
    expected = {"llama": [*attention, ["self_attn.o_proj"], ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]],
                "opt": [*attention, ["self_attn.out_proj"], ["fc1"], ["fc2"]]}
    for arch, groups in expected.items():
        model = tiny_model(arch)
        store, kwargs = capture(model, CALIB[:2])
        assert input_groups(adapter_for(model).decoder_layers(model)[0], store[0], kwargs[0]) == groups, arch


def test_activations_on_disk_give_the_same_model(tmp_path):
    """With the activation stores on disk (Barber's block inputs/outputs too) the pruned model is the same,
    and every store file is gone afterwards."""
    from hf_pruning.methods.llm_barber import pruner
    from hf_pruning.methods.masks.layerwise import sequential
    from hf_pruning.remote.hf_pruning_surgery import adapter_for

    config = BARBER_FULL
    expected = hf_pruning.prune_(tiny_model("llama"), config, calibration=CALIB)
    model = tiny_model("llama")
    adapter = adapter_for(model)
    sequential(model, CALIB, lambda i, layer, inputs, kw: pruner.barber_layer_(adapter, layer, inputs, kw, config),
               "llm_barber", store_folder=str(tmp_path / "store"))
    for (name, a), b in zip(_linears(model).items(), _linears(expected).values()):
        assert torch.equal(a.weight, b.weight), name
    assert not list((tmp_path / "store").iterdir())


@pytest.mark.parametrize("arch", ["llama", "gemma2", "opt"])
@pytest.mark.parametrize("config", [WandaConfig(), SparseGPTConfig(blocksize=32)], ids=["wanda", "sparsegpt"])
def test_the_staged_schedule_runs_each_linear_once_per_row(arch, config, monkeypatch):
    """The staged schedule costs what one forward costs: every linear computes once per calibration row
    (o_proj and down_proj run on their recorded inputs in the later passes, the finished attention is
    replayed), besides the one-row forward that finds the groups (once per run, on the first layer). OPT's
    fc1/fc2 are no block of their own: fc1 runs again in the fc2 stage. Without down_proj's inputs kept, and
    recomputing every pass, the model is the same."""
    import hf_pruning.methods.masks.layerwise as layerwise
    from hf_pruning.methods.masks import replay

    model, tokens_in = tiny_model(arch), {}  # linear -> tokens it computed on (OPT's MLP reads [b * T, d])
    for name, lin in _linears(model).items():
        lin.register_forward_hook(lambda mod, args, out, name=name: tokens_in.__setitem__(
            name, tokens_in.get(name, 0) + args[0].numel() // args[0].shape[-1]))
    hf_pruning.prune_(model, config, calibration=CALIB)  # two batches
    rows, length = CALIB.shape
    for name, count in tokens_in.items():
        once = (2 if arch == "opt" and name.endswith("fc1") else 1) * rows
        assert count == (once + name.startswith("0.")) * length, (name, count)
    monkeypatch.setattr(layerwise, "REPLAY_WIDE_TAILS", False)  # down_proj's inputs not kept: gate/up rerun
    lean = hf_pruning.prune_(tiny_model(arch), config, calibration=CALIB)
    monkeypatch.setattr(layerwise, "REPLAY_TAILS", False)
    monkeypatch.setattr(replay.Recorder, "complete", lambda self: False)
    recomputed = hf_pruning.prune_(tiny_model(arch), config, calibration=CALIB)
    for (name, a), b, c in zip(_linears(model).items(), _linears(recomputed).values(), _linears(lean).values()):
        assert torch.equal(a.weight, b.weight) and torch.equal(a.weight, c.weight), name


def _layers(model):
    from hf_pruning.remote.hf_pruning_surgery import adapter_for

    return adapter_for(model).decoder_layers(model)


@pytest.mark.parametrize("rows,pieces", [(8192, 4), (144, 2), (1000, 3), (20000, 7), (6 * 48, 2), (17, 3)])
def test_streamed_column_sum_is_the_all_rows_sum_bit_for_bit(rows, pieces):
    """Wanda's staged statistic: the rows' sum of squares added batch by batch equals ``x.sum(0)`` over all
    rows at once, bit for bit (PyTorch's CPU cascade followed across batches; widths of whole 64-float
    groups, as every hidden and intermediate size of the supported models)."""
    from hf_pruning.methods.masks.summation import StreamedColumnSum

    x = torch.randn(rows, 128, generator=torch.Generator().manual_seed(rows)).pow(2) * 7
    streamed = StreamedColumnSum(rows, 128)
    for part in x.tensor_split(pieces):
        streamed.add(part)
    assert torch.equal(streamed.total(), x.sum(0))
    assert not torch.equal(sum(part.sum(0) for part in x.tensor_split(pieces)), x.sum(0)) or rows < 300
