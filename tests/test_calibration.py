"""Calibration batches: seeded, from every kind of source, and clear errors instead of silent repeats."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_models import tiny_tokenizer

from hf_pruning.calibration import (
    NotEnoughTextError,
    build_calibration,
    default_text,
    evaluation_windows,
    load_text,
)


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def test_seeded_windows_are_deterministic_and_disjoint(tok):
    text = default_text("calibration")
    a = build_calibration(tok, text=text, n_samples=8, seq_len=64, seed=3)
    b = build_calibration(tok, text=text, n_samples=8, seq_len=64, seed=3)
    c = build_calibration(tok, text=text, n_samples=8, seq_len=64, seed=4)
    assert a.shape == (8, 64) and a.dtype == torch.long
    assert torch.equal(a, b) and not torch.equal(a, c)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    starts = []
    for row in a.tolist():  # every window is a real slice of the text, on the window grid, no two the same
        start = next(i for i in range(0, len(ids) - 63, 64) if ids[i : i + 64] == row)
        starts.append(start)
    assert len(set(starts)) == 8


def test_too_little_text_is_an_error_not_a_repeat(tok):
    with pytest.raises(NotEnoughTextError, match="has 150 tokens: room for 2 windows of 64, but 4 were requested"):
        build_calibration(tok, text=" ".join(["the"] * 150), n_samples=4, seq_len=64)
    with pytest.raises(NotEnoughTextError, match="empty"):
        build_calibration(tok, text="   ", n_samples=1, seq_len=8)


def test_sequence_longer_than_the_model_is_refused(tok):
    with pytest.raises(ValueError, match="exceeds the model's maximum context of 256"):
        build_calibration(tok, source="default", n_samples=1, seq_len=512, max_length=256)


def test_file_sources(tmp_path):
    (tmp_path / "a.txt").write_text("plain words here")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "json line"}) + "\n" + json.dumps({"text": "second"}) + "\n")
    (tmp_path / "c.json").write_text(json.dumps([{"content": "custom column"}]))
    assert load_text(tmp_path / "a.txt") == "plain words here"
    assert load_text(str(tmp_path / "b.jsonl")) == "json line\n\nsecond"
    assert load_text(tmp_path / "c.json", text_column="content") == "custom column"
    with pytest.raises(ValueError, match="no 'text' field"):
        load_text(tmp_path / "c.json")
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "x.txt").write_text("one")
    (folder / "y.txt").write_text("two")
    assert load_text(folder) == "one\n\ntwo"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_text(tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(NotEnoughTextError, match="empty"):
        load_text(tmp_path / "empty.txt")
    with pytest.raises(ValueError, match="not a file, a folder"):
        load_text("no-such-dataset")


def test_datasets_object_and_hub_names_offline(tmp_path, monkeypatch):
    import datasets

    ds = datasets.Dataset.from_dict({"text": ["first", "", "second"]})
    assert load_text(ds) == "first\n\nsecond"
    assert load_text(datasets.DatasetDict({"train": ds})) == "first\n\nsecond"
    calls = []

    def fake_load_dataset(path, name=None, split=None, data_files=None):  # the Hub call, served locally
        calls.append((path, name, split, data_files))
        return ds

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    assert load_text("wikitext2") == "first\n\nsecond"
    assert load_text("c4") == "first\n\nsecond"
    assert load_text("hf:someone/corpus") == "first\n\nsecond"
    assert calls[0][:3] == ("wikitext", "wikitext-2-raw-v1", "train")
    assert calls[1][0] == "allenai/c4" and calls[1][3]["train"].startswith("en/c4-train")
    assert calls[2][0] == "someone/corpus"


def test_embedded_default_text_splits_are_disjoint():
    cal, ev, whole = default_text("calibration"), default_text("evaluation"), default_text()
    assert cal + ev == whole and len(whole) > 300_000
    with pytest.raises(ValueError, match="split must be"):
        default_text("train")


def test_evaluation_windows_are_consecutive(tok):
    w = evaluation_windows(tok, default_text("evaluation"), 32, max_windows=5)
    ids = tok(default_text("evaluation"), add_special_tokens=False)["input_ids"]
    assert w.shape == (5, 32) and w.flatten().tolist() == ids[:160]
