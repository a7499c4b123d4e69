"""Multi-host training: join `jax.distributed`, agree on secrets, and let one process write.

One program runs on every host (SPMD, multi-controller). After `initialize`, `jax.devices()` lists
every process's devices, `common.make_mesh` spans them all, and the trainers' jitted steps run as
one global computation: per-example clipping stays on the device that holds the example, XLA
inserts the cross-host sum where the batch is reduced, and the DP noise, computed under jit from
one key that every process holds, comes out the same everywhere: drawn once, globally.

Launch (one command per host, same config and workdir on a shared filesystem):

  jaxldm train --config configs/ldm_dp.py --workdir /shared/run \
      --coordinator host0:1234 --num-processes 2 --process-id 0   # on host0
  jaxldm train ... --coordinator host0:1234 --num-processes 2 --process-id 1  # on host1

or with the environment: JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID (the last two
read by jaxldm; JAX itself reads only the first), or `--coordinator auto` on a cluster JAX detects
by itself (Cloud TPU pods, SLURM, Open MPI).

CPU: cross-process collectives need an implementation; in JAX 0.10 `jax_cpu_collectives_implementation`
already defaults to "gloo" (TCP, through the coordinator), so localhost CPU runs need nothing more.

Who writes: orbax checkpoints are written by every process together (orbax coordinates them). The
metrics log, the privacy ledger, the DP secrets file, PNGs and JSON records are written by process 0
only (`is_primary`); the others compute the same values and keep them in memory.
"""

from __future__ import annotations

import os

import jax
import numpy as np

from jaxldm.config import ConfigError

AUTO = "auto"


def _env_int(name: str) -> int | None:
  value = os.environ.get(name)
  if value in (None, ""):
    return None
  try:
    return int(value)
  except ValueError:
    raise ConfigError(f"environment variable {name}={value!r} is not an integer") from None


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> bool:
  """Joins the multi-process JAX runtime when asked; returns whether it did.

  Asked means: a coordinator (argument or JAX_COORDINATOR_ADDRESS), or `coordinator="auto"`
  (cluster auto-detection by JAX). One process (num_processes 1, or nothing asked) is a no-op, so
  single-host runs never depend on a coordinator. Must run before any JAX computation.

  Raises:
    ConfigError: incomplete or inconsistent settings (names the flag and the environment variable).
  """
  coordinator = coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS") or None
  num_processes = num_processes if num_processes is not None else _env_int("JAX_NUM_PROCESSES")
  process_id = process_id if process_id is not None else _env_int("JAX_PROCESS_ID")
  if coordinator is None:
    if num_processes not in (None, 1) or process_id not in (None, 0):
      raise ConfigError("--num-processes/--process-id need --coordinator HOST:PORT (or JAX_COORDINATOR_ADDRESS, "
                        "or --coordinator auto on a TPU pod, SLURM or Open MPI cluster)")
    return False
  if jax.distributed.is_initialized():
    return True
  if coordinator == AUTO:
    jax.distributed.initialize(num_processes=num_processes, process_id=process_id)
    return True
  if num_processes == 1:
    return False
  if num_processes is None or process_id is None:
    raise ConfigError(f"--coordinator {coordinator} needs --num-processes N and --process-id I "
                      "(or JAX_NUM_PROCESSES and JAX_PROCESS_ID)")
  if not 0 <= process_id < num_processes:
    raise ConfigError(f"--process-id {process_id} must be in [0, {num_processes}) for --num-processes {num_processes}")
  if ":" not in coordinator:
    raise ConfigError(f"--coordinator {coordinator!r} must look like HOST:PORT")
  jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                             process_id=process_id)
  return True


def is_primary() -> bool:
  """Process 0: the one that writes logs, ledgers, records and pictures."""
  return jax.process_index() == 0


def broadcast_seeds(seeds: dict[str, int]) -> dict[str, int]:
  """Process 0's 63-bit seeds on every process (a no-op for one process).

  Why: the DP noise and sampling seeds come from OS entropy on process 0 (or its secrets file);
  every process must use the same ones, or each would draw its own batches and noise.
  Sent as 32-bit halves: without jax_enable_x64 an int64 would lose its high bits on the way.
  """
  if jax.process_count() == 1:
    return dict(seeds)
  from jax.experimental import multihost_utils

  names = sorted(seeds)
  words = np.array([[seeds[k] >> 32, seeds[k] & 0xFFFFFFFF] for k in names], np.uint32)
  words = np.asarray(multihost_utils.broadcast_one_to_all(words))
  return {k: (int(hi) << 32) | int(lo) for k, (hi, lo) in zip(names, words)}


def broadcast_int(value: int) -> int:
  """Process 0's value of a small non-negative int (< 2^31) on every process."""
  if jax.process_count() == 1:
    return int(value)
  from jax.experimental import multihost_utils

  return int(np.asarray(multihost_utils.broadcast_one_to_all(np.int32(value))))


def barrier(name: str) -> None:
  """Waits until every process reaches the same named point (no-op for one process)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)
