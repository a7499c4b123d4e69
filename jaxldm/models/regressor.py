"""Attribute regressor/classifier: a small 3D CNN that reads attributes off a volume.

It plays the segmentation network of Daum et al. 2024 on real data (where no `phantoms.measure`
exists): trained on the real training set, it predicts the conditioning attributes of generated
volumes (controllability), and it is the downstream model of the utility studies (train on
synthetic / test on real; DP-SGD with and without synthetic pretraining).

One network, one head: the first outputs are the continuous attributes, standardised by the
training set's mean and std (so one MSE weighs them alike); then one block of logits per
categorical attribute (sex, ES/ED phase, ...). `TargetSpec` records that layout and the
standardisation so predictions can be decoded to natural units anywhere (it is saved with a run).

GroupNorm only (via `layers.Norm`): batch statistics would couple the examples of a batch and break
per-example DP-SGD, which utility study (b) runs on this very model.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from jaxldm.models.conv import Conv
from jaxldm.models.layers import Downsample, Norm, ResBlock3D, Triple, swish


class AttributeRegressor(nn.Module):
  """Stem conv, per level `num_res_blocks` ResBlocks then a strided conv, global mean pool, Dense.

  (B, D, H, W, 1) -> (B, num_outputs) float32. Strides (1, 2, 2) keep the few thick slices of
  cardiac SAX volumes; the global mean pool makes the output independent of the input size.
  """
  channels: Sequence[int] = (16, 32, 64)
  num_res_blocks: int = 1
  num_outputs: int = 1
  kernel: Triple = (1, 3, 3)
  stride: Triple = (1, 2, 2)
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    h = Conv(self.channels[0], self.kernel, padding="SAME", dtype=self.dtype, name="stem")(x)
    for level, ch in enumerate(self.channels):
      for _ in range(self.num_res_blocks):
        h = ResBlock3D(ch, self.kernel, dtype=self.dtype)(h)
      if level + 1 < len(self.channels):
        h = Downsample(self.channels[level + 1], self.stride, self.kernel, dtype=self.dtype)(h)
    h = swish(Norm(dtype=self.dtype)(h))
    h = h.astype(jnp.float32).mean(axis=(1, 2, 3))
    return nn.Dense(self.num_outputs, name="head")(h)


@dataclasses.dataclass(frozen=True)
class TargetSpec:
  """Which attributes the head predicts, how, and their standardisation.

  Attributes:
    names: every predicted attribute, in the column order of the value arrays.
    categorical: the subset predicted as classes (values are class indices 0..K-1).
    num_classes: K per categorical attribute (same order as `categorical`).
    mean, std: per continuous attribute (names minus categorical, in `names` order), over the
      training values that are present.
  """
  names: tuple[str, ...]
  categorical: tuple[str, ...] = ()
  num_classes: tuple[int, ...] = ()
  mean: tuple[float, ...] = ()
  std: tuple[float, ...] = ()

  @property
  def continuous(self) -> tuple[str, ...]:
    return tuple(n for n in self.names if n not in self.categorical)

  @property
  def num_outputs(self) -> int:
    return len(self.continuous) + sum(self.num_classes)

  @classmethod
  def fit(cls, names: Sequence[str], values, mask, categorical: Sequence[str] = ()) -> TargetSpec:
    """Standardisation and class counts from training values (N, A) and their mask (N, A).

    Raises:
      ValueError: a categorical name not in `names`, or categorical values that are not
        non-negative integers.
    """
    names = tuple(names)
    values, mask = np.asarray(values, np.float64), np.asarray(mask) > 0
    unknown = [c for c in categorical if c not in names]
    if unknown:
      raise ValueError(f"categorical attributes {unknown} are not among the predicted ones {names}")
    categorical = tuple(n for n in names if n in categorical)
    num_classes, mean, std = [], [], []
    for j, name in enumerate(names):
      present = values[mask[:, j], j]
      if name in categorical:
        if present.size and (np.any(present < 0) or np.any(present != np.rint(present))):
          raise ValueError(f"categorical attribute {name!r} has values that are not class indices "
                           f"0, 1, ... (e.g. {present[(present < 0) | (present != np.rint(present))][0]})")
        num_classes.append(max(2, int(present.max()) + 1 if present.size else 2))
      else:
        mean.append(float(present.mean()) if present.size else 0.0)
        sd = float(present.std()) if present.size > 1 else 0.0
        std.append(sd if sd > 0 else 1.0)
    return cls(names, categorical, tuple(num_classes), tuple(mean), tuple(std))

  def to_dict(self) -> dict[str, Any]:
    return {k: list(v) for k, v in dataclasses.asdict(self).items()}

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> TargetSpec:
    return cls(tuple(d["names"]), tuple(d["categorical"]), tuple(int(k) for k in d["num_classes"]),
               tuple(float(m) for m in d["mean"]), tuple(float(s) for s in d["std"]))

  def encode(self, values, mask) -> dict[str, np.ndarray]:
    """Training targets from values (N, A) in `names` order and mask (N, A).

    Returns {"cont": (N, Nc) standardised, "cont_mask": (N, Nc), "label": (N, Ncat) int32,
    "label_mask": (N, Ncat)}; missing entries are 0 with mask 0.
    """
    values, mask = np.asarray(values, np.float64), np.asarray(mask, np.float32)
    ci = [self.names.index(n) for n in self.continuous]
    ki = [self.names.index(n) for n in self.categorical]
    cont = (values[:, ci] - np.asarray(self.mean)) / np.asarray(self.std)
    cont_mask = mask[:, ci]
    labels = np.rint(values[:, ki])
    label_mask = mask[:, ki].copy()
    if ki:  # A class index outside the head (unseen in training) is treated as missing.
      label_mask[(labels < 0) | (labels >= np.asarray(self.num_classes))] = 0
    return {"cont": np.where(cont_mask > 0, cont, 0.0).astype(np.float32), "cont_mask": cont_mask,
            "label": np.where(label_mask > 0, labels, 0).astype(np.int32), "label_mask": label_mask}

  def split(self, outputs):
    """(..., num_outputs) -> (continuous (..., Nc), [logits (..., K) per categorical])."""
    nc = len(self.continuous)
    logits, start = [], nc
    for k in self.num_classes:
      logits.append(outputs[..., start:start + k])
      start += k
    return outputs[..., :nc], logits

  def decode(self, outputs) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Network outputs (N, num_outputs) -> ({name: (N,) natural units / class index},
    {categorical name: (N, K) probabilities})."""
    outputs = np.asarray(outputs, np.float64)
    cont, logits = self.split(outputs)
    values = {n: cont[:, j] * self.std[j] + self.mean[j] for j, n in enumerate(self.continuous)}
    probs = {}
    for name, lg in zip(self.categorical, logits):
      e = np.exp(lg - lg.max(axis=-1, keepdims=True))
      probs[name] = e / e.sum(axis=-1, keepdims=True)
      values[name] = probs[name].argmax(axis=-1).astype(np.float64)
    return {n: values[n] for n in self.names}, probs


def attributes_from_dict(attributes: Mapping[str, Any], names: Sequence[str], n: int | None = None
                         ) -> tuple[np.ndarray, np.ndarray]:
  """{name: (N,)} with NaN = missing -> values (N, A) float32 (0 where missing) and mask (N, A).

  Attributes absent from the dict are missing for every example.
  """
  if n is None:
    n = len(next(iter(attributes.values()))) if attributes else 0
  values = np.zeros((n, len(names)), np.float64)
  mask = np.zeros((n, len(names)), np.float32)
  for j, name in enumerate(names):
    if name not in attributes:
      continue
    col = np.asarray(attributes[name], np.float64).ravel()
    if col.shape != (n,):
      raise ValueError(f"attribute {name!r} has {col.size} values for {n} volumes")
    ok = np.isfinite(col)
    values[ok, j] = col[ok]
    mask[ok, j] = 1.0
  return values.astype(np.float32), mask


def attributes_to_dict(values, mask, names: Sequence[str]) -> dict[str, np.ndarray]:
  """The inverse of `attributes_from_dict`: NaN where the mask is 0."""
  values, mask = np.asarray(values, np.float64), np.asarray(mask)
  return {n: np.where(mask[:, j] > 0, values[:, j], math.nan) for j, n in enumerate(names)}
