"""Multi-host set-up: ``jax.distributed`` from flags or the usual environment variables.

    from qnext_jax import distributed
    distributed.initialize(coordinator="10.0.0.1:1234", num_processes=2, process_id=0)
    distributed.initialize()   # from JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID,
                               # or JAX's own cluster detection (TPU pods, SLURM, Open MPI, k8s)

After it, ``jax.devices()`` lists every process's devices, so ``sharding.make_mesh`` builds one
global mesh; ``convert.load(..., mesh=mesh, shardings=...)`` then makes each process read only
its own shards. On the CPU backend the cross-process collectives go through gloo
(``jax_cpu_collectives_implementation``), which :func:`initialize` selects.
"""

from __future__ import annotations

import contextlib
import os
import re

ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"

_initialized = False


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value in (None, ""):
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def requested(coordinator: str | None = None, num_processes: int | None = None,
              process_id: int | None = None) -> bool:
    """Whether flags or environment ask for a multi-process run."""
    return any(v is not None for v in (coordinator, num_processes, process_id)) or \
        bool(os.environ.get(ENV_COORDINATOR))


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, local_device_ids=None) -> None:
    """Start ``jax.distributed`` once (before any other JAX call that touches devices).

    Args:
      coordinator: "host:port" of process 0's coordination service (default: the env variable
        ``JAX_COORDINATOR_ADDRESS``, else JAX's cluster auto-detection).
      num_processes: total number of processes (default: ``JAX_NUM_PROCESSES``).
      process_id: this process's index in [0, num_processes) (default: ``JAX_PROCESS_ID``).
      local_device_ids: restrict this process to these local devices (passed through).
    Raises:
      ValueError: a coordinator not HOST:PORT, or without the process count / id; an id out
        of range; no coordinator given and none found in the environment (JAX's cluster
        detection).
    """
    global _initialized
    if _initialized:
        return
    import jax

    coordinator = coordinator or os.environ.get(ENV_COORDINATOR) or None
    num_processes = num_processes if num_processes is not None else _env_int(ENV_NUM_PROCESSES)
    process_id = process_id if process_id is not None else _env_int(ENV_PROCESS_ID)
    if coordinator is not None and not re.fullmatch(r"\S+:\d+", coordinator):
        raise ValueError(f"coordinator {coordinator!r}: expected HOST:PORT (process 0's "
                         "address and a free port, e.g. 10.0.0.1:1234)")
    if coordinator is not None and (num_processes is None or process_id is None):
        raise ValueError(f"a coordinator ({coordinator}) needs the number of processes and this "
                         f"process's id (--num-processes/--process-id or {ENV_NUM_PROCESSES}/"
                         f"{ENV_PROCESS_ID})")
    if num_processes is not None and process_id is not None and \
            not 0 <= process_id < num_processes:
        raise ValueError(f"process id {process_id} is not in [0, {num_processes})")
    # CPU: cross-process collectives need gloo (harmless on GPU/TPU; absent on old versions).
    with contextlib.suppress(AttributeError, KeyError, ValueError):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                                   process_id=process_id, local_device_ids=local_device_ids)
    except ValueError as e:
        if coordinator is not None:
            raise
        raise ValueError(f"no coordinator for a multi-process run: give --coordinator HOST:PORT "
                         f"(or {ENV_COORDINATOR}), or run under a cluster JAX detects "
                         f"(SLURM, Open MPI, ...); JAX said: {e}") from None
    _initialized = True


def shutdown() -> None:
    """Stop ``jax.distributed`` if :func:`initialize` started it."""
    global _initialized
    if _initialized:
        import jax

        jax.distributed.shutdown()
        _initialized = False
