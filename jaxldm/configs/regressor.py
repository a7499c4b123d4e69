"""Attribute regressor/classifier on the real (private) training set: the controllability instrument.

  jaxldm data phantoms --out runs/phantoms/private --n 64 --domain private --size tiny
  jaxldm train --config regressor:tiny --workdir runs/regressor \
      --config.data.root=runs/phantoms/private

It plays the segmentation network of Daum et al. 2024 on real data: its predictions on generated
volumes are compared with their conditioning (`jaxldm.eval.controllability.regressor_controllability`).
Continuous attributes are regressed (masked MSE on standardised values), categorical ones (sex,
ES/ED phase) classified (masked cross-entropy). GroupNorm only, so the same model DP-trains.

Variants: `tiny` (2-core CPU, about a minute), `default` (12x64x64), `paper` (13x96x96).
"""

from __future__ import annotations

import ml_collections

from jaxldm.config import select_variant
from jaxldm.data.defaults import data_config
from jaxldm.fitting import optim_config

VARIANTS = ("tiny", "default", "paper")


def regressor_config(variant: str) -> ml_collections.ConfigDict:
  """The attribute regressor's config groups (the real training set)."""
  tiny = variant == "tiny"
  c = ml_collections.ConfigDict()
  c.trainer = "regressor"  # Which trainer `jaxldm train` runs.
  c.seed = 0  # Run seed: init, held-out split, data order and every key derive from it.
  c.data = data_config(variant, root="runs/phantoms/private")  # The real training set (see jaxldm/data/defaults.py).

  c.targets = ml_collections.ConfigDict()
  c.targets.attributes = ()  # Attributes to predict (a subset of data.attributes); () = all of them.
  c.targets.categorical = ("sex", "phase")  # Predicted as classes (values 0..K-1); the rest are regressed.
  c.targets.classification_weight = 1.0  # Weight of the cross-entropy term against the standardised MSE.

  c.model = ml_collections.ConfigDict()
  c.model.channels = {"tiny": (8, 16, 32), "default": (16, 32, 64, 128), "paper": (32, 64, 128, 256)}[variant]  # Per level; len-1 down-samplings.
  c.model.num_res_blocks = 1  # Residual blocks per level.
  c.model.kernel = (1, 3, 3)  # Conv kernel (D, H, W): in-plane for thick slices; (3, 3, 3) isotropic.
  c.model.stride = (1, 2, 2)  # Down-sampling stride per level (D, H, W).
  c.model.dtype = "bfloat16" if variant == "paper" else "float32"  # Compute dtype (params stay float32).

  c.optim = optim_config(lr=2e-3 if tiny else 5e-4)  # Adam(W) and EMA (see jaxldm/fitting.py).
  c.optim.ema_decay = 0.9 if tiny else 0.99  # Short runs: a short EMA, or it lags the weights.

  c.train = ml_collections.ConfigDict()
  c.train.steps = 300 if tiny else 5000  # Optimizer steps.
  c.train.batch_size = 8  # Volumes per step (a multiple of the devices used).
  c.train.holdout_fraction = 0.2  # Share of the training set held out for r / accuracy in regressor.json.
  c.train.eval_batch_size = 16  # Volumes per prediction call.
  c.train.bootstrap = 1000  # Bootstrap resamples for the held-out confidence intervals.
  c.train.log_every = 10  # Steps between metrics.jsonl lines.
  c.train.checkpoint_every = 100 if tiny else 1000  # Steps between checkpoints.
  c.train.keep_checkpoints = 2  # Checkpoints kept (oldest deleted).
  c.train.num_devices = 0  # Data-parallel devices (batch sharded, state replicated); 0 = all.
  return c


def get_config(arg=None):
  return regressor_config(select_variant(arg, VARIANTS, default="default"))  # See regressor_config.
