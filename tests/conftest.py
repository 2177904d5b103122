import os

# Tests run on the CPU whatever is installed; multi-device tests start their own processes with XLA_FLAGS.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The `sdjax` command keeps compiled programs in ~/.cache by default (sdjax.compile_cache); tests that call it in this
# process or start it in others must not write there. tests/test_compile_cache.py sets its own directory.
os.environ.setdefault("SDJAX_COMPILE_CACHE", "off")

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


# ----------------------------------------------------------------------------------------------------------------
# CI=true: a test that cannot run because a package is missing fails the run instead of skipping. Otherwise a CI
# environment without diffusers (say) would report green while skipping every parity test.
#
# - A module skipped whole at collection (`pytest.importorskip` at module level, or `pytest.skip(...,
#   allow_module_level=True)`, whatever the reason) becomes a collection error: pytest stops after collecting, with
#   exit status 2, listing each such module and its reason (for importorskip: "could not import 'NAME': ...").
#   A module that cannot run in CI for a legitimate reason should mark its tests (`pytestmark = skipif(...)`);
#   those skips are reported per test and stay skips.
# - A test skipped by `pytest.importorskip` inside it, or by a skip raised while handling an ImportError, fails.
# Without CI=true nothing changes.


def _ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


_HINT = "in CI a missing package is an error: install the test extra (pip install -e '.[test]') or fix the import"


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector):
    report = yield
    if _ci() and report.skipped and isinstance(collector, pytest.Module):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        reason = reason.removeprefix("Skipped: ")
        report.outcome = "failed"
        report.longrepr = f"CI=true: module {collector.nodeid} was skipped at collection ({reason}); {_HINT}"
    return report


def _import_skip(exc: BaseException) -> bool:
    """Whether a skip exception comes from a missing (or too old) package."""
    reason = str(getattr(exc, "msg", exc))
    return (reason.startswith("could not import ") or ", required is: " in reason  # pytest.importorskip
            or isinstance(exc.__context__, ImportError))  # pytest.skip inside `except ImportError:`


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if (_ci() and report.skipped and not hasattr(report, "wasxfail") and call.excinfo is not None
            and _import_skip(call.excinfo.value)):
        reason = str(getattr(call.excinfo.value, "msg", call.excinfo.value))
        report.outcome = "failed"
        report.longrepr = f"CI=true: {item.nodeid} was skipped ({reason}); {_HINT}"
    return report
