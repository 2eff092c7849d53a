"""Stores in CPU memory spill batches to disk when the machine's available memory runs short: the results are the
same, the spilled files are removed afterwards (also after an error), and a reserve of 0 never spills."""

from __future__ import annotations

import glob
import os
import tempfile

import pytest
import torch
from tiny_models import tiny_model, tokens

import hf_pruning
from hf_pruning.config import PruningConfig
from hf_pruning.engine import ActivationStore, spill_reserve

IDS = tokens(6, 16, seed=5)
EVERYTHING = 2**62  # a reserve no machine has: every batch spills


def _spill_dirs():
    return glob.glob(os.path.join(tempfile.gettempdir(), "hf_pruning_spill_*"))


@pytest.fixture(autouse=True)
def _no_spill_dirs_before():
    assert _spill_dirs() == [], "a spill folder of an earlier run was left behind"


def test_a_store_spills_and_reads_back_the_same_batches():
    batches = [torch.randn(2, 5, 8), torch.randn(1, 5, 8)]
    with spill_reserve(EVERYTHING):
        store = ActivationStore()
        for b in batches:
            store.append(b)
        store[1] = batches[1] * 2
    assert all(isinstance(item, str) for item in store._batches)  # on disk, not in memory
    assert _spill_dirs()
    assert torch.equal(store[0], batches[0]) and torch.equal(store[1], batches[1] * 2)
    store.close()
    assert _spill_dirs() == []


def test_a_reserve_of_zero_keeps_everything_in_memory():
    with spill_reserve(0):
        store = ActivationStore()
        store.append(torch.randn(2, 5, 8))
    assert not isinstance(store._batches[0], str)
    store.close()


@pytest.mark.parametrize("method,settings", [
    ("wanda", {"sparsity": 0.5}),
    ("sleb", {"num_removals": 1}),
    ("gradmap", {"num_removals": 1, "compensate": True}),
])
def test_spilled_runs_prune_exactly_as_in_memory(method, settings):
    config = PruningConfig.from_dict({"method": method, **settings})
    want = tiny_model("llama")
    hf_pruning.prune_(want, config, IDS, compensation_calibration=IDS if settings.get("compensate") else None)
    got = tiny_model("llama")
    with spill_reserve(EVERYTHING):
        hf_pruning.prune_(got, config, IDS, compensation_calibration=IDS if settings.get("compensate") else None)
    assert got.config.pruning_plan == want.config.pruning_plan
    for (name, a), (_, b) in zip(want.state_dict().items(), got.state_dict().items()):
        assert torch.equal(a, b), name
    assert _spill_dirs() == []


def test_spilled_files_are_removed_after_an_error(monkeypatch):
    import importlib

    engine_sequential = importlib.import_module("hf_pruning.engine.sequential")

    def fail(*args, **kwargs):  # the first layer's propagation, when the layer-0 inputs are already spilled
        assert _spill_dirs(), "nothing was spilled before the error"
        raise RuntimeError("stop here")

    monkeypatch.setattr(engine_sequential, "propagate", fail)
    model = tiny_model("llama")
    with spill_reserve(EVERYTHING), pytest.raises(RuntimeError, match="stop here"):
        hf_pruning.prune_(model, hf_pruning.WandaConfig(sparsity=0.5, one_pass=False), IDS)
    assert _spill_dirs() == []


def test_replacing_a_batch_on_disk_keeps_a_batch_read_before(tmp_path):
    """A batch read from disk is memory-mapped; replacing it writes a new file (rewriting the old one in place
    would truncate the mapped pages under the reader: a bus error)."""
    store = ActivationStore(str(tmp_path))
    first = torch.randn(2, 64, 32)
    store.append(first)
    before = store[0]  # memory-mapped from the file
    store[0] = torch.zeros(1, 8, 32)  # smaller: an in-place rewrite would truncate
    assert torch.equal(before, first) and torch.equal(store[0], torch.zeros(1, 8, 32))
    assert len(list(tmp_path.iterdir())) == 1  # the old file is gone
    store.close()
