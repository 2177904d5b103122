"""Multi-process (multi-host) runs: start `jax.distributed` from flags or the environment, and the few cross-process
steps a bulk run needs (gather rows, agree on a set, barrier).

Every process runs the same program. After `initialize`, `jax.devices()` lists the devices of all processes, the
pipeline lays each batch out over all of them, and each process holds (and saves) only its own devices' images.

Where the settings come from, first found wins:
1. arguments (the CLI's `--coordinator HOST:PORT --num-processes N --process-id I`);
2. the environment: SDJAX_COORDINATOR, SDJAX_NUM_PROCESSES, SDJAX_PROCESS_ID (JAX_COORDINATOR_ADDRESS also
   names the coordinator), SDJAX_INIT_TIMEOUT (seconds to wait for every process to connect, default 300);
3. a Cloud TPU VM: `jax.distributed.initialize()` with no arguments, which reads the workers of the slice from the
   TPU metadata. `coordinator="auto"` does the same anywhere JAX can detect the cluster (SLURM, Open MPI,
   Kubernetes, TPU).
With none of these, or one process, nothing is started: a plain single-process run.

CPU processes exchange data through gloo (`jax_cpu_collectives_implementation`), the default of the JAX this was
written against (0.10); `initialize` turns it on when an older JAX has it off, as CPU runs would otherwise fail at
the first cross-process step.
"""
from __future__ import annotations

import os

import numpy as np

ENV_COORDINATOR = "SDJAX_COORDINATOR"
ENV_NUM_PROCESSES = "SDJAX_NUM_PROCESSES"
ENV_PROCESS_ID = "SDJAX_PROCESS_ID"
ENV_TIMEOUT = "SDJAX_INIT_TIMEOUT"
DEFAULT_TIMEOUT = 300


class DistributedError(ValueError):
    """Inconsistent or unusable multi-process settings (one line, fit for the CLI's error message)."""


def _int_setting(value, flag: str, env: str):
    """An int from an argument, else from the environment variable `env`, else None."""
    source = flag
    if value is None:
        value, source = os.environ.get(env) or None, env
    if value is None:
        return None
    try:
        if isinstance(value, bool):
            raise ValueError
        return int(value)
    except (TypeError, ValueError):
        raise DistributedError(f"{source} must be an integer, got {value!r}") from None


def _on_cloud_tpu_vm() -> bool:
    import jax  # noqa: F401  (importing jax runs its Cloud TPU detection)

    try:
        from jax._src import cloud_tpu_init
    except ImportError:  # a JAX without the module: no auto-detection
        return False
    return bool(getattr(cloud_tpu_init, "running_in_cloud_tpu_vm", False))


def initialize(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None,
               *, timeout: int | None = None) -> tuple[int, int]:
    """Start `jax.distributed` when several processes are asked for; returns (process_id, num_processes).

    Call it before anything else touches JAX devices. coordinator: "HOST:PORT" of process 0 (it listens there),
    or "auto" for JAX's cluster detection. A second call with the same settings (or none) returns the running
    setup. Raises DistributedError for inconsistent settings.
    """
    import jax

    coordinator = coordinator or os.environ.get(ENV_COORDINATOR) or None
    num_processes = _int_setting(num_processes, "--num-processes", ENV_NUM_PROCESSES)
    process_id = _int_setting(process_id, "--process-id", ENV_PROCESS_ID)
    timeout = _int_setting(timeout, "timeout", ENV_TIMEOUT) or DEFAULT_TIMEOUT

    if jax.distributed.is_initialized():
        running = (jax.process_index(), jax.process_count())
        if (process_id not in (None, running[0])) or (num_processes not in (None, running[1])):
            raise DistributedError(f"jax.distributed already runs as process {running[0]} of {running[1]}, not "
                                   f"process {process_id} of {num_processes}")
        return running

    if coordinator == "auto":
        if num_processes is not None or process_id is not None:
            raise DistributedError("--coordinator auto detects the processes itself: drop --num-processes and "
                                   "--process-id")
        return _start(timeout=timeout)

    if num_processes is None and process_id is None:
        if coordinator is not None:
            raise DistributedError(f"--coordinator {coordinator} needs --num-processes N and --process-id I "
                                   f"(or {ENV_NUM_PROCESSES} and {ENV_PROCESS_ID})")
        if _on_cloud_tpu_vm():  # every worker of a pod slice runs this; JAX finds the others
            return _start(timeout=timeout)
        return 0, 1
    if num_processes is None:
        raise DistributedError(f"--process-id {process_id} needs --num-processes (how many processes in all)")
    if num_processes < 1:
        raise DistributedError(f"--num-processes must be at least 1, got {num_processes}")
    if process_id is None:
        if num_processes == 1:
            return 0, 1
        raise DistributedError(f"--num-processes {num_processes} needs --process-id (0 to {num_processes - 1}, a "
                               "different one in each process)")
    if not 0 <= process_id < num_processes:
        raise DistributedError(f"--process-id must be between 0 and {num_processes - 1} for {num_processes} "
                               f"processes, got {process_id}")
    if num_processes == 1:
        return 0, 1
    coordinator = coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS") or None
    if coordinator is None:
        raise DistributedError(f"--num-processes {num_processes} needs --coordinator HOST:PORT (process 0's "
                               f"address, the same in every process; or {ENV_COORDINATOR})")
    host, _, port = coordinator.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise DistributedError(f"--coordinator must be HOST:PORT (e.g. 10.0.0.1:8476), got {coordinator!r}")
    return _start(coordinator, num_processes, process_id, timeout=timeout)


def _start(coordinator=None, num_processes=None, process_id=None, *, timeout) -> tuple[int, int]:
    import jax

    if getattr(jax.config, "jax_cpu_collectives_implementation", "gloo") is None:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(coordinator, num_processes, process_id, initialization_timeout=timeout)
    except (RuntimeError, ValueError) as e:  # e.g. JAX already used, no cluster detected, nobody connected
        message = " ".join(str(e).split())
        raise DistributedError(f"cannot start jax.distributed (coordinator {coordinator or 'auto'}): "
                               f"{message}") from None
    return jax.process_index(), jax.process_count()


# ----------------------------------------------------------------------------------------------------------------
# Cross-process steps. With one process each is a no-op (or a copy), so callers need no special case.


def process_count() -> int:
    import jax

    return jax.process_count()


def barrier(name: str) -> None:
    """Wait until every process gets here (the same `name` in all)."""
    import jax

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def gather_rows(rows: np.ndarray, indices, total: int) -> np.ndarray:
    """Every process's rows of a (total, ...) array -> the whole array, on every process.

    rows: this process's rows (len(indices), ...); indices: their positions, disjoint between processes and
    together covering range(total) (as `PipelineOutput.indices`).
    """
    import jax

    rows = np.asarray(rows)
    indices = np.asarray(indices, np.int64)
    if jax.process_count() == 1:
        full = np.empty((total, *rows.shape[1:]), rows.dtype)
        full[indices] = rows
        return full
    from jax.experimental import multihost_utils

    full = np.zeros((total, *rows.shape[1:]), rows.dtype)
    full[indices] = rows
    owned = np.zeros(total, np.int32)
    owned[indices] = 1
    every, owners = multihost_utils.process_allgather((full, owned))  # (processes, total, ...), (processes, total)
    if not (owners.sum(0) == 1).all():
        raise RuntimeError(f"gather_rows: rows {np.flatnonzero(owners.sum(0) != 1).tolist()} are held by "
                           f"{sorted(set(owners.sum(0).tolist()))} processes, not exactly one")
    return every[owners.argmax(0), np.arange(total)]


def any_process(flags: np.ndarray) -> np.ndarray:
    """Element-wise OR of a bool array over all processes (same shape in each)."""
    import jax

    flags = np.asarray(flags, bool)
    if jax.process_count() == 1:
        return flags
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(flags.astype(np.int32)).any(axis=0)


def from_process_0(x: np.ndarray) -> np.ndarray:
    """Process 0's value of `x` on every process (same shape in each), so that all take the same decision."""
    import jax

    if jax.process_count() == 1:
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.broadcast_one_to_all(np.asarray(x)))


def data_mesh(devices=None):
    """A 1-D `jax.sharding.Mesh` over all devices (of every process), axis name `data`."""
    import jax
    from jax.sharding import Mesh

    devices = jax.devices() if devices is None else devices
    return Mesh(np.asarray(devices), ("data",))
