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


@pytest.fixture
def xla_default_optimisations():
    """XLA's default optimisations for one test, whatever its module set (`pipeline_fixtures.quick_compiles` turns
    most of them off). jax does not key its compile cache on this setting: the test must compile new programs (a
    new `jax.jit`, a new pipeline), or it would run the ones compiled before."""
    import jax

    before = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", False)
    yield
    jax.config.update("jax_disable_most_optimizations", before)
