"""Data preprocessing config: which volumes, which attributes, which shape and spacing.

Used on its own to build the preprocessed cache and look at what a model would see:

  jaxldm data prepare --config data:tiny --config.data.root=runs/phantoms/private

Variants: `tiny` (6x32x32 at 20x3.6x3.6 mm, for a 2-core CPU), `default` (12x64x64 at
10x1.8x1.8 mm, UK Biobank SAX spacing), `paper` (13x96x96 at 10x1.8x1.8 mm, as in Daum et al.).
"""

from __future__ import annotations

import ml_collections

from jaxldm.config import select_variant
from jaxldm.data.defaults import SIZES, data_config


def get_config(arg=None):
  size = select_variant(arg, tuple(SIZES), default="default")
  config = ml_collections.ConfigDict()
  config.data = data_config(size)  # Volumes, attributes and preprocessing (see jaxldm/data/defaults.py).
  return config
