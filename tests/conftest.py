import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


import pytest  # noqa: E402  (after the offline switches above)


@pytest.fixture(scope="session", autouse=True)
def _warm_lazy_imports():
    """Import what DDP and the optimizers import lazily (torch._dynamo) once, before any fork."""
    import torch
    import torch._dynamo  # noqa: F401

    torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))])
