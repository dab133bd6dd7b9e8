import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    """The experiments' tiny ops run on one thread (as `batchnorm reproduce` does): faster on a busy CPU."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
