"""Trainer of the attribute regressor/classifier (the real-data controllability instrument).

  jaxldm data phantoms --out runs/phantoms/private --n 64 --domain private --size tiny
  jaxldm train --config regressor:tiny --workdir runs/regressor

Writes into the workdir: config.json, checkpoints/ (orbax, resumable), metrics.jsonl and
regressor.json (model config, the TargetSpec with the training set's attribute standardisation,
the held-out split's Pearson r / MAE / accuracy with bootstrap CIs). `jaxldm.infer.regressor.load_regressor(workdir)`
turns a finished run into a `Predictor` for `jaxldm.eval.controllability.regressor_controllability`.

The per-example loss and the step are `jaxldm.eval.regressor_fit`'s, the same ones the utility
studies fit with.
"""

from __future__ import annotations

import pathlib

import jax
import ml_collections
import numpy as np

from jaxldm import fitting
from jaxldm.config import ConfigError, to_dict
from jaxldm.data.defaults import build_dataset
from jaxldm.eval.controllability import compare_predictions
from jaxldm.eval.regressor_fit import jitted_train_step
from jaxldm.infer import checkpoints
from jaxldm.infer.regressor import build_model, init_params, predict
from jaxldm.models.regressor import TargetSpec, attributes_to_dict
from jaxldm.train import common, loop


# ---------------------------------------------------------------------------------------------
# The held-out split
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
  tx = fitting.make_optimizer(config.optim, config.train.steps)
  state = fitting.new_state(params, tx)
  console.print(f"regressor: {common.count_params(params):,} parameters")

  # --- step ---------------------------------------------------------------------------------
  mesh = common.make_mesh(config.train.num_devices)
  train_step = jitted_train_step(model, spec, tx, ema_decay=config.optim.ema_decay,
                                 classification_weight=config.targets.classification_weight)
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
    checkpoints.write_json(workdir / "regressor.json", info)
  if holdout:
    summary = [f"{k} r={v['pearson_r']:.3f}" for k, v in holdout["attributes"].items()]
    summary += [f"{k} acc={v['accuracy']:.3f}" for k, v in holdout["categorical"].items()]
    console.print("held out: " + ", ".join(summary))
  console.print(f"wrote {workdir / 'regressor.json'}")
  return info
