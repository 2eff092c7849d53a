"""Shared fixtures: the local Hub stand-in (tests/hub_standin.py) for the push tests."""

from __future__ import annotations

import pytest
from hub_standin import HubStandIn, local_only

HUB_TOKEN = "hf_test_token"


@pytest.fixture
def local_hub_client(monkeypatch):
    """huggingface_hub may only reach 127.0.0.1 during the test (use with pytest.mark.usefixtures)."""
    yield from local_only(monkeypatch)


@pytest.fixture
def hub(local_hub_client):
    """A running stand-in that accepts ``HUB_TOKEN``."""
    with HubStandIn(tokens=(HUB_TOKEN,)) as standin:
        yield standin
