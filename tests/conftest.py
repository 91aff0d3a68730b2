"""Test-wide settings: never touch the network, keep CPU threads modest."""

import os

import huggingface_hub.constants
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("MINIKD_MODE", "quick")


@pytest.fixture
def one_thread():
    """One torch thread for the test: bit-exact comparisons and a fair share of the 2 cores."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def empty_hub_cache(tmp_path, monkeypatch):
    """A hub cache with nothing in it: pretrained=True must fail fast, never download."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
