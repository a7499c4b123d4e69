"""What every fit shares, for the trainers (`jaxldm.train`) and the small models the evaluation fits
(`jaxldm.eval.utility`, `jaxldm.eval.regressor_fit`): train state, optimizer, EMA, data order and
keys, the finiteness check, the progress bar.

Reproducibility contract: the batch of step s and every key of step s are pure functions of
(seed, s), so a fit resumed at step s continues exactly as the uninterrupted one would have.
"""

from __future__ import annotations

import functools
import json
import math
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)

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


def new_state(params, tx, *, trainable=None, extra=None) -> TrainState:
  """Step 0: `params`, the optimizer's state for `trainable` (default: all of `params`), an EMA copy.

  The optimizer's state and the EMA copy come from compiled programs (`init_optimizer`, `_copy_tree`):
  op by op, every zeros / copy of a new leaf shape compiled a program of its own (~270 in the tests'
  runs; the tiny LDM's first state took 1.9-2.2 s in a fresh process without a compilation cache,
  0.6-0.8 s now: benchmarks/NOTES.md, session 19).
  """
  return TrainState(step=jnp.array(0, jnp.int32), params=params,
                    opt_state=init_optimizer(tx, params if trainable is None else trainable),
                    ema_params=_copy_tree(params), extra=extra)


@jax.jit
def _copy_tree(tree):
  """A copy of every leaf in new buffers (the EMA must not share the parameters' buffers: a step
  donates both)."""
  return jax.tree_util.tree_map(jnp.copy, tree)


def init_optimizer(tx, params):
  """`tx.init(params)` as one compiled program (per optimizer and parameter shapes)."""
  return _jitted_init(tx)(params)


@functools.lru_cache(maxsize=32)
def _jitted_init(tx):
  return jax.jit(tx.init)


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
  """The optimizer of the optim group `c` (see `optim_config`). Runs with the same settings get the same
  (stateless) optimizer object, so what is compiled for it (`init_optimizer`) is reused."""
  key = (json.dumps(optimizer_key(c, total_steps), sort_keys=True, default=str), bool(private))
  if key not in _OPTIMIZERS:
    _OPTIMIZERS[key] = _build_optimizer(c, total_steps, private)
  return _OPTIMIZERS[key]


_OPTIMIZERS: dict = {}


def _build_optimizer(c: ml_collections.ConfigDict, total_steps: int, private: bool):
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


def optimizer_key(c: ml_collections.ConfigDict, total_steps: int) -> dict:
  """What `make_optimizer(c, total_steps)` builds depends on: the optim group, and the run's length
  only where the schedule decays over it (a `common.cached_jit` key)."""
  return {**c.to_dict(), "total_steps": total_steps if c.schedule == "cosine" else None}


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
# finiteness and progress
# ---------------------------------------------------------------------------------------------
def check_finite(step: int, metrics: dict[str, Any], names=("loss", "grad_norm")) -> None:
  for name in names:
    if name in metrics and not math.isfinite(float(np.asarray(metrics[name]))):
      raise TrainingError(f"{name} became {float(np.asarray(metrics[name]))} at step {step}; stopping. "
                          f"The last good checkpoint is kept; lower the learning rate or check the data.")


def progress_bar(total: int, initial: int, description: str):
  """A rich progress bar with step rate and ETA (transient off: the final line stays)."""
  progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TextColumn("eta"),
                      TimeRemainingColumn(), TextColumn("{task.fields[info]}"))
  task = progress.add_task(description, total=total, completed=initial, rate="", info="")
  return progress, task


class maybe_progress:
  """`with progress_bar` only when progress is on (rich would otherwise still draw)."""

  def __init__(self, bar, enabled: bool):
    self.bar, self.enabled = bar, enabled

  def __enter__(self):
    return self.bar.__enter__() if self.enabled else None

  def __exit__(self, *exc):
    return self.bar.__exit__(*exc) if self.enabled else False
