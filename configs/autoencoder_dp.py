"""First stage with DP-SGD: the 3D KL autoencoder trained on PRIVATE data.

  jaxldm data phantoms --out runs/phantoms/private --n 64 --domain private --size tiny
  jaxldm train --config configs/autoencoder_dp.py:tiny --workdir runs/ae_dp \
      --config.data.root=runs/phantoms/private --config.dp.target_epsilon=10

Same model and per-example loss as configs/autoencoder.py (its `autoencoder_config` with
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

import importlib.util
import pathlib

from jaxldm.config import select_variant


def _base():
  """configs/autoencoder.py, loaded by path (config files are not a package)."""
  path = pathlib.Path(__file__).with_name("autoencoder.py")
  spec = importlib.util.spec_from_file_location("_jaxldm_autoencoder_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def get_config(arg=None):
  base = _base()
  variant = select_variant(arg, base.VARIANTS, default="default")
  c = base.autoencoder_config(variant, private=True)  # See configs/autoencoder.py; dp on, critic off.
  c.train.steps = 100 if variant == "tiny" else c.train.steps  # Optimizer steps (tiny: a CPU-sized DP run).
  return c
