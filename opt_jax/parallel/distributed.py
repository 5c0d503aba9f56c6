"""Multi-host start-up through JAX's own runtime (`jax.distributed`): no process management of
our own. Call `initialize()` first thing in an entry point, before any other JAX use."""

from __future__ import annotations

import os

import jax


def _multi_host_environment() -> bool:
    """True where JAX can discover a multi-process job by itself (SLURM, TPU pod slices,
    Open MPI)."""
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        return True
    if "," in os.environ.get("TPU_WORKER_HOSTNAMES", ""):
        return True
    return int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1


_EXPLICIT = ("coordinator_address", "num_processes", "process_id")


def check_explicit(coordinator_address, num_processes, process_id) -> bool:
    """Whether an explicit multi-process setup is given; all three values or none.

    Raises:
      ValueError: naming the missing values when only some are given, or a bad value.
    """
    values = dict(zip(_EXPLICIT, (coordinator_address, num_processes, process_id), strict=True))
    missing = [name for name, value in values.items() if value is None]
    if len(missing) == len(values):
        return False
    if missing:
        given = [name for name in values if name not in missing]
        raise ValueError(
            f"--coordinator_address, --num_processes and --process_id go together: got "
            f"{', '.join('--' + n for n in given)} but not {', '.join('--' + n for n in missing)}"
        )
    if not coordinator_address:
        raise ValueError("--coordinator_address must be host:port, got an empty string")
    if num_processes < 1:
        raise ValueError(f"--num_processes must be >= 1, got {num_processes}")
    if not 0 <= process_id < num_processes:
        raise ValueError(
            f"--process_id must be in [0, {num_processes}) for --num_processes={num_processes}, "
            f"got {process_id}"
        )
    return True


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    local_device_count: int | None = None,
) -> bool:
    """Joins a multi-process JAX job when there is one; a no-op for a single process.

    Args:
      coordinator_address: "host:port" of process 0 (GPU clusters without SLURM); with
        num_processes and process_id, or all three left None for auto-detection.
      local_device_count: CPU only: emulated devices per process (tests, laptops).

    Returns:
      Whether jax.distributed was initialized.

    Raises:
      ValueError: when only some of coordinator_address, num_processes and process_id are
        given, or they are out of range.
    """
    explicit = check_explicit(coordinator_address, num_processes, process_id)
    if local_device_count:
        jax.config.update("jax_num_cpu_devices", local_device_count)
    if not explicit and not _multi_host_environment():
        return False
    # CPU processes exchange collectives through gloo (no effect on GPU / TPU backends). Not
    # querying the backend here: that would start it before jax.distributed may.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if explicit:
        jax.distributed.initialize(coordinator_address, num_processes, process_id)
    else:
        jax.distributed.initialize()  # SLURM / TPU / MPI: the cluster tells JAX who is who
    return True


def define_flags() -> None:
    """absl flags for entry points that may run on several hosts (see initialize_from_flags)."""
    from absl import flags

    flags.DEFINE_string("coordinator_address", None, "Multi-host: host:port of process 0.")
    flags.DEFINE_integer("num_processes", None, "Multi-host: number of processes.")
    flags.DEFINE_integer("process_id", None, "Multi-host: this process's index.")


def initialize_from_flags() -> bool:
    """`initialize` with the values of define_flags' flags. Call before any other JAX use:
    SLURM and TPU pod slices are detected without flags.

    Raises:
      absl.app.UsageError: when only some of the three flags are given (app.run prints it
        without a traceback).
    """
    from absl import app, flags

    f = flags.FLAGS
    try:
        check_explicit(f.coordinator_address, f.num_processes, f.process_id)
    except ValueError as e:
        raise app.UsageError(str(e)) from e
    return initialize(f.coordinator_address, f.num_processes, f.process_id)
