"""Ctrl-C for the command line: the process ends at once with exit code 130 and one line on stderr, never in the
middle of writing a file, never by an exception raised inside JAX.

Python's default SIGINT handler raises KeyboardInterrupt in the main thread at the next bytecode, which can be
inside a callback JAX runs from C++ (its `_xla_gc_callback`: the interrupt is then swallowed and the run goes on)
or while XLA's own threads still run (a segfault at exit). And while the main thread waits minutes for a compile,
Python does not run the handler at all. So `install` replaces the handler: the signal only wakes a watcher thread
(through `signal.set_wakeup_fd`, which the C-level handler writes to whatever the main thread is doing), and that
thread ends the process with `os._exit(130)`: no exception in the main thread, no interpreter shutdown racing
XLA's threads. What is lost is what a SIGKILL loses, which the bulk runs are built to survive (`--resume`); and
the watcher first waits for any `writing()` section to finish, so a Ctrl-C never leaves a temporary or a
half-written file, nor a saved image without its manifest line.

The library itself installs nothing: `writing()` is a no-op cost (an uncontended lock) where `install` was not
called, and a KeyboardInterrupt then behaves as usual.
"""
from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from pathlib import Path

EXIT_CODE = 130  # 128 + SIGINT, what shells report for a Ctrl-C
WRITE_TIMEOUT = 60.0  # seconds a Ctrl-C waits for a write in progress (a hung network disk) before ending anyway

_lock = threading.RLock()  # held while files are written; the watcher takes it before it ends the process
_temporaries: set[Path] = set()  # files a write in progress may leave: removed if the watcher cannot wait for it


@contextlib.contextmanager
def writing(*temporaries: os.PathLike):
    """Run the block (a file written and renamed, a manifest line appended) to its end before a Ctrl-C ends the
    process. `temporaries`: files the block creates and removes itself; should a Ctrl-C not be able to wait for the
    block (a disk that hangs for `WRITE_TIMEOUT` s), they are removed before the process ends."""
    with _lock:
        paths = {Path(p) for p in temporaries}
        _temporaries.update(paths)
        try:
            yield
        finally:
            _temporaries.difference_update(paths)


class _Watcher:
    def __init__(self, message: str):
        self.message = message
        self.read_fd, self.write_fd = os.pipe()
        os.set_blocking(self.write_fd, False)  # set_wakeup_fd requires it; a full pipe just drops the byte
        self.previous_handler = signal.signal(signal.SIGINT, lambda signum, frame: None)  # no KeyboardInterrupt
        self.previous_fd = signal.set_wakeup_fd(self.write_fd, warn_on_full_buffer=False)
        self.thread = threading.Thread(target=self._wait, name="sdjax-interrupt", daemon=True)
        self.stopped = False
        self.thread.start()

    def _wait(self):
        while True:
            try:
                data = os.read(self.read_fd, 64)
            except OSError:
                return  # closed by uninstall
            if not data or self.stopped:
                return
            if signal.SIGINT in data:
                self._end()

    def _end(self):
        got = _lock.acquire(timeout=WRITE_TIMEOUT)  # a write in progress finishes first
        if not got:
            for path in list(_temporaries):
                with contextlib.suppress(OSError):
                    path.unlink()
        for stream in (sys.stdout, sys.stderr):  # what the main thread printed before
            with contextlib.suppress(Exception):
                stream.flush()
        with contextlib.suppress(OSError):  # on a line of its own, not after a progress bar's last \r
            os.write(2, f"\n{self.message}\n".encode())
        os._exit(EXIT_CODE)

    def uninstall(self):
        signal.set_wakeup_fd(self.previous_fd)
        signal.signal(signal.SIGINT, self.previous_handler)
        self.stopped = True
        os.write(self.write_fd, b"\0")  # wakes the thread, which sees `stopped` and returns
        self.thread.join()
        os.close(self.write_fd)
        os.close(self.read_fd)


_active: _Watcher | None = None


def install(message: str = "interrupted") -> bool:
    """From now on a Ctrl-C (SIGINT) ends the process with exit code 130 after printing `message` on stderr, as
    described in the module docstring. Main thread only; False (nothing installed) where the platform cannot wake
    a thread on a signal (not POSIX) or one is installed already."""
    global _active
    if _active is not None or os.name != "posix" or threading.current_thread() is not threading.main_thread():
        return False
    _active = _Watcher(message)
    return True


def set_message(message: str) -> None:
    """The line a Ctrl-C prints from now on (when installed)."""
    if _active is not None:
        _active.message = message


def uninstall() -> None:
    """Back to the handler and wakeup fd there were before `install`."""
    global _active
    if _active is not None:
        _active.uninstall()
        _active = None
