"""Fitting the attribute regressor/classifier: its per-example loss, a plain and a DP-SGD step, and a
`Fitter` that trains on in-memory arrays.

The utility studies (`jaxldm.eval.utility`) fit it many times (seeds, synthetic vs real data) with
one compilation; the trainer (`jaxldm.train.regressor`) runs the same loss and plain step over a
dataset in the one training loop. The per-example loss takes ONE example (no batch axis), so
`jaxldm.privacy.noise.private_grad` can clip it. The DP-SGD fit draws its sampling and noise seeds
from OS entropy unless a noise seed is fixed for a test (flagged); see docs/privacy.md.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxldm import fitting
from jaxldm.infer.regressor import init_params
from jaxldm.models import conv
from jaxldm.models.regressor import AttributeRegressor, TargetSpec
from jaxldm.privacy import clipping, noise
from jaxldm.privacy import ledger as ledger_lib
from jaxldm.privacy.checks import check_arg
from jaxldm.privacy.sampling import PoissonBatcher


# ---------------------------------------------------------------------------------------------
# Per-example loss (ONE example, no batch axis): shared by the plain and the DP-SGD step.
# ---------------------------------------------------------------------------------------------
def example_loss(model: AttributeRegressor, spec: TargetSpec, params, example, rng, *,
                 classification_weight: float = 1.0):
  """1. masked MSE of the standardised continuous attributes, 2. masked cross-entropy per class head.

  Each term is averaged over the attributes PRESENT for this example, so a subject with half its
  attributes missing is not down-weighted in the terms it has. `rng` is unused (no dropout) but
  kept for the DP engine's loss_fn(params, example, rng) signature.
  """
  del rng
  out = model.apply(params, example["volume"][None, ..., None])[0]
  cont, logits = spec.split(out)
  mse = jnp.zeros(())
  if spec.continuous:
    m = example["cont_mask"]
    mse = (jnp.square(cont - example["cont"]) * m).sum() / jnp.maximum(m.sum(), 1.0)
  ce = jnp.zeros(())
  if logits:
    terms = jnp.stack([-jax.nn.log_softmax(lg)[example["label"][j]] for j, lg in enumerate(logits)])
    m = example["label_mask"]
    ce = (terms * m).sum() / jnp.maximum(m.sum(), 1.0)
  return mse + classification_weight * ce, {"mse": mse, "ce": ce}


def _apply_updates(state: fitting.TrainState, grads, tx, ema_decay: float) -> fitting.TrainState:
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = jax.tree_util.tree_map(lambda p, u: p + u, state.params, updates)
  ema = fitting.ema_update(state.ema_params, params, ema_decay)
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema)


def make_train_step(model, spec: TargetSpec, tx, *, ema_decay: float, classification_weight: float):
  """Non-private step on a batch dict with leading axis B (volume, cont, cont_mask, label, label_mask)."""
  loss_fn = functools.partial(example_loss, model, spec, classification_weight=classification_weight)

  def train_step(state: fitting.TrainState, batch, rng):
    # RNG: example i of this step uses fold_in(rng, i) (unused by the loss today; kept for symmetry).
    keys = jax.vmap(lambda i: jax.random.fold_in(rng, i))(jnp.arange(batch["volume"].shape[0]))

    def batch_loss(params):
      losses, aux = jax.vmap(lambda ex, k: loss_fn(params, ex, k))(batch, keys)
      return losses.mean(), aux

    # Non-private: each convolution runs on the whole batch (one batched kernel gradient).
    (loss, aux), grads = jax.value_and_grad(conv.merging_examples(batch_loss), has_aux=True)(state.params)
    metrics = {"loss": loss, "grad_norm": fitting.global_norm(grads), "mse": aux["mse"].mean(),
               "ce": aux["ce"].mean()}
    return _apply_updates(state, grads, tx, ema_decay), metrics

  return train_step


def make_private_step(model, spec: TargetSpec, tx, *, microbatch_size: int, classification_weight: float = 1.0):
  """DP-SGD step: per-example clipped sum + Gaussian noise once / expected batch size (private_grad).

  `batch` is a Poisson batch padded to a static size with `mask` (1 = sampled); `num_microbatches`
  (traced) is the count of microbatches holding sampled examples, so one compilation serves every
  batch size. The mechanism's numbers (sigma, C, expected batch size) are traced arguments too: one
  compilation serves every privacy setting.
  """
  loss_fn = functools.partial(example_loss, model, spec, classification_weight=classification_weight)

  def private_step(state: fitting.TrainState, batch, mask, num_microbatches, rng, noise_multiplier,
                   l2_clip_norm, expected_batch_size):
    grads, aux = noise.private_grad(loss_fn, state.params, batch, rng, l2_clip_norm=l2_clip_norm,
                                    noise_multiplier=noise_multiplier,
                                    expected_batch_size=expected_batch_size, mask=mask,
                                    microbatch_size=microbatch_size, num_microbatches=num_microbatches,
                                    has_aux=True)
    return _apply_updates(state, grads, tx, 0.0), {"grad_norm": fitting.global_norm(grads)}

  return private_step


# The jitted steps, shared by every Fitter of the same model, targets and optimizer settings in a process
# (an evaluation fits the same regressor for several seeds and datasets, `dp_pretraining_utility` builds
# new Fitters per call): each is traced once, not once per Fitter. The convolution route is part of the
# key: it is read when the step is traced.
def jitted_train_step(model, spec: TargetSpec, tx, *, ema_decay: float, classification_weight: float):
  """`make_train_step`, jitted (state donated) once per model, targets, optimizer and settings in this
  process (the regressor trainer and every Fitter)."""
  return _jitted_step(model, spec, tx, float(ema_decay), float(classification_weight))


@conv.cached_per_route(maxsize=16)
def _jitted_step(model, spec, tx, ema_decay: float, classification_weight: float):
  return jax.jit(make_train_step(model, spec, tx, ema_decay=ema_decay, classification_weight=classification_weight),
                 donate_argnums=0)


@conv.cached_per_route(maxsize=16)
def _jitted_private_step(model, spec, tx, microbatch_size: int, classification_weight: float):
  return jax.jit(make_private_step(model, spec, tx, microbatch_size=microbatch_size,
                                   classification_weight=classification_weight), donate_argnums=0)


@dataclasses.dataclass
class Fitter:
  """Trains one architecture on in-memory arrays, many times (seeds, datasets) with one compilation.

  `fit` runs `steps` non-private steps, deterministic for a seed (batch order from
  `fitting.batch_indices`, keys fold_in(PRNGKey(seed), step)). `fit_private` runs DP-SGD with
  Poisson batches: `seed` fixes only the initialisation; the sampling and noise seeds are secret
  (OS entropy, fresh per call) unless a `noise_seed` is passed (tests and research grids only,
  flagged in `last_private_fit`).
  """
  model: AttributeRegressor
  spec: TargetSpec
  optim: ml_collections.ConfigDict
  steps: int
  batch_size: int = 8
  classification_weight: float = 1.0

  def __post_init__(self):
    self.tx = fitting.make_optimizer(self.optim, self.steps)
    self._step = jitted_train_step(self.model, self.spec, self.tx, ema_decay=self.optim.ema_decay,
                                   classification_weight=self.classification_weight)
    # What the last `fit_private` ran: its mechanism and the provenance of its seeds ("noise_seed":
    # ledger.OS_ENTROPY or ledger.FIXED_SEED), for the caller's records.
    self.last_private_fit: dict[str, Any] | None = None

  def init(self, shape, seed: int):
    return init_params(self.model, shape, seed)

  def fit(self, volumes: np.ndarray, encoded: Mapping[str, np.ndarray], seed: int, *,
          params=None, progress: bool = True, description: str = "regressor"):
    """Returns the EMA parameters (the parameters themselves when optim.ema_decay is 0)."""
    n = len(volumes)
    params = self.init(volumes.shape[1:], seed) if params is None else params
    state = fitting.new_state(params, self.tx)
    data = {"volume": np.asarray(volumes, np.float32), **encoded}
    bar, task = fitting.progress_bar(self.steps, 0, description)
    with fitting.maybe_progress(bar, progress):
      for step in range(self.steps):
        idx = fitting.batch_indices(seed, step, n, self.batch_size)
        batch = {k: jnp.asarray(v[idx]) for k, v in data.items()}
        state, metrics = self._step(state, batch, fitting.step_key(seed, step))
        if progress:
          bar.update(task, completed=step + 1)
    fitting.check_finite(self.steps, jax.device_get(metrics))
    return state.ema_params

  def fit_private(self, volumes: np.ndarray, encoded: Mapping[str, np.ndarray], seed: int, *,
                  sampling_rate: float, noise_multiplier: float, l2_clip_norm: float, microbatch_size: int = 4,
                  params=None, progress: bool = True, description: str = "regressor (DP-SGD)",
                  noise_seed: int | None = None):
    """DP-SGD for `self.steps` steps; returns the final parameters (EMA is off: it is not needed).

    Poisson sampling with rate q, noise multiplier sigma, clip C: the mechanism
    `jaxldm.privacy.accounting` accounts for. `seed` (public) fixes the initialisation only. The
    Poisson-sampling and noise seeds are SECRET: with `noise_seed` None (the default) both are
    drawn from OS entropy, fresh per call, as the trainers do (`jaxldm.train.dp`); only then does
    the accounted epsilon protect anything. An int `noise_seed` (noise seed k, sampling seed k + 1,
    the trainers' convention) makes the run reproducible for tests and research grids and is NOT
    private; `self.last_private_fit["noise_seed"]` says which (ledger.OS_ENTROPY / FIXED_SEED).
    """
    n = len(volumes)
    # Noise: 64 bits of OS entropy, or key_from_seed(noise_seed) (all 64 bits, flagged FIXED_SEED).
    base, provenance = ledger_lib.noise_base_key(noise_seed)
    sampling_seed = None if noise_seed is None else int(noise_seed) + 1  # None: 63 bits of OS entropy.
    batcher = PoissonBatcher(n, sampling_rate, seed=sampling_seed, microbatch_size=microbatch_size)
    # Traced in the step, so checked here (a traced value is the caller's to validate).
    clipping.check_l2_clip_norm(l2_clip_norm)
    check_arg("noise_multiplier", noise_multiplier, "[0, inf)")
    # Everything else about the mechanism is a traced argument: one program per microbatch size.
    tx = fitting.make_optimizer(self.optim, self.steps, private=True)
    step_fn = _jitted_private_step(self.model, self.spec, tx, int(microbatch_size), float(self.classification_weight))
    mechanism = (np.float32(noise_multiplier), np.float32(l2_clip_norm), np.float32(batcher.expected_batch_size))
    params = self.init(volumes.shape[1:], seed) if params is None else params
    state = fitting.new_state(params, tx)
    data = {"volume": np.asarray(volumes, np.float32), **encoded}
    if noise_seed is not None:
      description = f"{description} [fixed noise seed: NOT SECURE]"
    bar, task = fitting.progress_bar(self.steps, 0, description)
    with fitting.maybe_progress(bar, progress):
      for step in range(self.steps):
        b = batcher.batch(step)
        batch = {k: jnp.asarray(v[b.indices]) for k, v in data.items()}
        state, _ = step_fn(state, batch, jnp.asarray(b.mask), jnp.asarray(b.num_microbatches, jnp.int32),
                           jax.random.fold_in(base, step), *mechanism)
        if progress:
          bar.update(task, completed=step + 1)
    self.last_private_fit = {"noise_seed": provenance, "sampling_rate": float(sampling_rate),
                             "noise_multiplier": float(noise_multiplier), "l2_clip_norm": float(l2_clip_norm),
                             "steps": int(self.steps)}
    return state.params
