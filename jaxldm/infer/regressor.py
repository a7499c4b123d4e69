"""The attribute regressor/classifier at inference: building it, loading a trained run, predicting.

`load_regressor(workdir)` turns a finished `jaxldm train --config regressor` run into a `Predictor`,
the instrument of `jaxldm.eval.controllability.regressor_controllability`; prediction runs in
fixed-size chunks (one compilation per model).
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxldm.config import ConfigError
from jaxldm.infer import checkpoints
from jaxldm.models import conv, layers
from jaxldm.models.layers import as_triple
from jaxldm.models.regressor import AttributeRegressor, TargetSpec

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


def init_params(model: AttributeRegressor, shape, seed: int):
  """Parameters for volumes of `shape` (D, H, W); one compilation per model (cached)."""
  return layers.init_params(model, jax.random.PRNGKey(seed), jnp.zeros((1, *shape, 1), jnp.float32))


@conv.cached_per_route(maxsize=16)
def _apply_fn(model: AttributeRegressor):
  return jax.jit(lambda p, x: model.apply(p, x[..., None]))


def predict_outputs(model: AttributeRegressor, params, volumes, batch_size: int = 16) -> np.ndarray:
  """Raw network outputs (N, num_outputs), in fixed-size chunks (one compilation)."""
  volumes = np.asarray(volumes, np.float32)
  apply = _apply_fn(model)
  outs = [np.asarray(apply(params, jnp.asarray(chunk)))[:valid]
          for valid, chunk in checkpoints.iterate_batches(volumes, min(batch_size, len(volumes)))]
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
  """The EMA parameters of a finished `jaxldm train --config regressor` run."""
  workdir = pathlib.Path(workdir)
  info = checkpoints.stage_record(workdir, "regressor.json", "regressor")
  spec = TargetSpec.from_dict(info["targets"])
  model = build_model(info["model"], spec.num_outputs)
  target = layers.abstract_params(model, jnp.zeros((1, *info["data_shape"], 1)))  # Shapes only.
  params, _ = checkpoints.restore_params(workdir / "checkpoints", target, use_ema=True)
  return Predictor(model, params, spec, batch_size, info)
