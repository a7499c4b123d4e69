"""Latent diffusion model, DP-SGD finetuning on private data (Daum et al. 2024).

  jaxldm train --config ldm_dp:tiny --workdir runs/ldm_dp \
      --config.autoencoder_workdir=runs/ae --config.pretrained_workdir=runs/ldm \
      --config.dp.target_epsilon=10

Without --config.pretrained_workdir it trains from scratch (set conditioning.stats_from to a public
attribute CSV then). DP-LDM's subset: --config.train.trainable=attention+conditioning.
"""

from __future__ import annotations

from jaxldm.config import select_variant
from jaxldm.train.ldm_config import VARIANTS, ldm_config


def get_config(arg=None):
  return ldm_config(select_variant(arg, VARIANTS, default="default"), private=True)  # See jaxldm/train/ldm_config.py.
