"""Pieces every trainer shares: state, optimizer, EMA, data order, checkpoints, metrics, progress.

Reproducibility contract: the batch of step s and every key of step s are pure functions of
(config.seed, s). A run resumed from the checkpoint of step s therefore continues exactly as the
uninterrupted run would have.
"""

from __future__ import annotations

import json
import math
import pathlib
import time
from collections.abc import Iterator
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp

from jaxldm.atomic import atomic_open
from jaxldm.config import ConfigError


class TrainingError(RuntimeError):
  """Training cannot go on (e.g. a non-finite loss); the message names the step."""


@flax.struct.dataclass
class TrainState:
  step: jax.Array          # [] int32: optimizer steps taken.
  params: Any
  opt_state: Any
  ema_params: Any          # Exponential moving average of params (used for sampling).
  extra: Any = None        # Trainer-specific (e.g. discriminator params and optimizer state).


# ---------------------------------------------------------------------------------------------
# optimisation
# ---------------------------------------------------------------------------------------------
def optim_config(lr: float = 1e-4, steps: int = 1000, warmup: int = 0) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.optimizer = "adamw"  # "adamw" or "sgd" (with momentum b1; updates linear in the gradient).
  c.learning_rate = lr  # Peak learning rate.
  c.schedule = "constant"  # "constant" or "cosine" (decay to 0 over train steps, after warmup).
  c.warmup_steps = warmup  # Linear warm-up steps.
  c.b1 = 0.9  # Adam beta1 / SGD momentum.
  c.b2 = 0.999  # Adam beta2.
  c.weight_decay = 0.0  # Decoupled weight decay (AdamW).
  c.grad_clip = 1.0  # Global-norm clipping of the batch gradient (non-private runs only); 0 = off.
  c.ema_decay = 0.999  # EMA of parameters; 0 = EMA equals the parameters.
  return c


def make_optimizer(c: ml_collections.ConfigDict, total_steps: int, *, private: bool = False):
  if c.schedule == "constant":
    lr = optax.constant_schedule(c.learning_rate)
  elif c.schedule == "cosine":
    lr = optax.cosine_decay_schedule(c.learning_rate, max(1, total_steps - c.warmup_steps))
  else:
    raise ConfigError(f"config key 'optim.schedule': unknown schedule {c.schedule!r}; use constant or cosine")
  if c.warmup_steps > 0:
    lr = optax.join_schedules([optax.linear_schedule(0.0, c.learning_rate, c.warmup_steps), lr], [c.warmup_steps])
  chain = []
  # A DP gradient is already clipped per example; clipping the noisy sum again would bias it.
  if c.grad_clip > 0 and not private:
    chain.append(optax.clip_by_global_norm(c.grad_clip))
  if c.optimizer == "adamw":
    chain.append(optax.adamw(lr, b1=c.b1, b2=c.b2, weight_decay=c.weight_decay))
  elif c.optimizer == "sgd":
    if c.weight_decay:
      chain.append(optax.add_decayed_weights(c.weight_decay))
    chain.append(optax.sgd(lr, momentum=c.b1 or None))
  else:
    raise ConfigError(f"config key 'optim.optimizer': unknown optimizer {c.optimizer!r}; use adamw or sgd")
  return optax.chain(*chain)


def ema_update(ema, params, decay: float):
  return jax.tree_util.tree_map(lambda e, p: decay * e + (1.0 - decay) * p, ema, params)


def global_norm(tree) -> jax.Array:
  return optax.global_norm(tree)


# ---------------------------------------------------------------------------------------------
# data order and keys
# ---------------------------------------------------------------------------------------------
def batch_indices(seed: int, step: int, num_examples: int, batch_size: int) -> np.ndarray:
  """Epoch-wise shuffling as a pure function of (seed, step): resumable without saved iterators."""
  per_epoch = max(1, num_examples // batch_size)
  epoch, within = divmod(step, per_epoch)
  order = np.random.default_rng([seed, epoch]).permutation(num_examples)
  if batch_size > num_examples:
    return np.random.default_rng([seed, epoch, 1]).choice(num_examples, batch_size, replace=True)
  return order[within * batch_size:(within + 1) * batch_size]


def step_key(seed: int, step) -> jax.Array:
  return jax.random.fold_in(jax.random.PRNGKey(seed), step)


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


def fetch(tree):
  """Host (numpy) copy of a replicated tree, on any process; e.g. parameters for local sampling."""
  return jax.tree_util.tree_map(np.asarray, jax.device_get(tree))


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
    self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                    meta=ocp.args.JsonSave(meta or {})), force=True)
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

  def restore_untyped(self, step: int | None = None) -> tuple[Any, dict]:
    """The saved state as nested dicts/arrays, without a target structure (for inspection)."""
    step = self.latest_step() if step is None else step
    restored = self.manager.restore(step, args=ocp.args.Composite(state=_untyped_restore(),
                                                                  meta=ocp.args.JsonRestore()))
    return restored.state, dict(restored.meta or {})

  def close(self) -> None:
    self.manager.close()


def _untyped_restore() -> ocp.args.StandardRestore:
  """Restore without a target; arrays land on this process's first device.

  Why the fallback: a checkpoint written by a multi-host run records shardings over devices that
  do not exist here, and orbax refuses to restore it untyped without one.
  """
  return ocp.args.StandardRestore(fallback_sharding=jax.sharding.SingleDeviceSharding(jax.local_devices()[0]))


def restore_params(directory: str | pathlib.Path, target_params, *, use_ema: bool = True) -> tuple[Any, dict]:
  """Loads the (EMA) parameters and metadata of the latest checkpoint of another run."""
  directory = pathlib.Path(directory).absolute()
  manager = ocp.CheckpointManager(directory)
  step = manager.latest_step()
  if step is None:
    raise FileNotFoundError(f"no checkpoint in {directory}; train that stage first")
  restored = manager.restore(step, args=ocp.args.Composite(state=_untyped_restore(), meta=ocp.args.JsonRestore()))
  state = restored.state
  params = state["ema_params"] if use_ema else state["params"]
  # Re-shape into the target pytree structure (restored without a target comes back as dicts).
  params = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(target_params),
                                        jax.tree_util.tree_leaves(params))
  # Uncommitted copies: a checkpoint keeps the devices it was saved from (e.g. replicated over 4),
  # and jit refuses to mix those with arrays on other devices (e.g. an LDM trained on 1 device).
  params = jax.tree_util.tree_map(
      lambda x: jnp.asarray(np.asarray(x)) if getattr(x, "is_fully_addressable", True) else x, params)
  manager.close()
  return params, dict(restored.meta or {})


# ---------------------------------------------------------------------------------------------
# workdir, metrics and progress
# ---------------------------------------------------------------------------------------------
def prepare_workdir(workdir: str | pathlib.Path):
  """Creates WORKDIR and WORKDIR/samples; returns (path, console).

  The config is not recorded here: `loop.restore` writes config.json once every resume check has
  passed, so a refused resume leaves the run's recorded config as it was.
  """
  from rich.console import Console

  workdir = pathlib.Path(workdir)
  if workdir.exists() and not workdir.is_dir():
    raise ConfigError(f"--workdir {workdir}: is a file, not a directory; choose a directory")
  (workdir / "samples").mkdir(parents=True, exist_ok=True)
  return workdir, Console()


def write_json(path: str | pathlib.Path, record: dict) -> None:
  """Atomic: a reader never sees half a file."""
  with atomic_open(path) as f:
    f.write(json.dumps(record, indent=2) + "\n")


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


def check_finite(step: int, metrics: dict[str, Any], names=("loss", "grad_norm")) -> None:
  for name in names:
    if name in metrics and not math.isfinite(float(np.asarray(metrics[name]))):
      raise TrainingError(f"{name} became {float(np.asarray(metrics[name]))} at step {step}; stopping. "
                          f"The last good checkpoint is kept; lower the learning rate or check the data.")


def progress_bar(total: int, initial: int, description: str):
  """A rich progress bar with step rate and ETA (transient off: the final line stays)."""
  from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                             TimeRemainingColumn)
  progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TextColumn("eta"),
                      TimeRemainingColumn(), TextColumn("{task.fields[info]}"))
  task = progress.add_task(description, total=total, completed=initial, rate="", info="")
  return progress, task


def parameter_overview(params) -> str:
  from clu import parameter_overview as po
  return po.get_parameter_overview(params)


def count_params(params) -> int:
  return int(sum(np.prod(p.shape) for p in jax.tree_util.tree_leaves(params)))


# ---------------------------------------------------------------------------------------------
# pictures
# ---------------------------------------------------------------------------------------------
def save_mid_slices(volumes: np.ndarray, path: str | pathlib.Path, *, titles: list[str] | None = None,
                    columns: int = 8) -> None:
  """A PNG grid of the middle slice of each (D, H, W) volume."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  volumes = np.asarray(volumes)
  n = len(volumes)
  cols = min(columns, n)
  rows = math.ceil(n / cols)
  fig, axes = plt.subplots(rows, cols, figsize=(1.6 * cols, 1.6 * rows), squeeze=False)
  for ax in axes.ravel():
    ax.axis("off")
  for i, vol in enumerate(volumes):
    ax = axes.ravel()[i]
    ax.imshow(vol[vol.shape[0] // 2], cmap="gray", vmin=-1, vmax=1)
    if titles:
      ax.set_title(titles[i], fontsize=6)
  fig.tight_layout()
  try:
    with atomic_open(path, "wb") as f:
      fig.savefig(f, format="png", dpi=100)
  finally:
    plt.close(fig)


def iterate_batches(arrays, batch_size: int) -> Iterator[tuple[int, Any]]:
  """Fixed-size chunks in order (the last one padded by repetition); yields (valid_count, chunk)."""
  n = len(jax.tree_util.tree_leaves(arrays)[0])
  for start in range(0, n, batch_size):
    idx = np.arange(start, start + batch_size)
    valid = int(min(batch_size, n - start))
    idx = np.minimum(idx, n - 1)
    yield valid, jax.tree_util.tree_map(lambda a: a[idx], arrays)


def device_put_batch(batch):
  return jax.tree_util.tree_map(jnp.asarray, batch)
