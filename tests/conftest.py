"""Shared fixtures: a fake Hub (tests/fakes/hub.py) for the push tests."""

from __future__ import annotations

import pytest
from fakes.hub import FakeHub

HUB_TOKEN = "hf_test_token"


@pytest.fixture
def hub(monkeypatch):
    """A fake Hub in place of ``huggingface_hub.HfApi`` that accepts ``HUB_TOKEN``."""
    return FakeHub(tokens=(HUB_TOKEN,)).install(monkeypatch)
