"""Model tests run small tensors: one intra-op thread is as fast as two and does not slow to a crawl
when other processes share the cores (OpenMP threads waiting on each other)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def one_torch_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
