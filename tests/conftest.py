"""Suite-wide fixtures."""

from __future__ import annotations

import pytest
import torch

from reidkit import threads


@pytest.fixture(autouse=True)
def _threads_back_to_automatic():
    """A CLI test's ``--threads`` (or the demo's choice) must not leak into later tests."""
    before = torch.get_num_threads()
    yield
    threads.set_threads(None)
    torch.set_num_threads(before)
