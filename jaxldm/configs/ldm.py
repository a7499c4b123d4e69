"""Latent diffusion model, non-private: public pretraining (or the non-private baseline).

  jaxldm train --config ldm:tiny --workdir runs/ldm --config.autoencoder_workdir=runs/ae

Variants: `tiny` (2-core CPU), `default`, `paper` (Daum et al. 2024: 128 channels, (1, 2, 3),
attention at the two lower levels and the middle, T = 150, linear betas 1e-4..7e-2).
"""

from __future__ import annotations

from jaxldm.config import select_variant
from jaxldm.train.ldm_config import VARIANTS, ldm_config


def get_config(arg=None):
  return ldm_config(select_variant(arg, VARIANTS, default="default"), private=False)  # See jaxldm/train/ldm_config.py.
