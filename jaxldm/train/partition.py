"""Which parameters train: all, DP-LDM's attention + conditioning subset, or a regex.

Lyu et al. 2024 (DP-LDM): DP-finetuning only the attention/cross-attention blocks and the condition
embedder (~90% fewer trainable parameters) beats full finetuning. Frozen parameters get no gradient,
so they are outside clipping and noise (and cost no privacy).
"""

from __future__ import annotations

import re
from typing import Any

from flax import traverse_util

from jaxldm.config import ConfigError

PRESETS = {
    "all": r".*",
    # The UNet's attention blocks (spatial, slice, MLP, cross), the attribute encoder and the
    # attribute embedding added to the timestep embedding.
    "attention+conditioning": r"(^|/)(AttentionBlock3D_\d+|attributes|attribute_embedding)(/|$)",
}


def _pattern(spec: str) -> re.Pattern:
  source = PRESETS.get(spec, spec)
  try:
    return re.compile(source)
  except re.error as e:
    raise ConfigError(f"config key 'train.trainable': {spec!r} is neither a preset "
                      f"({', '.join(PRESETS)}) nor a valid regex: {e}") from None


def split(params: Any, spec: str) -> tuple[dict, dict]:
  """(trainable, frozen): flat {'a/b/c': array} dicts whose union is `params`."""
  flat = traverse_util.flatten_dict(params, sep="/")
  pattern = _pattern(spec)
  trainable = {k: v for k, v in flat.items() if pattern.search(k)}
  if not trainable:
    raise ConfigError(f"config key 'train.trainable': {spec!r} matches no parameter")
  frozen = {k: v for k, v in flat.items() if k not in trainable}
  return trainable, frozen


def merge(trainable: dict, frozen: dict) -> Any:
  return traverse_util.unflatten_dict({**frozen, **trainable}, sep="/")
