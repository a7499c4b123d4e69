"""First stage with DP-SGD: the 3D KL autoencoder trained on PRIVATE data.

  jaxldm data phantoms --out runs/phantoms/private --n 64 --domain private --size tiny
  jaxldm train --config autoencoder_dp:tiny --workdir runs/ae_dp \
      --config.data.root=runs/phantoms/private --config.dp.target_epsilon=10

Same model and per-example loss as the autoencoder preset (its `autoencoder_config` with
private=True), through the DP engine (jaxldm/train/dp.py). Differences, all because anything else
would read the private data outside the mechanism:
  * no PatchGAN critic (loss.adversarial_weight must stay 0: the critic would see private volumes
    unclipped and un-noised; a DP critic is not implemented),
  * no reconstruction PNGs (train.sample_every must stay 0: they would show training volumes),
  * a fixed latent scale_factor (1/std of the private latents would be a non-private statistic; take
    it from an autoencoder trained on public data if you have one).
Logged metrics are what the mechanism releases: the noisy gradient norm and noisy means of the loss, L1,
KL and clipped fraction (docs/privacy.md). Variants: `tiny` (2-core CPU), `default`, `paper`.
"""

from __future__ import annotations

from jaxldm.config import select_variant
from jaxldm.configs.autoencoder import VARIANTS, autoencoder_config


def get_config(arg=None):
  variant = select_variant(arg, VARIANTS, default="default")
  c = autoencoder_config(variant, private=True)  # See the autoencoder preset; dp on, critic off.
  c.train.steps = 100 if variant == "tiny" else c.train.steps  # Optimizer steps (tiny: a CPU-sized DP run).
  if variant == "tiny":
    c.dp.microbatch_size = 4  # A Poisson batch (mean 8) pads to a multiple of 4, not 8: 9.1 rows per step, not 11.2; the trainer's DP step 171 -> 135 ms (benchmarks/NOTES.md, session 15).
  return c
