"""Reading what a run wrote, on any process and for any consumer (sampling, evaluation, training).

Parameters come back as host-committed arrays in the caller's pytree structure, so one checkpoint
serves a trainer resuming on a mesh and a sampler on one device alike; `write_json` is atomic, so a
reader (a later stage, `jaxldm evaluate`) never sees half a record.
"""

from __future__ import annotations

import json
import pathlib
import re
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from jaxldm.atomic import atomic_open
from jaxldm.config import ConfigError


# Checkpoint metadata key: {parameter name: shape} of the saved `params` (= `ema_params`) tree.
PARAMETER_SHAPES = "parameter_shapes"


def fetch(tree):
  """Host (numpy) copy of a replicated tree, on any process; e.g. parameters for local sampling."""
  return jax.tree_util.tree_map(np.asarray, jax.device_get(tree))


def untyped_restore() -> ocp.args.StandardRestore:
  """Restore without a target; arrays land on this process's first device.

  Why the fallback: a checkpoint written by a multi-host run records shardings over devices that
  do not exist here, and orbax refuses to restore it untyped without one.
  """
  return ocp.args.StandardRestore(fallback_sharding=jax.sharding.SingleDeviceSharding(jax.local_devices()[0]))


def restore_params(directory: str | pathlib.Path, target_params, *, use_ema: bool = True) -> tuple[Any, dict]:
  """Loads the (EMA) parameters and metadata of the latest checkpoint of another run.

  Reads only the one parameter tree when the checkpoint's metadata lists its parameter names and
  shapes (`PARAMETER_SHAPES`, written by every trainer's checkpoint) and they are the target's: not
  the other copy nor the optimizer state (a 2-4x smaller read; 5x faster for the tiny autoencoder's
  checkpoint). Otherwise the whole state is read and compared name by name (`check_same_parameters`).
  """
  directory = pathlib.Path(directory).absolute()
  key = "ema_params" if use_ema else "params"
  manager = ocp.CheckpointManager(directory)
  try:
    step = manager.latest_step()
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {directory}; train that stage first")
    meta = read_meta(manager, step)
    state = None
    if meta.get(PARAMETER_SHAPES) == parameter_shapes(target_params):
      state = read_tree(directory, step, key, meta)
    if state is None:  # No or other names and shapes: the full read, compared name by name below.
      state = read_state(manager, step)
  finally:
    manager.close()
  params = state[key]
  check_same_parameters(params, target_params, directory)
  # Re-shape into the target pytree structure (restored without a target comes back as dicts).
  params = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(target_params),
                                        jax.tree_util.tree_leaves(params))
  # Uncommitted copies: a checkpoint keeps the devices it was saved from (e.g. replicated over 4),
  # and jit refuses to mix those with arrays on other devices (e.g. an LDM trained on 1 device).
  # `device_put` is a transfer; `jnp.asarray` compiled a program per new leaf shape (~0.5 s of
  # loading the tiny LDM in a fresh process).
  params = jax.tree_util.tree_map(
      lambda x: jax.device_put(np.asarray(x)) if getattr(x, "is_fully_addressable", True) else x, params)
  return params, meta


def read_meta(manager: ocp.CheckpointManager, step: int) -> dict:
  """The JSON metadata saved with checkpoint `step` (a trainer's `Checkpointer.save`), without its arrays."""
  return dict(manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta or {})


def read_state(manager: ocp.CheckpointManager, step: int) -> Any:
  """The whole saved state of checkpoint `step`, untyped (`untyped_restore`), without the metadata."""
  return manager.restore(step, args=ocp.args.Composite(state=untyped_restore())).state


def read_tree(directory: str | pathlib.Path, step: int, key: str, meta: dict) -> dict | None:
  """{key: tree} with only the saved state's `key` tree ("params" or "ema_params", both of the
  metadata's `PARAMETER_SHAPES` names) read from checkpoint `step` in `directory`, as nested dicts of
  numpy arrays; None where the metadata has no such names (a checkpoint from before them) or the
  arrays disagree with it.

  One tree of the state, not the other copy nor the optimizer state: a 2-4x smaller read. Its own
  CheckpointManager: orbax binds a manager's item to the first kind of restore it serves, and the
  caller's full read (`untyped_restore`) after a failed partial one would be refused.
  """
  names = meta.get(PARAMETER_SHAPES)
  if not names:
    return None
  item: dict = {}
  placeholders = set()
  for name in names:
    parts = re.findall(r"\['([^']*)'\]", name)
    if not parts or "".join(f"['{p}']" for p in parts) != name:  # Not a tree of string-keyed dicts.
      return None
    node = item
    for part in parts[:-1]:
      node = node.setdefault(part, {})
    # A placeholder leaf (restore_args say what comes back). orbax leaves it in place where the
    # checkpoint has no such array, so each is its own object and recognised below.
    node[parts[-1]] = np.zeros((), np.float32)
    placeholders.add(id(node[parts[-1]]))
  item = {key: item}
  how = jax.tree_util.tree_map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
  manager = ocp.CheckpointManager(pathlib.Path(directory).absolute())
  try:
    state = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        item=item, restore_args=how, partial_restore=True))).state
  except (ValueError, KeyError):  # Metadata and arrays disagree: the caller's full read says how.
    return None
  finally:
    manager.close()
  if any(id(x) in placeholders for x in jax.tree_util.tree_leaves(state)):
    return None  # A name the metadata lists has no array under `key`: read the whole state.
  return state


def parameter_shapes(params) -> dict[str, list[int]]:
  """{name: shape} as JSON keeps it (lists), for `PARAMETER_SHAPES`."""
  return {k: list(v) for k, v in _shapes(params).items()}


def _shapes(tree) -> dict[str, tuple[int, ...]]:
  return {jax.tree_util.keystr(path): tuple(getattr(x, "shape", np.shape(x)))
          for path, x in jax.tree_util.tree_leaves_with_path(tree)}


def check_same_parameters(restored, target, directory) -> None:
  """Raises ConfigError unless `restored` has exactly `target`'s parameter names and shapes.

  Leaves are matched by name, not by position: a model configured differently from the run that
  wrote the checkpoint (another width, an attribute embedding more or less) is named, never loaded
  into the wrong layers.
  """
  got, want = _shapes(restored), _shapes(target)
  if got == want:
    return
  missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
  shapes = [f"{k} {got[k]} vs {want[k]}" for k in sorted(set(got) & set(want)) if got[k] != want[k]]
  parts = [f"{label} {len(items)} (e.g. {', '.join(items[:3])})"
           for label, items in (("missing", missing), ("unexpected", extra), ("shape differs for", shapes)) if items]
  raise ConfigError(f"the checkpoint in {directory} does not fit the configured model: {'; '.join(parts)}. "
                    "Its run's model config (config.json 'model') must match this one's: e.g. "
                    "model.attribute_embedding, base_channels, channel_mult")


def stage_record(workdir: str | pathlib.Path, filename: str, preset: str, *, key: str | None = None) -> dict:
  """The JSON record a finished stage wrote into its workdir (autoencoder.json, regressor.json, ...).

  A missing record names the command that makes it; with `key` (the config key that pointed at the
  workdir) it is a ConfigError naming that key, else a FileNotFoundError (a CLI path argument).
  """
  path = pathlib.Path(workdir) / filename
  if not path.is_file():
    hint = f"{path} does not exist; train that stage first (jaxldm train --config {preset} --workdir {workdir})"
    if key:
      raise ConfigError(f"config key '{key}': {hint}")
    raise FileNotFoundError(hint)
  return json.loads(path.read_text())


def write_json(path: str | pathlib.Path, record: dict) -> None:
  """Atomic: a reader never sees half a file."""
  with atomic_open(path) as f:
    f.write(json.dumps(record, indent=2) + "\n")


def iterate_batches(arrays, batch_size: int) -> Iterator[tuple[int, Any]]:
  """Fixed-size chunks in order (the last one padded by repetition); yields (valid_count, chunk)."""
  n = len(jax.tree_util.tree_leaves(arrays)[0])
  for start in range(0, n, batch_size):
    idx = np.arange(start, start + batch_size)
    valid = int(min(batch_size, n - start))
    idx = np.minimum(idx, n - 1)
    yield valid, jax.tree_util.tree_map(lambda a: a[idx], arrays)
