"""JAX's persistent compilation cache for sdjax's entry points: where it lives, how to move or turn it off, and
turning it on without ever failing a run.

`import sdjax` changes no global JAX setting; the `sdjax` command (every subcommand that compiles, the demo
included) calls `setup()` before anything compiles, and a notebook or script may call
`sdjax.pipelines.enable_compilation_cache()` (the same, for the library).

Where the cache lives, first found wins:
1. `--no-compile-cache` (the command line): off;
2. the environment variable SDJAX_COMPILE_CACHE: "0", "off", "false", "no" or "none" turn it off, any other value
   is the directory;
3. a cache directory already given to JAX itself (JAX_COMPILATION_CACHE_DIR, `jax.config`): kept as it is;
4. the per-user default, $XDG_CACHE_HOME/sdjax/jax-compile (~/.cache/sdjax/jax-compile).

Every program is kept, however fast it compiled (JAX's default keeps only those that took over a second, which
leaves out the small model's): the minimum compile time and entry size are set to 0. The directory is bounded:
past MAX_BYTES JAX deletes the least recently used programs (its `jax_compilation_cache_max_size`; a size the user
gave JAX, e.g. JAX_COMPILATION_CACHE_MAX_SIZE, stays). A directory that cannot be created or written gives one
warning and the run goes on without the cache.
"""
from __future__ import annotations

import importlib.util
import os
import tempfile
import warnings
from pathlib import Path

ENV_VAR = "SDJAX_COMPILE_CACHE"
OFF_VALUES = ("0", "off", "false", "no", "none")
MAX_BYTES = 4 * 1024 ** 3  # an SD 1.5 CPU program is tens of MB: a bound for years of different sizes and samplers


class CompileCacheWarning(UserWarning):
    """The compilation cache directory cannot be used; the run goes on without it."""


_warned: set[str] = set()
_enabled_path: Path | None = None  # what this module gave JAX (None: it changed nothing)
_before: str | None = None  # JAX's cache directory before that
_before_max: int | None = None  # and JAX's size bound before that


def default_dir() -> Path:
    """The per-user cache directory: $XDG_CACHE_HOME/sdjax/jax-compile, else ~/.cache/sdjax/jax-compile."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "sdjax" / "jax-compile"


def chosen_dir(enabled: bool = True) -> Path | None:
    """The directory the settings above choose, or None when the cache is off (or JAX already has its own)."""
    if not enabled:
        return None
    value = os.environ.get(ENV_VAR, "").strip()
    if value.lower() in OFF_VALUES:
        return None
    if value:
        return Path(value).expanduser()
    import jax

    if jax.config.jax_compilation_cache_dir and _enabled_path is None:
        return None  # the user's own JAX setting stays
    return default_dir()


def writable(path: Path) -> str | None:
    """None if `path` can be created and written; else why not (one line)."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".sdjax-write-test-"):
            pass
    except OSError as e:
        return e.strerror or type(e).__name__
    return None


def enable(path: str | os.PathLike) -> Path | None:
    """Keep compiled programs in `path` (all of them: no minimum compile time or size). Returns the directory, or
    None (with one CompileCacheWarning per directory) when it cannot be created or written."""
    global _enabled_path, _before, _before_max
    import jax
    from jax.experimental.compilation_cache import compilation_cache

    path = Path(path).expanduser()
    problem = writable(path)
    if problem is not None:
        if str(path) not in _warned:
            _warned.add(str(path))
            warnings.warn(f"compilation cache {path}: {problem}; running without it (move it with {ENV_VAR}=DIR, "
                          f"or turn it off with {ENV_VAR}=off)", CompileCacheWarning, stacklevel=2)
        return None
    if _enabled_path is None:
        _before = jax.config.jax_compilation_cache_dir
        _before_max = jax.config.jax_compilation_cache_max_size
    if _before_max == -1 and _can_evict():  # -1: JAX's default, no bound
        jax.config.update("jax_compilation_cache_max_size", MAX_BYTES)
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    compilation_cache.reset_cache()  # JAX opens its cache once per process: a new directory needs a reset
    _enabled_path = path
    return path


def disable() -> None:
    """Undo `enable` in this process (JAX's own setting before it comes back); nothing if it was not called."""
    global _enabled_path
    if _enabled_path is None:
        return
    import jax
    from jax.experimental.compilation_cache import compilation_cache

    jax.config.update("jax_compilation_cache_dir", _before)
    jax.config.update("jax_compilation_cache_max_size", _before_max)
    compilation_cache.reset_cache()
    _enabled_path = None


def _can_evict() -> bool:
    """JAX's eviction locks the directory with `filelock` (here through huggingface_hub); without it, no bound."""
    return importlib.util.find_spec("filelock") is not None


def setup(enabled: bool = True) -> Path | None:
    """What the entry points call first: the cache in `chosen_dir(enabled)`, or off. Returns the directory in use
    (None: sdjax uses none)."""
    path = chosen_dir(enabled)
    if path is None:
        disable()
        return None
    return enable(path)
