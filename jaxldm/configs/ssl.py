"""Self-supervised 3D encoder (NT-Xent, Dar et al. 2023): features for memorization and FID.

  jaxldm data phantoms --out runs/phantoms/public --n 64 --domain public --size tiny
  jaxldm train --config ssl:tiny --workdir runs/ssl

Trained on public/reference data only (never on the private set whose memorization it measures);
the workdir then serves `jaxldm.eval.features.get_extractor("ssl3d", weights="runs/ssl")`.
Variants: `tiny` (2-core CPU, about a minute), `default` (12x64x64), `paper` (13x96x96).
"""

from __future__ import annotations

import ml_collections

from jaxldm.config import select_variant
from jaxldm.data.defaults import data_config
from jaxldm.fitting import optim_config

VARIANTS = ("tiny", "default", "paper")


def ssl_config(variant: str) -> ml_collections.ConfigDict:
  """The contrastive encoder stage's config groups (public data only)."""
  tiny = variant == "tiny"
  c = ml_collections.ConfigDict()
  c.trainer = "ssl"  # Which trainer `jaxldm train` runs.
  c.seed = 0  # Run seed: init, data order and every augmentation key derive from it.
  c.data = data_config(variant, root="runs/phantoms/public")  # Public data (see jaxldm/data/defaults.py).
  c.data.attributes = ()  # No attributes: the contrastive task needs volumes only.

  c.model = ml_collections.ConfigDict()
  c.model.channels = {"tiny": (8, 16), "default": (16, 32, 64), "paper": (32, 64, 128)}[variant]  # Per level; the last is the embedding size.
  c.model.num_res_blocks = 1  # Residual blocks per level.
  c.model.kernel = (1, 3, 3)  # Conv kernel (D, H, W): in-plane for thick slices; (3, 3, 3) isotropic.
  c.model.stride = (1, 2, 2)  # Down-sampling stride per level (D, H, W).
  c.model.projection_dim = 32 if tiny else 64  # Output of the projection head (only the loss sees it).
  c.model.dtype = "bfloat16" if variant == "paper" else "float32"  # Compute dtype: float32 or bfloat16.

  c.loss = ml_collections.ConfigDict()
  c.loss.temperature = 0.1  # NT-Xent temperature of the cosine similarities.

  c.augment = ml_collections.ConfigDict()
  c.augment.both_views = False  # False: (volume, augmented copy) as Dar et al.; True: two augmented copies (SimCLR).
  c.augment.rotation_deg = 10.0  # Max in-plane rotation in degrees.
  c.augment.scale = 0.1  # Max in-plane zoom: factor in [1 - scale, 1 + scale].
  c.augment.shift = 0.05  # Max in-plane shift as a fraction of H and W.
  c.augment.flip_axes = (1, 2)  # Axes of (D, H, W) each flipped with probability 1/2.
  c.augment.gamma = 0.2  # Gamma exp(U(-g, g)) on the min-max normalised volume.
  c.augment.contrast = 0.1  # Contrast factor in [1 - c, 1 + c] about the volume mean.
  c.augment.brightness = 0.1  # Max offset, in units of half the volume's intensity range.
  c.augment.noise_std = 0.03  # Max Gaussian noise std (drawn uniformly in [0, max]), same units.

  c.optim = optim_config(lr=1e-3 if tiny else 3e-4)  # Adam(W) and EMA (see jaxldm/fitting.py).
  c.optim.ema_decay = 0.0 if tiny else 0.999  # EMA of the weights (the frozen features use the EMA); 0 = none.

  c.train = ml_collections.ConfigDict()
  c.train.steps = 60 if tiny else 20000  # Optimizer steps.
  c.train.batch_size = 8 if tiny else 32  # Volumes per step (each brings one positive pair; the rest are negatives).
  c.train.log_every = 10  # Steps between metrics.jsonl lines.
  c.train.checkpoint_every = 60 if tiny else 1000  # Steps between checkpoints.
  c.train.keep_checkpoints = 2  # Checkpoints kept (oldest deleted).
  c.train.num_devices = 0  # Data-parallel devices (batch sharded, state replicated); 0 = all.
  return c


def get_config(arg=None):
  return ssl_config(select_variant(arg, VARIANTS, default="default"))  # See ssl_config.
