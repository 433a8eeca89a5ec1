"""Shared test set-up."""

import pytest
import torch


@pytest.fixture(autouse=True)
def cpu_only(monkeypatch):
    """The suite is CPU tests (CI has no GPU); some compare bits and spawn CPU processes, so keep
    every test on the CPU on a CUDA machine too."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
