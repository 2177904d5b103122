"""The `sdjax` command keeps compiled programs on disk by default (sdjax.compile_cache): a second process loads them
from the cache instead of compiling, `--no-compile-cache` and SDJAX_COMPILE_CACHE turn it off or move it, an unusable
directory does not stop a run, and the library alone changes no JAX setting.

Cache use is read from JAX's own log (JAX_LOG_COMPILES=1 logs "Persistent compilation cache hit for 'jit_generate'")
and from the files in the cache directory, never from timings."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sdjax import compile_cache

from pipeline_fixtures import build_pipeline

pytest.importorskip("diffusers")

ROOT = Path(__file__).resolve().parents[1]
HIT = "Persistent compilation cache hit for 'jit_generate'"
FAST = ["--prompt", "a red circle", "--H", "32", "--W", "32", "--ddim_steps", "2", "--n_samples", "1", "--n_iter", "1",
        "--skip_grid"]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return build_pipeline(tmp_path_factory.mktemp("cache") / "tiny", kind="sd1")


def environment(home: Path, **extra) -> dict:
    """A child's environment: no SDJAX_COMPILE_CACHE (conftest sets it off for this process), the per-user cache
    under `home`, JAX logging every cache hit."""
    env = {k: v for k, v in os.environ.items() if k not in (compile_cache.ENV_VAR, "JAX_COMPILATION_CACHE_DIR")}
    env.update(JAX_PLATFORMS="cpu", XDG_CACHE_HOME=str(home), JAX_LOG_COMPILES="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]), **extra)
    return env


def sdjax_command(model, outdir: Path, env: dict, *flags: str) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "sdjax.cli", "txt2img", *FAST, "--ckpt", str(model), "--outdir",
                             str(outdir), *flags], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def entries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) if folder.is_dir() else []


def image(outdir: Path) -> np.ndarray:
    return np.asarray(Image.open(outdir / "samples" / "00000.png"))


@pytest.fixture(scope="module")
def first_run(model, tmp_path_factory):
    """One `sdjax txt2img` with the default settings: (home, its cache folder, its output folder, its stderr)."""
    root = tmp_path_factory.mktemp("first")
    home = root / "xdg"
    result = sdjax_command(model, root / "out", environment(home))
    return home, home / "sdjax" / "jax-compile", root / "out", result.stderr


def test_the_command_writes_the_per_user_cache(first_run):
    _, cache, _, stderr = first_run
    assert HIT not in stderr  # an empty cache: compiled
    assert any(name.startswith("jit_generate-") for name in entries(cache)), entries(cache)


def test_a_second_process_loads_the_program_from_the_cache(model, first_run, tmp_path):
    home, cache, out1, _ = first_run
    before = entries(cache)
    result = sdjax_command(model, tmp_path / "out", environment(home))
    assert HIT in result.stderr
    assert entries(cache) == before  # nothing new compiled, so nothing written
    assert np.array_equal(image(tmp_path / "out"), image(out1))


@pytest.mark.parametrize("how", ["flag", "env_off", "env_0"])
def test_flag_and_environment_turn_it_off(model, first_run, tmp_path, how):
    home, cache, out1, _ = first_run
    before = entries(cache)
    flags = ["--no-compile-cache"] if how == "flag" else []
    extra = {} if how == "flag" else {compile_cache.ENV_VAR: "off" if how == "env_off" else "0"}
    result = sdjax_command(model, tmp_path / "out", environment(home, **extra), *flags)
    assert "Persistent compilation cache hit" not in result.stderr  # compiled, though the cache holds the program
    assert "Finished XLA compilation of jit(generate)" in result.stderr
    assert entries(cache) == before
    assert np.array_equal(image(tmp_path / "out"), image(out1))


def test_the_environment_moves_it(model, tmp_path):
    moved = tmp_path / "moved"
    sdjax_command(model, tmp_path / "out", environment(tmp_path / "xdg", **{compile_cache.ENV_VAR: str(moved)}))
    assert any(name.startswith("jit_generate-") for name in entries(moved))
    assert not (tmp_path / "xdg").exists()


def test_an_unusable_directory_is_one_warning_and_the_run_goes_on(model, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    env = environment(tmp_path / "xdg", **{compile_cache.ENV_VAR: str(blocker / "cache")})
    result = sdjax_command(model, tmp_path / "out", env)
    warnings = [line for line in result.stderr.splitlines() if "compilation cache" in line and "warning" in line]
    assert len(warnings) == 1 and warnings[0].startswith("sdjax: warning: compilation cache "), result.stderr[-2000:]
    assert "running without it" in warnings[0]
    assert (tmp_path / "out" / "samples" / "00000.png").is_file()


LIBRARY_SCRIPT = textwrap.dedent("""
    import sys, jax
    import sdjax
    pipe = sdjax.StableDiffusionPipeline.from_pretrained(sys.argv[1])
    pipe("a red circle", height=32, width=32, num_inference_steps=1, output_type="latent")
    print("cache dir:", jax.config.jax_compilation_cache_dir)
""")


def test_the_library_changes_no_jax_setting(model, tmp_path):
    script = tmp_path / "run.py"
    script.write_text(LIBRARY_SCRIPT)
    result = subprocess.run([sys.executable, str(script), str(model)], env=environment(tmp_path / "xdg"),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "cache dir: None" in result.stdout
    assert not (tmp_path / "xdg").exists()


def test_settings_choose_the_directory(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv(compile_cache.ENV_VAR, raising=False)
    assert compile_cache.default_dir() == tmp_path / "xdg" / "sdjax" / "jax-compile"
    assert compile_cache.chosen_dir() == compile_cache.default_dir()
    assert compile_cache.chosen_dir(enabled=False) is None
    for off in ("0", "off", "OFF", "false", "no", "none", " off "):
        monkeypatch.setenv(compile_cache.ENV_VAR, off)
        assert compile_cache.chosen_dir() is None, off
    monkeypatch.setenv(compile_cache.ENV_VAR, str(tmp_path / "here"))
    assert compile_cache.chosen_dir() == tmp_path / "here"
    assert compile_cache.chosen_dir(enabled=False) is None  # the flag wins over the environment
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.delenv(compile_cache.ENV_VAR)
    assert compile_cache.default_dir() == Path.home() / ".cache" / "sdjax" / "jax-compile"


def test_writable():
    assert compile_cache.writable(Path(os.devnull) / "cache") is not None


BOUND_SCRIPT = textwrap.dedent("""
    import sys
    from pathlib import Path
    import jax, jax.numpy as jnp
    from sdjax import compile_cache
    compile_cache.MAX_BYTES = int(sys.argv[2])
    before = jax.config.jax_compilation_cache_max_size
    compile_cache.enable(sys.argv[1])
    print("bound:", jax.config.jax_compilation_cache_max_size)
    for n in range(12):  # twelve different programs, each kept in the cache
        jax.jit(lambda x, n=n: jnp.sin(x @ x.T + n).sum())(jnp.ones((n + 3, 5))).block_until_ready()
    entries = list(Path(sys.argv[1]).glob("*-cache"))
    print("entries:", len(entries))
    print("bytes:", sum(p.stat().st_size for p in entries))
    compile_cache.disable()
    print("restored:", jax.config.jax_compilation_cache_max_size == before)
""")


def test_the_cache_is_bounded(tmp_path):
    """Past MAX_BYTES JAX deletes the least recently used programs; a bound the user gave JAX stays."""
    script = tmp_path / "bound.py"
    script.write_text(BOUND_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k not in (compile_cache.ENV_VAR, "JAX_COMPILATION_CACHE_DIR")}
    env.update(JAX_PLATFORMS="cpu")

    def run(cache, limit, **extra):
        r = subprocess.run([sys.executable, str(script), str(cache), str(limit)], env={**env, **extra},
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        return dict(line.split(": ", 1) for line in r.stdout.splitlines() if ": " in line)

    unbounded = run(tmp_path / "big", 1 << 40)
    one = int(unbounded["bytes"]) // int(unbounded["entries"])  # about one program's size
    bounded = run(tmp_path / "small", 4 * one)
    assert bounded["bound"] == str(4 * one) and bounded["restored"] == "True"
    assert int(unbounded["entries"]) >= 12 and int(bounded["entries"]) < int(unbounded["entries"])
    assert int(bounded["bytes"]) <= 4 * one
    assert run(tmp_path / "theirs", 4 * one, JAX_COMPILATION_CACHE_MAX_SIZE=str(1 << 30))["bound"] == str(1 << 30)
