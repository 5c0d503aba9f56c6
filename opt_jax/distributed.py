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
    """
    if local_device_count:
        jax.config.update("jax_num_cpu_devices", local_device_count)
    explicit = coordinator_address is not None
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
    SLURM and TPU pod slices are detected without flags."""
    from absl import flags

    f = flags.FLAGS
    return initialize(f.coordinator_address, f.num_processes, f.process_id)
