"""Pieces every trainer shares: the device mesh and sharding, resumable checkpoints, the workdir,
metric logs and progress text.

The train state, optimizer, EMA, data order and keys live in `jaxldm.fitting` (the evaluation fits
small models with them too); reading another run's parameters is `jaxldm.infer.checkpoints`.
"""

from __future__ import annotations

import json
import pathlib
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from rich.console import Console

from jaxldm.atomic import atomic_open
from jaxldm.config import ConfigError
from jaxldm.fitting import TrainState
from jaxldm.infer import checkpoints


# ---------------------------------------------------------------------------------------------
# jitted steps shared by the runs of one process (ablations, seed sweeps, tests)
# ---------------------------------------------------------------------------------------------
_JITTED: dict[str, Callable] = {}


def cached_jit(key: dict, build: Callable[[], Callable], **jit_kwargs) -> Callable:
  """`jax.jit(build(), **jit_kwargs)`, built once per `key` in this process.

  `key` must hold everything the function closes over (model, loss, optimizer, structural DP
  settings); what a run passes as arguments (state, batch, keys, the DP mechanism's sigma, expected
  batch size and C) stays out of it, so runs that differ only there reuse one traced and compiled
  program. A key that leaves something out would reuse a wrong program: list too much, not too little.
  """
  return cached(key, lambda: jax.jit(build(), **jit_kwargs))


def cached(key: dict, build: Callable[[], Callable]) -> Callable:
  """`build()`, an already compiled step (e.g. `jaxldm.train.dp.private_step`), once per `key`
  (the same rules as `cached_jit`)."""
  from jaxldm.models import conv  # The convolution route is read when the model is traced.

  text = json.dumps({**key, "conv_route": conv.resolved_weight_grad()}, sort_keys=True, default=str)
  if text not in _JITTED:
    _JITTED[text] = build()
  return _JITTED[text]


# ---------------------------------------------------------------------------------------------
# devices: data parallelism (batch sharded over a `data` mesh axis, state replicated)
# ---------------------------------------------------------------------------------------------
def make_mesh(num_devices: int = 0) -> jax.sharding.Mesh:
  """A 1-D `data` mesh over the first `num_devices` devices (0 = all, across hosts too).

  The same code path serves 1 device, several, and several processes (after
  `distributed.initialize`, `jax.devices()` lists every process's devices). Under jit, XLA's SPMD
  partitioner splits the per-example work along the batch and inserts the cross-device (and
  cross-host) sum where the batch is reduced (the gradient sum), so per-example clipping stays local
  and noise, drawn from one key after the sum, is the same on every device: drawn once, globally.
  """
  devices = jax.devices()
  if num_devices < 0 or num_devices > len(devices):
    raise ConfigError(f"config key 'train.num_devices': {num_devices} requested, {len(devices)} available")
  if jax.process_count() > 1 and num_devices not in (0, len(devices)):
    # A subset could leave a process without devices in the mesh; it would then hold no shard.
    raise ConfigError(f"config key 'train.num_devices': {num_devices} with {jax.process_count()} processes; "
                      f"multi-host runs use every device (set 0)")
  devices = devices[:num_devices] if num_devices else devices
  return jax.sharding.Mesh(np.array(devices), ("data",))


def replicate(tree, mesh: jax.sharding.Mesh):
  """The same value on every device of the mesh (every process must pass the same values)."""
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  return jax.device_put(tree, sharding)


def shard_batch(tree, mesh: jax.sharding.Mesh):
  """A global array whose leading (batch) axis is split over `data`; it must divide evenly.

  `tree` is the host-side GLOBAL batch, the same on every process (batch indices are pure functions
  of seed and step, so every process computes the same ones). Each process copies only the rows of
  its own devices (`make_array_from_callback` asks for addressable shards only); with one process
  this is an ordinary sharded `device_put`.
  """
  n = mesh.devices.size
  sizes = {x.shape[0] for x in jax.tree_util.tree_leaves(tree)}
  if any(size % n for size in sizes):
    raise ConfigError(f"batch of {sorted(sizes)} examples does not split over {n} devices; make the batch "
                      f"size (or dp.microbatch_size) a multiple of {n}, or set train.num_devices")
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))

  def put(x):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

  return jax.tree_util.tree_map(put, tree)


# ---------------------------------------------------------------------------------------------
# checkpoints
# ---------------------------------------------------------------------------------------------
class Checkpointer:
  """Orbax CheckpointManager: periodic, keep-N, resume from the latest, JSON metadata alongside."""

  def __init__(self, directory: str | pathlib.Path, *, max_to_keep: int = 3):
    self.directory = pathlib.Path(directory).absolute()
    self.manager = ocp.CheckpointManager(
        self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: TrainState, meta: dict | None = None) -> None:
    if jax.process_count() == 1:
      # Host copies: orbax saves them ~4x faster than arrays replicated over several local devices
      # (the tiny autoencoder's 395 leaves over 4 CPU devices: 0.3 s vs 1.2 s per checkpoint), and
      # `restore` puts them back into the target's sharding. Several processes save jax arrays
      # together, each its own shards.
      state = jax.device_get(state)
    # The parameter names and shapes let a reader of the parameters alone skip the rest of the state.
    meta = {**(meta or {}), checkpoints.PARAMETER_SHAPES: checkpoints.parameter_shapes(state.params)}
    self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                    meta=ocp.args.JsonSave(meta)), force=True)
    self.manager.wait_until_finished()

  def restore(self, target: TrainState, step: int | None = None) -> tuple[TrainState, dict]:
    step = self.latest_step() if step is None else step
    abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, target)
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                                    meta=ocp.args.JsonRestore()))
    except ValueError as e:
      raise ConfigError(f"the checkpoint at step {step} in {self.directory} does not match this config "
                        f"(model or optimizer changed?); use a new --workdir. Detail: {str(e)[:200]}") from e
    return restored.state, dict(restored.meta or {})

  def restore_latest(self, target: TrainState) -> TrainState:
    """`target` restored from the latest checkpoint, or `target` itself when there is none."""
    return target if self.latest_step() is None else self.restore(target)[0]

  def restore_tree(self, key: str, step: int | None = None) -> tuple[Any, dict]:
    """One parameter tree of the saved state ("params" or "ema_params") as nested dicts of numpy arrays,
    and the metadata. Reads only that tree where the checkpoint lists its parameter names
    (`checkpoints.read_tree`: every trainer's checkpoints do), else the whole state."""
    if key not in ("params", "ema_params"):
      raise ValueError(f"restore_tree reads 'params' or 'ema_params', not {key!r}")
    step = self.latest_step() if step is None else step
    meta = checkpoints.read_meta(self.manager, step)
    state = checkpoints.read_tree(self.directory, step, key, meta)
    if state is None:  # The whole state; the metadata is already read.
      state = checkpoints.read_state(self.manager, step)
    return jax.tree_util.tree_map(np.asarray, state[key]), meta

  def restore_untyped(self, step: int | None = None) -> tuple[Any, dict]:
    """The saved state as nested dicts/arrays, without a target structure (for inspection)."""
    step = self.latest_step() if step is None else step
    restored = self.manager.restore(step, args=ocp.args.Composite(state=checkpoints.untyped_restore(),
                                                                  meta=ocp.args.JsonRestore()))
    return restored.state, dict(restored.meta or {})

  def close(self) -> None:
    self.manager.close()


# ---------------------------------------------------------------------------------------------
# workdir, metrics and progress
# ---------------------------------------------------------------------------------------------
def prepare_workdir(workdir: str | pathlib.Path):
  """Creates WORKDIR and WORKDIR/samples; returns (path, console).

  The config is not recorded here: `loop.restore` writes config.json once every resume check has
  passed, so a refused resume leaves the run's recorded config as it was.
  """
  workdir = pathlib.Path(workdir)
  if workdir.exists() and not workdir.is_dir():
    raise ConfigError(f"--workdir {workdir}: is a file, not a directory; choose a directory")
  (workdir / "samples").mkdir(parents=True, exist_ok=True)
  return workdir, Console()


def progress_info(metrics: dict[str, Any]) -> str:
  """The progress bar's text: the (DP: noisy) loss if logged, the accuracy if any, and epsilon."""
  parts = [f"loss {float(metrics['loss']):.4f}"] if "loss" in metrics else []
  if "accuracy" in metrics:
    parts.append(f"acc {float(metrics['accuracy']):.2f}")
  if "epsilon" in metrics:
    parts.append(f"eps {float(metrics['epsilon']):.2f}")
  return " ".join(parts)


class MetricAverager:
  """Averages step metrics between log points with `clu.metrics` (on device: no per-step sync)."""

  def __init__(self):
    self._collection = None
    self._acc = None

  def add(self, step_metrics: dict[str, Any]) -> None:
    from clu import metrics as clu_metrics
    if self._collection is None:
      self._collection = clu_metrics.Collection.create(
          **{name: clu_metrics.Average.from_output(name) for name in step_metrics})
    update = self._collection.single_from_model_output(**step_metrics)
    self._acc = update if self._acc is None else self._acc.merge(update)

  def pop(self) -> dict[str, Any]:
    """The averages since the last pop (host values), and a reset."""
    out = {k: np.asarray(v) for k, v in jax.device_get(self._acc.compute()).items()}
    self._acc = None
    return out


class RateMeter:
  """Steps per second between successive log points, for the progress bar."""

  def __init__(self, start_step: int):
    self.step, self.time = start_step, None

  def __call__(self, step: int) -> str:
    now = time.perf_counter()
    rate = f"{(step - self.step) / (now - self.time):.2f} it/s" if self.time else ""
    self.step, self.time = step, now
    return rate


class MetricsLog:
  """metrics.jsonl in the workdir. On resume, lines past the restored step are dropped."""

  def __init__(self, workdir: pathlib.Path, resume_step: int = 0):
    self.path = pathlib.Path(workdir) / "metrics.jsonl"
    if self.path.exists():
      kept = [line for line in self.path.read_text().splitlines()
              if line.strip() and json.loads(line).get("step", 0) <= resume_step]
      with atomic_open(self.path) as f:
        f.write("".join(line + "\n" for line in kept))

  def write(self, step: int, metrics: dict[str, Any]) -> None:
    record = {"step": int(step), "time": round(time.time(), 3)}
    record.update({k: _scalar(v) for k, v in metrics.items()})
    with open(self.path, "a") as f:
      f.write(json.dumps(record) + "\n")


def _scalar(v):
  v = np.asarray(v)
  return v.item() if v.size == 1 else v.tolist()


def parameter_overview(params) -> str:
  from clu import parameter_overview as po
  return po.get_parameter_overview(params)


def count_params(params) -> int:
  return int(sum(np.prod(p.shape) for p in jax.tree_util.tree_leaves(params)))
