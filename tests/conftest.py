import pytest
import torch


@pytest.fixture(autouse=True)
def _deterministic(monkeypatch):
    torch.manual_seed(0)
    torch.set_num_threads(2)
    # A fixed thread count: with the automatic budget another urd job on this host (a slow test,
    # a training) would change it mid-test, and results are bit-identical only at one count.
    monkeypatch.setenv("URD_THREADS", "2")
    yield
