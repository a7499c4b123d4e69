"""Trainer of the attribute regressor/classifier (the real-data controllability instrument).

  jaxldm data phantoms --out runs/phantoms/private --n 64 --domain private --size tiny
  jaxldm train --config configs/regressor.py:tiny --workdir runs/regressor

Writes into the workdir: config.json, checkpoints/ (orbax, resumable), metrics.jsonl and
regressor.json (model config, the TargetSpec with the training set's attribute standardisation,
the held-out split's Pearson r / MAE / accuracy with bootstrap CIs). `load_regressor(workdir)`
turns a finished run into a `Predictor` for `jaxldm.eval.controllability.regressor_controllability`.

The pieces the utility studies reuse live here too, as pure functions: the per-example loss (ONE
example, no batch axis, so `jaxldm.privacy.noise.private_grad` can clip it), a jitted non-private
step, a jitted DP-SGD step, a `Fitter` that trains on arrays, and `predict`. The DP-SGD fit draws
its sampling and noise seeds from OS entropy unless a noise seed is fixed for a test (flagged);
see docs/privacy.md.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxldm.config import ConfigError, to_dict
from jaxldm.models.layers import as_triple
from jaxldm.models.regressor import AttributeRegressor, TargetSpec, attributes_to_dict
from jaxldm.train import common, loop

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def build_model(model_cfg: ml_collections.ConfigDict | Mapping[str, Any], num_outputs: int) -> AttributeRegressor:
  m = dict(model_cfg)
  if m["dtype"] not in DTYPES:
    raise ConfigError(f"config key 'model.dtype': {m['dtype']!r} is not one of {', '.join(DTYPES)}")
  if not m["channels"]:
    raise ConfigError("config key 'model.channels': give at least one level, e.g. (8, 16)")
  return AttributeRegressor(channels=tuple(m["channels"]), num_res_blocks=int(m["num_res_blocks"]),
                            num_outputs=num_outputs, kernel=as_triple(m["kernel"]),
                            stride=as_triple(m["stride"]), dtype=DTYPES[m["dtype"]])


@functools.lru_cache(maxsize=16)
def _init_fn(model: AttributeRegressor):
  return jax.jit(model.init)


def init_params(model: AttributeRegressor, shape, seed: int):
  """Parameters for volumes of `shape` (D, H, W); one compilation per model (cached)."""
  return _init_fn(model)(jax.random.PRNGKey(seed), jnp.zeros((1, *shape, 1), jnp.float32))


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


def _apply_updates(state: common.TrainState, grads, tx, ema_decay: float) -> common.TrainState:
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = jax.tree_util.tree_map(lambda p, u: p + u, state.params, updates)
  ema = common.ema_update(state.ema_params, params, ema_decay)
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema)


def make_train_step(model, spec: TargetSpec, tx, *, ema_decay: float, classification_weight: float):
  """Non-private step on a batch dict with leading axis B (volume, cont, cont_mask, label, label_mask)."""
  loss_fn = functools.partial(example_loss, model, spec, classification_weight=classification_weight)

  def train_step(state: common.TrainState, batch, rng):
    # RNG: example i of this step uses fold_in(rng, i) (unused by the loss today; kept for symmetry).
    keys = jax.vmap(lambda i: jax.random.fold_in(rng, i))(jnp.arange(batch["volume"].shape[0]))

    def batch_loss(params):
      losses, aux = jax.vmap(lambda ex, k: loss_fn(params, ex, k))(batch, keys)
      return losses.mean(), aux

    (loss, aux), grads = jax.value_and_grad(batch_loss, has_aux=True)(state.params)
    metrics = {"loss": loss, "grad_norm": common.global_norm(grads), "mse": aux["mse"].mean(),
               "ce": aux["ce"].mean()}
    return _apply_updates(state, grads, tx, ema_decay), metrics

  return train_step


def make_private_step(model, spec: TargetSpec, tx, *, l2_clip_norm: float, noise_multiplier: float,
                      expected_batch_size: float, microbatch_size: int, classification_weight: float = 1.0):
  """DP-SGD step: per-example clipped sum + Gaussian noise once / expected batch size (private_grad).

  `batch` is a Poisson batch padded to a static size with `mask` (1 = sampled); `num_microbatches`
  (traced) is the count of microbatches holding sampled examples, so one compilation serves every
  batch size.
  """
  from jaxldm.privacy import noise

  loss_fn = functools.partial(example_loss, model, spec, classification_weight=classification_weight)

  def private_step(state: common.TrainState, batch, mask, num_microbatches, rng):
    grads, aux = noise.private_grad(loss_fn, state.params, batch, rng, l2_clip_norm=l2_clip_norm,
                                    noise_multiplier=noise_multiplier,
                                    expected_batch_size=expected_batch_size, mask=mask,
                                    microbatch_size=microbatch_size, num_microbatches=num_microbatches,
                                    has_aux=True)
    return _apply_updates(state, grads, tx, 0.0), {"grad_norm": common.global_norm(grads)}

  return private_step


# ---------------------------------------------------------------------------------------------
# Training on arrays (used by the utility studies) and prediction
# ---------------------------------------------------------------------------------------------
def split_holdout(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """(train indices, held-out indices), a seeded permutation; both sorted, train never empty."""
  if not 0 <= fraction < 1:
    raise ConfigError(f"config key 'train.holdout_fraction': {fraction} must be in [0, 1)")
  order = np.random.default_rng([seed, 17]).permutation(n)
  n_hold = min(n - 1, int(round(fraction * n))) if fraction > 0 else 0
  if fraction > 0 and n >= 2:
    n_hold = max(1, n_hold)
  return np.sort(order[n_hold:]), np.sort(order[:n_hold])


def new_state(params, tx) -> common.TrainState:
  return common.TrainState(step=jnp.array(0, jnp.int32), params=params, opt_state=tx.init(params),
                           ema_params=jax.tree_util.tree_map(jnp.copy, params))


@dataclasses.dataclass
class Fitter:
  """Trains one architecture on in-memory arrays, many times (seeds, datasets) with one compilation.

  `fit` runs `steps` non-private steps, deterministic for a seed (batch order from
  `common.batch_indices`, keys fold_in(PRNGKey(seed), step)). `fit_private` runs DP-SGD with
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
    self.tx = common.make_optimizer(self.optim, self.steps)
    self._step = jax.jit(make_train_step(self.model, self.spec, self.tx, ema_decay=self.optim.ema_decay,
                                         classification_weight=self.classification_weight),
                         donate_argnums=0)
    self._private_steps: dict[tuple, Any] = {}
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
    state = new_state(params, self.tx)
    data = {"volume": np.asarray(volumes, np.float32), **encoded}
    bar, task = common.progress_bar(self.steps, 0, description)
    with maybe_progress(bar, progress):
      for step in range(self.steps):
        idx = common.batch_indices(seed, step, n, self.batch_size)
        batch = {k: jnp.asarray(v[idx]) for k, v in data.items()}
        state, metrics = self._step(state, batch, common.step_key(seed, step))
        if progress:
          bar.update(task, completed=step + 1)
    common.check_finite(self.steps, jax.device_get(metrics))
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
    from jaxldm.privacy import ledger as ledger_lib
    from jaxldm.privacy.sampling import PoissonBatcher

    n = len(volumes)
    # Noise: 64 bits of OS entropy, or key_from_seed(noise_seed) (all 64 bits, flagged FIXED_SEED).
    base, provenance = ledger_lib.noise_base_key(noise_seed)
    sampling_seed = None if noise_seed is None else int(noise_seed) + 1  # None: 63 bits of OS entropy.
    batcher = PoissonBatcher(n, sampling_rate, seed=sampling_seed, microbatch_size=microbatch_size)
    key = (float(noise_multiplier), float(l2_clip_norm), int(microbatch_size), batcher.expected_batch_size)
    if key not in self._private_steps:
      tx = common.make_optimizer(self.optim, self.steps, private=True)
      step_fn = make_private_step(self.model, self.spec, tx, l2_clip_norm=l2_clip_norm,
                                  noise_multiplier=noise_multiplier,
                                  expected_batch_size=batcher.expected_batch_size,
                                  microbatch_size=microbatch_size,
                                  classification_weight=self.classification_weight)
      self._private_steps[key] = (tx, jax.jit(step_fn, donate_argnums=0))
    tx, step_fn = self._private_steps[key]
    params = self.init(volumes.shape[1:], seed) if params is None else params
    state = new_state(params, tx)
    data = {"volume": np.asarray(volumes, np.float32), **encoded}
    if noise_seed is not None:
      description = f"{description} [fixed noise seed: NOT SECURE]"
    bar, task = common.progress_bar(self.steps, 0, description)
    with maybe_progress(bar, progress):
      for step in range(self.steps):
        b = batcher.batch(step)
        batch = {k: jnp.asarray(v[b.indices]) for k, v in data.items()}
        state, _ = step_fn(state, batch, jnp.asarray(b.mask), jnp.asarray(b.num_microbatches, jnp.int32),
                           jax.random.fold_in(base, step))
        if progress:
          bar.update(task, completed=step + 1)
    self.last_private_fit = {"noise_seed": provenance, "sampling_rate": float(sampling_rate),
                             "noise_multiplier": float(noise_multiplier), "l2_clip_norm": float(l2_clip_norm),
                             "steps": int(self.steps)}
    return state.params


class maybe_progress:
  """`with progress_bar` only when progress is on (rich would otherwise still draw)."""

  def __init__(self, bar, enabled: bool):
    self.bar, self.enabled = bar, enabled

  def __enter__(self):
    return self.bar.__enter__() if self.enabled else None

  def __exit__(self, *exc):
    return self.bar.__exit__(*exc) if self.enabled else False


@functools.lru_cache(maxsize=16)
def _apply_fn(model: AttributeRegressor):
  return jax.jit(lambda p, x: model.apply(p, x[..., None]))


def predict_outputs(model: AttributeRegressor, params, volumes, batch_size: int = 16) -> np.ndarray:
  """Raw network outputs (N, num_outputs), in fixed-size chunks (one compilation)."""
  volumes = np.asarray(volumes, np.float32)
  apply = _apply_fn(model)
  outs = [np.asarray(apply(params, jnp.asarray(chunk)))[:valid]
          for valid, chunk in common.iterate_batches(volumes, min(batch_size, len(volumes)))]
  return np.concatenate(outs)


def predict(model, params, spec: TargetSpec, volumes, batch_size: int = 16
            ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
  """({attribute: (N,) natural units / class index}, {categorical: (N, K) probabilities})."""
  return spec.decode(predict_outputs(model, params, volumes, batch_size))


@dataclasses.dataclass
class Predictor:
  """A trained regressor as a function of volumes (N, D, H, W) -> (values, probabilities)."""
  model: AttributeRegressor
  params: Any
  targets: TargetSpec
  batch_size: int = 16
  info: dict = dataclasses.field(default_factory=dict)

  def __call__(self, volumes) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    return predict(self.model, self.params, self.targets, volumes, self.batch_size)

  def phase_probability(self, volumes) -> np.ndarray:
    """P(ES) per volume: a `phase_classifier` for `controllability.controllability`."""
    if "phase" not in self.targets.categorical:
      raise ValueError("this regressor has no phase head (targets.categorical lacks 'phase')")
    return self(volumes)[1]["phase"][:, 1]


def load_regressor(workdir: str | pathlib.Path, *, batch_size: int = 16) -> Predictor:
  """The EMA parameters of a finished `jaxldm train --config configs/regressor.py` run."""
  workdir = pathlib.Path(workdir)
  info_path = workdir / "regressor.json"
  if not info_path.is_file():
    raise FileNotFoundError(f"{info_path} does not exist; train the regressor first "
                            f"(jaxldm train --config configs/regressor.py --workdir {workdir})")
  info = json.loads(info_path.read_text())
  spec = TargetSpec.from_dict(info["targets"])
  model = build_model(info["model"], spec.num_outputs)
  target = init_params(model, tuple(info["data_shape"]), 0)
  params, _ = common.restore_params(workdir / "checkpoints", target, use_ema=True)
  return Predictor(model, params, spec, batch_size, info)


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------
def _target_columns(config, dataset_columns: tuple[str, ...]) -> tuple[tuple[str, ...], list[int]]:
  names = tuple(config.targets.attributes) or tuple(dataset_columns)
  missing = [n for n in names if n not in dataset_columns]
  if missing:
    raise ConfigError(f"config key 'targets.attributes': {missing} are not among data.attributes "
                      f"{list(dataset_columns)}; add them there or drop them here")
  if not names:
    raise ConfigError("config key 'targets.attributes': nothing to predict (data.attributes is empty "
                      "or the dataset has no attributes.csv)")
  return names, [dataset_columns.index(n) for n in names]


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> dict:
  from jaxldm.data.defaults import build_dataset
  from jaxldm.eval.controllability import compare_predictions

  workdir, console = common.prepare_workdir(workdir)

  # --- data ---------------------------------------------------------------------------------
  dataset = build_dataset(config.data, progress=True)
  volumes, all_values, all_mask = dataset.arrays()
  names, cols = _target_columns(config, tuple(dataset.columns))
  values, mask = all_values[:, cols], all_mask[:, cols]
  train_idx, hold_idx = split_holdout(len(volumes), config.train.holdout_fraction, config.seed)
  try:
    spec = TargetSpec.fit(names, values[train_idx], mask[train_idx], tuple(config.targets.categorical))
  except ValueError as e:
    raise ConfigError(f"config key 'targets.categorical': {e}") from e
  encoded = spec.encode(values[train_idx], mask[train_idx])
  train_data = {"volume": volumes[train_idx], **encoded}
  n = len(train_idx)
  console.print(f"data: {n} training + {len(hold_idx)} held-out volumes {tuple(volumes.shape[1:])} "
                f"from {config.data.root}; continuous {list(spec.continuous)}, categorical "
                f"{dict(zip(spec.categorical, spec.num_classes))}")

  # --- model --------------------------------------------------------------------------------
  model = build_model(config.model, spec.num_outputs)
  params = init_params(model, volumes.shape[1:], config.seed)
  tx = common.make_optimizer(config.optim, config.train.steps)
  state = new_state(params, tx)
  console.print(f"regressor: {common.count_params(params):,} parameters")

  # --- step ---------------------------------------------------------------------------------
  mesh = common.make_mesh(config.train.num_devices)
  train_step = jax.jit(make_train_step(model, spec, tx, ema_decay=config.optim.ema_decay,
                                       classification_weight=config.targets.classification_weight),
                       donate_argnums=0)
  step = loop.shuffled_step(train_step, train_data, seed=config.seed, batch_size=config.train.batch_size, mesh=mesh)

  # --- loop ---------------------------------------------------------------------------------
  run = loop.Run(workdir, config, console)
  state = loop.restore(run, state, mesh)
  state = loop.train(run, state, step, description="regressor")

  # --- held-out evaluation ------------------------------------------------------------------
  holdout = None
  if len(hold_idx):
    params = jax.device_get(state.ema_params)
    predicted, probs = predict(model, params, spec, volumes[hold_idx], config.train.eval_batch_size)
    truth = attributes_to_dict(values[hold_idx], mask[hold_idx], names)
    scores = {k: p[:, 1] for k, p in probs.items() if p.shape[1] == 2}
    holdout = compare_predictions(predicted, truth, categorical=spec.categorical, scores=scores,
                                  n_boot=config.train.bootstrap, seed=config.seed, source="regressor (held out)")
  info = {"model": to_dict(config.model), "targets": spec.to_dict(), "data_shape": list(volumes.shape[1:]),
          "steps": run.step, "n_train": int(n), "n_holdout": int(len(hold_idx)), "holdout": holdout}
  if run.primary:
    common.write_json(workdir / "regressor.json", info)
  if holdout:
    summary = [f"{k} r={v['pearson_r']:.3f}" for k, v in holdout["attributes"].items()]
    summary += [f"{k} acc={v['accuracy']:.3f}" for k, v in holdout["categorical"].items()]
    console.print("held out: " + ", ".join(summary))
  console.print(f"wrote {workdir / 'regressor.json'}")
  return info
