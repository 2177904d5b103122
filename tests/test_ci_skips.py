"""CI=true turns skips for missing packages into failures (tests/conftest.py); without it they stay skips.

Each case runs pytest in a subprocess on small test files written here, next to a copy of this suite's conftest.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

MISSING = "sdjax_no_such_package_for_ci_test"

FILES = {
    "test_module_importorskip.py": f"""
        import pytest
        pytest.importorskip("{MISSING}")

        def test_never_runs():
            pass
    """,
    "test_module_skip_on_import_error.py": f"""
        import pytest
        try:
            import {MISSING}_too
        except ImportError:
            pytest.skip("needs {MISSING}_too", allow_module_level=True)

        def test_never_runs():
            pass
    """,
    "test_items.py": f"""
        import pytest

        def test_importorskip_inside():
            pytest.importorskip("{MISSING}")

        def test_skip_on_import_error_inside():
            try:
                import {MISSING}_three
            except ImportError:
                pytest.skip("needs {MISSING}_three")

        def test_skip_for_another_reason():
            pytest.skip("needs a GPU")

        @pytest.mark.skipif(True, reason="not on this platform")
        def test_marked_skip():
            pass

        def test_expected_failure():
            pytest.xfail("a known bug elsewhere")

        def test_passes():
            pass
    """,
}


def run_pytest(tmp_path: Path, names, ci: bool) -> subprocess.CompletedProcess:
    shutil.copy(Path(__file__).with_name("conftest.py"), tmp_path / "conftest.py")
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    for name in names:
        (tmp_path / name).write_text(textwrap.dedent(FILES[name]))
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    if ci:
        env["CI"] = "true"
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-rfEs", "-p", "no:cacheprovider", *names],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


def test_ci_fails_modules_skipped_for_missing_packages(tmp_path):
    result = run_pytest(tmp_path, ["test_module_importorskip.py", "test_module_skip_on_import_error.py"], ci=True)
    out = result.stdout + result.stderr
    assert result.returncode == 2, out  # collection errors: pytest stops before running anything
    assert "2 errors" in out and "never_runs" not in out.split("short test summary")[-1], out
    for module, package in (("test_module_importorskip.py", f"could not import '{MISSING}'"),
                            ("test_module_skip_on_import_error.py", f"needs {MISSING}_too")):
        line = next(line for line in out.splitlines() if line.startswith(f"ERROR {module}"))
        assert "CI=true" in line and package in line, line


def test_ci_fails_tests_skipped_for_missing_packages_only(tmp_path):
    result = run_pytest(tmp_path, ["test_items.py"], ci=True)
    out = result.stdout + result.stderr
    assert result.returncode == 1, out
    assert "2 failed, 1 passed, 2 skipped, 1 xfailed" in out, out
    failed = [line for line in out.splitlines() if line.startswith("FAILED ")]
    assert len(failed) == 2, out
    assert "test_items.py::test_importorskip_inside" in failed[0] and f"could not import '{MISSING}'" in failed[0]
    assert "test_items.py::test_skip_on_import_error_inside" in failed[1] and f"needs {MISSING}_three" in failed[1]


def test_without_ci_missing_packages_skip(tmp_path):
    result = run_pytest(tmp_path, list(FILES), ci=False)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    assert "1 passed, 6 skipped, 1 xfailed" in out, out
    assert f"could not import '{MISSING}'" in out
