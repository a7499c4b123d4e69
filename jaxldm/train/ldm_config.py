"""Config groups of the latent diffusion stage, shared by configs/ldm.py and configs/ldm_dp.py."""

from __future__ import annotations

import ml_collections

from jaxldm.data.defaults import data_config
from jaxldm.fitting import optim_config
from jaxldm.train.dp import dp_config

VARIANTS = ("tiny", "default", "paper")


def ldm_config(variant: str, *, private: bool) -> ml_collections.ConfigDict:
  tiny, paper = variant == "tiny", variant == "paper"
  c = ml_collections.ConfigDict()
  c.trainer = "ldm"  # Which trainer `jaxldm train` runs.
  c.seed = 0  # Run seed: init, non-private data order and keys derive from it (DP noise does not).
  c.autoencoder_workdir = "runs/ae"  # Workdir of the trained (frozen) autoencoder.
  c.pretrained_workdir = ""  # Workdir of an LDM to start from (public pretraining); "" = from scratch.
  c.data = data_config(variant, root="runs/phantoms/private" if private else "runs/phantoms/public")  # Volumes + attributes.

  c.conditioning = ml_collections.ConfigDict()
  c.conditioning.stats_from = "pretrained" if private else "data"  # Attribute mean/std: "data" (non-DP only), "pretrained", or a public CSV.

  c.model = ml_collections.ConfigDict()
  c.model.base_channels = 16 if tiny else 128  # Channels at the first level (paper: 128).
  c.model.channel_mult = (1, 2) if tiny else (1, 2, 3)  # Channel multiplier per level (paper: 1, 2, 3).
  c.model.num_res_blocks = 1 if tiny else 2  # Residual blocks per level.
  c.model.attention_levels = (1,) if tiny else (1, 2)  # Levels with attention blocks (paper: the two lower).
  c.model.mid_attention = True  # Attention block in the middle.
  c.model.heads = 2 if tiny else 8  # Attention heads.
  c.model.kernel = (1, 3, 3) if tiny else (3, 3, 3)  # Conv kernel (D, H, W) on latents.
  c.model.stride = (1, 2, 2)  # Down-sampling stride per level (slices kept).
  c.model.context_dim = 16 if tiny else 128  # Width of the attribute tokens.
  c.model.attribute_embedding = not paper  # Attributes also added to the timestep embedding (paper: cross-attention only).
  c.model.dtype = "bfloat16" if paper else "float32"  # Compute dtype: float32 or bfloat16 (params stay float32).

  c.diffusion = ml_collections.ConfigDict()
  c.diffusion.schedule = "linear"  # Beta schedule: linear, scaled_linear or cosine.
  c.diffusion.num_timesteps = 150  # T (paper: 150).
  c.diffusion.beta_start = 1e-4  # First beta (paper: 1e-4).
  c.diffusion.beta_end = 7e-2  # Last beta (paper: 7e-2).
  c.diffusion.prediction = "epsilon"  # "epsilon" or "v".
  c.diffusion.noise_multiplicity = (2 if tiny else 8) if private else 1  # K (timestep, noise) draws per example (DPDM: 8..32).
  c.diffusion.cond_drop_prob = 0.1  # Condition dropout, trains the unconditional branch for guidance.

  c.sampling = ml_collections.ConfigDict()
  c.sampling.guidance_scale = 1.0  # Classifier-free guidance scale for the training-time sample grids.
  c.sampling.num_steps = 20 if tiny else 50  # DDIM steps for sample grids.

  c.optim = optim_config(lr=1e-3 if tiny else 1e-4)  # Adam(W) and EMA.
  c.optim.ema_decay = 0.99 if tiny else 0.999  # EMA of parameters.

  c.train = ml_collections.ConfigDict()
  c.train.steps = (100 if private else 200) if tiny else (100000 if paper else 20000)  # Optimizer steps.
  c.train.batch_size = 8 if tiny else 32  # Non-private batch size.
  c.train.trainable = "all"  # "all", "attention+conditioning" (DP-LDM) or a regex over parameter paths.
  c.train.log_every = 10  # Steps between metrics.jsonl lines.
  c.train.sample_every = 100 if tiny else 2000  # Steps between sample grids (0 = none).
  c.train.checkpoint_every = 50 if tiny else 1000  # Steps between checkpoints.
  c.train.keep_checkpoints = 2  # Checkpoints kept.
  c.train.num_devices = 0  # Data-parallel devices (batch sharded, state replicated); 0 = all.

  c.dp = dp_config(private=private, tiny=tiny)  # DP-SGD settings (see jaxldm/train/dp.py).
  if tiny:
    c.dp.microbatch_size = 4  # 4 examples x K = 2 draws per chunk: a Poisson batch pads to a multiple of 4, not 8 (benchmarks/NOTES.md, 2026-12-04).
  return c
