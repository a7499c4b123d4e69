"""First stage: the 3D KL autoencoder, trained (non-privately) on public data.

  jaxldm data phantoms --out runs/phantoms/public --n 64 --domain public --size tiny
  jaxldm train --config autoencoder:tiny --workdir runs/ae \
      --config.data.root=runs/phantoms/public

Variants: `tiny` (2-core CPU, minutes), `default` (12x64x64 volumes), `paper` (13x96x96, the
architecture of Daum et al. 2024: in-plane kernels, 4x in-plane compression; an accelerator size).
For DP-SGD training on private data see the autoencoder_dp preset.
"""

from __future__ import annotations

import ml_collections

from jaxldm.config import select_variant
from jaxldm.data.defaults import data_config
from jaxldm.fitting import optim_config
from jaxldm.train.dp import dp_config

VARIANTS = ("tiny", "default", "paper")


def autoencoder_config(variant: str, *, private: bool) -> ml_collections.ConfigDict:
  """The autoencoder stage's config groups; also the base of the autoencoder_dp preset (private=True:
  dp on, no critic, no reconstruction PNGs, a fixed latent scale)."""
  tiny = variant == "tiny"
  c = ml_collections.ConfigDict()
  c.trainer = "autoencoder"  # Which trainer `jaxldm train` runs.
  c.seed = 0  # Run seed: init, data order and every key derive from it (DP noise and sampling do not).
  c.data = data_config(variant, root="runs/phantoms/private" if private else "runs/phantoms/public")  # Volumes (see jaxldm/data/defaults.py).
  c.scale_factor = 1.0 if private else 0.0  # Latent scale for the LDM; 0 = 1/std of the training latents (non-DP only).

  c.model = ml_collections.ConfigDict()
  c.model.channels = {"tiny": (8, 16), "default": (32, 64, 128), "paper": (64, 128, 256)}[variant]  # Per level; len-1 down-samplings.
  c.model.num_res_blocks = 1  # Residual blocks per level.
  c.model.latent_channels = 2 if tiny else 4  # Channels of the latent.
  c.model.kernel = (1, 3, 3)  # Conv kernel (D, H, W): in-plane for thick slices; (3, 3, 3) isotropic.
  c.model.stride = (1, 2, 2)  # Down-sampling stride per level (D, H, W).
  c.model.attention = not tiny  # Self-attention at the lowest resolution.
  c.model.dtype = "bfloat16" if variant == "paper" else "float32"  # Compute dtype: float32 or bfloat16 (params stay float32).

  c.loss = ml_collections.ConfigDict()
  c.loss.kl_weight = 1e-3  # Weight of KL(q(z|x) || N(0, I)) per input voxel.
  c.loss.adversarial_weight = 0.0 if tiny or private else 0.05  # Weight of the PatchGAN term; 0 = no critic (must be 0 under DP).
  c.loss.adversarial_start = 2000  # Step at which the critic and its loss switch on.
  c.loss.adversarial_loss = "hinge"  # "hinge" or "non_saturating".

  c.disc = ml_collections.ConfigDict()
  c.disc.channels = (32, 64, 128)  # Critic channels per strided level.
  c.disc.kernel = (1, 4, 4)  # Critic kernel (D, H, W).
  c.disc.stride = (1, 2, 2)  # Critic stride (D, H, W).

  c.optim = optim_config(lr=1e-3 if tiny else 2e-4)  # Adam(W) and EMA (see jaxldm/fitting.py).

  c.train = ml_collections.ConfigDict()
  c.train.steps = 300 if tiny else 20000  # Optimizer steps.
  c.train.batch_size = 8  # Volumes per step (non-private; DP batches: dp.expected_batch_size).
  c.train.log_every = 10  # Steps between metrics.jsonl lines.
  c.train.sample_every = 0 if private else (100 if tiny else 1000)  # Steps between reconstruction PNGs (0 = none; must be 0 under DP).
  c.train.checkpoint_every = 100 if tiny else 1000  # Steps between checkpoints.
  c.train.keep_checkpoints = 2  # Checkpoints kept (oldest deleted).
  c.train.num_devices = 0  # Data-parallel devices (batch sharded, state replicated); 0 = all.

  c.dp = dp_config(private=private, tiny=tiny)  # DP-SGD settings (see jaxldm/train/dp.py); off here.
  return c


def get_config(arg=None):
  return autoencoder_config(select_variant(arg, VARIANTS, default="default"), private=False)  # See autoencoder_config.
