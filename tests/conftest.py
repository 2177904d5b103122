import os

# Tests run on the CPU whatever is installed; multi-device tests start their own processes with XLA_FLAGS.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="session")
def _torch_threads():
    try:
        import torch
    except ImportError:
        return
    torch.manual_seed(0)
