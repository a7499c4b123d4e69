"""Feature extractors for FID/KID/precision-recall and memorization, selectable by name.

  extractor = get_extractor("ssl3d", weights="runs/ssl")      # the project's own encoder
  extractor = get_extractor("medicalnet", weights="resnet_10_23dataset.pth")
  extractor = get_extractor("slice2d", weights="resnet50-imagenet.pth")
  features = extractor(volumes)                                # (N, D, H, W) -> (N, F) float32

Every extractor has a `name` and a `version` (which weights, which input preparation); cached
reference statistics are keyed by both (`jaxldm.eval.fid.save_reference_stats`) so numbers from
different extractors are never mixed. Nothing is downloaded: `ssl3d` is trained by this project on
public data (`jaxldm train --config ssl`), the other two read a weight file the user
has (PyTorch state dicts, converted once on load; torch is only needed for that).

Input preparation (volumes come in as the data pipeline makes them: (D, H, W), D the slice axis,
intensities in the pipeline's `intensity_range`, by default [-1, 1]):
  ssl3d       as in training: the same intensity range; a volume of another shape is resized
              (trilinear) to the encoder's training shape.
  medicalnet  each volume z-scored (zero mean, unit std over its voxels; MedicalNet normalises
              each volume by its own statistics); optionally resized to `input_shape`. Fed as one
              channel, D as MedicalNet's depth axis. Features: 512 (ResNet-10/18/34) or 2048 (50).
  slice2d     every slice (along D) on its own: mapped from `intensity_range` to [0, 1], resized to
              `image_size` x `image_size` (bilinear; default 224, the ImageNet size), repeated to the
              network's input channels and normalised with `mean`/`std` (default ImageNet's); the
              features of all slices of a volume are averaged (as the paper's slice-wise FID).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxldm.config import ConfigError
from jaxldm.eval import torch_weights
from jaxldm.infer import ssl
from jaxldm.infer.checkpoints import iterate_batches, restore_params
from jaxldm.models import layers

EXTRACTORS = ("ssl3d", "medicalnet", "slice2d")
DEFAULT_SSL3D_WORKDIR = "runs/ssl"  # Where `jaxldm train --config ssl` is told to write in the README.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclasses.dataclass(frozen=True)
class Extractor:
  """A frozen feature network: `extractor(volumes (N, D, H, W)) -> (N, feature_dim)` float32.

  Volumes go through one jitted function in fixed-size batches (the last padded), so a run
  compiles once per input shape.
  """
  name: str
  version: str
  feature_dim: int
  preprocessing: str       # How inputs are prepared, in words (for reports).
  apply: Callable[[Any, jax.Array], jax.Array] = dataclasses.field(repr=False)  # (variables, (B, D, H, W)) -> (B, F)
  variables: Any = dataclasses.field(repr=False)
  batch_size: int = 8

  def __call__(self, volumes) -> np.ndarray:
    volumes = np.asarray(volumes, np.float32)
    if volumes.ndim != 4:
      raise ValueError(f"{self.name}: volumes must be (N, D, H, W), got shape {volumes.shape}")
    if not np.all(np.isfinite(volumes)):
      raise ValueError(f"{self.name}: volumes contain NaN or inf")
    if len(volumes) == 0:
      return np.zeros((0, self.feature_dim), np.float32)
    chunks = [np.asarray(self.apply(self.variables, jnp.asarray(chunk)))[:valid]
              for valid, chunk in iterate_batches(volumes, self.batch_size)]
    return np.concatenate(chunks).astype(np.float32)


def get_extractor(name: str, *, weights: str | os.PathLike | None = None, batch_size: int = 8,
                  input_shape: Sequence[int] | None = None, image_size: int | None = 224,
                  intensity_range: Sequence[float] = (-1.0, 1.0), mean: Sequence[float] | None = None,
                  std: Sequence[float] | None = None) -> Extractor:
  """The extractor called `name` (one of EXTRACTORS).

  Args:
    name: "ssl3d", "medicalnet" or "slice2d".
    weights: ssl3d: the workdir of a finished `ssl` run (default DEFAULT_SSL3D_WORKDIR);
      medicalnet / slice2d: a PyTorch state dict file (required; nothing is downloaded).
    batch_size: volumes per jitted call.
    input_shape: medicalnet only: resize volumes to this (D, H, W) first (None keeps their shape).
    image_size: slice2d only: slices are resized to image_size x image_size (None keeps them).
    intensity_range: slice2d only: the volumes' intensity range, mapped to [0, 1].
    mean, std: slice2d only: per-channel normalisation after [0, 1] (default ImageNet's; for a
      network with other than 3 input channels, their averages).

  Raises:
    ConfigError: unknown name, missing or unusable weights (the message says what to pass).
  """
  if batch_size < 1:
    raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
  if name == "ssl3d":
    return _ssl3d(weights, batch_size)
  if name in ("medicalnet", "slice2d"):
    if weights is None:
      raise ConfigError(f"feature extractor {name!r} needs pretrained weights, which are never downloaded: "
                        f"pass the path to the weight file (weights=PATH / --feature-weights PATH; "
                        f"{_WEIGHT_HINTS[name]}), or use 'ssl3d', the project's own encoder")
    if name == "medicalnet":
      return _medicalnet(weights, batch_size, input_shape)
    return _slice2d(weights, batch_size, image_size, intensity_range, mean, std)
  raise ConfigError(f"unknown feature extractor {name!r}; choose one of {', '.join(EXTRACTORS)}")


_WEIGHT_HINTS = {
    "medicalnet": "a MedicalNet .pth such as resnet_10_23dataset.pth from Tencent/MedicalNet",
    "slice2d": "a torchvision-layout 2D ResNet state dict, e.g. resnet50 ImageNet or RadImageNet weights",
}


def _resize(x: jax.Array, shape: Sequence[int]) -> jax.Array:
  """(B, *spatial) -> (B, *shape), linear; a no-op when the shape already matches."""
  shape = tuple(int(s) for s in shape)
  if tuple(x.shape[1:]) == shape:
    return x
  return jax.image.resize(x, (x.shape[0],) + shape, method="linear")


# ---------------------------------------------------------------------------------------------
# ssl3d: the project's contrastive encoder (ssl)
# ---------------------------------------------------------------------------------------------
def _ssl3d(weights, batch_size: int) -> Extractor:
  workdir = pathlib.Path(weights if weights is not None else DEFAULT_SSL3D_WORKDIR)
  info_path = workdir / ssl.ENCODER_FILE
  if not info_path.is_file():
    raise ConfigError(f"{info_path} does not exist: the ssl3d extractor needs the workdir of a finished "
                      f"`jaxldm train --config ssl --workdir DIR` run; train one on public data "
                      f"and pass weights=DIR")
  info = json.loads(info_path.read_text())
  model = ssl.build_model(info["model"])
  shape = tuple(info["data_shape"])
  target = layers.abstract_params(model, jnp.zeros((1, *shape, 1), jnp.float32))
  try:
    params, _ = restore_params(workdir / "checkpoints", target, use_ema=info.get("params") == "ema_params")
  except FileNotFoundError as e:
    raise ConfigError(f"{workdir}: {e}") from e
  version = f"ssl3d-{ssl.params_version(params)}"
  if version != info["version"]:
    raise ConfigError(f"{workdir}: the latest checkpoint ({version}) is not the encoder {info_path} describes "
                      f"({info['version']}); the run went on after encoder.json was written. Finish the "
                      "run (rerun the same train command) or use a new workdir")

  @jax.jit
  def apply(p, volumes):
    x = _resize(volumes.astype(jnp.float32), shape)[..., None]
    return model.apply(p, x, method=type(model).embed)

  lo, hi = info.get("intensity_range", (-1.0, 1.0))
  return Extractor("ssl3d", version, int(info["embedding_dim"]),
                   f"volumes in [{lo}, {hi}] resized (trilinear) to {shape} if needed; embedding before "
                   f"the projection head ({info['steps']} steps)", apply, params, batch_size)


# ---------------------------------------------------------------------------------------------
# medicalnet: a MedicalNet 3D ResNet from its PyTorch file
# ---------------------------------------------------------------------------------------------
def _load_resnet(weights, dims: int, *, dilated: bool):
  path = os.fspath(weights)
  state = torch_weights.load_state_dict(path)
  spec = torch_weights.infer_resnet(state, path)
  if spec.dims != dims:
    other = "slice2d" if dims == 3 else "medicalnet"
    raise ConfigError(f"{path} holds a {spec.dims}D network (conv1 weight {state['conv1.weight'].shape}); "
                      f"use the {other!r} extractor for it")
  model = spec.build(dilated=dilated)
  variables = torch_weights.resnet_variables(state, model, path)
  depth = spec.depth
  arch = f"resnet{depth}" if depth else f"resnet-{spec.block}-{'-'.join(map(str, spec.layers))}"
  return spec, model, variables, arch, torch_weights.file_digest(path)


def _medicalnet(weights, batch_size: int, input_shape) -> Extractor:
  spec, model, variables, arch, digest = _load_resnet(weights, 3, dilated=True)
  if spec.in_channels != 1:
    raise ConfigError(f"{weights}: conv1 takes {spec.in_channels} channels; MedicalNet networks take 1")
  shape = tuple(int(s) for s in input_shape) if input_shape else None
  if shape is not None and len(shape) != 3:
    raise ConfigError(f"input_shape must be (D, H, W), got {input_shape}")

  @jax.jit
  def apply(v, volumes):
    x = volumes.astype(jnp.float32)
    if shape is not None:
      x = _resize(x, shape)
    axes = (1, 2, 3)
    x = (x - x.mean(axes, keepdims=True)) / jnp.maximum(x.std(axes, keepdims=True), 1e-6)
    return model.apply(v, x[..., None])

  size = f"resized to {shape}" if shape else "at their own shape"
  version = f"medicalnet-{arch}{spec.shortcut}-{digest}" + (f"-in{'x'.join(map(str, shape))}" if shape else "")
  return Extractor("medicalnet", version, 512 * (4 if spec.block == "bottleneck" else 1),
                   f"each volume z-scored over its voxels, {size}; global average pool of layer4",
                   apply, variables, batch_size)


# ---------------------------------------------------------------------------------------------
# slice2d: a 2D ResNet on every slice, features averaged over slices
# ---------------------------------------------------------------------------------------------
def _slice2d(weights, batch_size: int, image_size, intensity_range, mean, std) -> Extractor:
  spec, model, variables, arch, digest = _load_resnet(weights, 2, dilated=False)
  c = spec.in_channels
  if mean is None:
    mean = IMAGENET_MEAN if c == 3 else (float(np.mean(IMAGENET_MEAN)),) * c
  if std is None:
    std = IMAGENET_STD if c == 3 else (float(np.mean(IMAGENET_STD)),) * c
  if len(mean) != c or len(std) != c:
    raise ConfigError(f"mean {tuple(mean)} and std {tuple(std)} need one value per input channel ({c})")
  lo, hi = (float(v) for v in intensity_range)
  if not hi > lo:
    raise ConfigError(f"intensity_range must be (low, high) with high > low, got {tuple(intensity_range)}")
  mean_a, std_a = jnp.asarray(mean, jnp.float32), jnp.asarray(std, jnp.float32)

  @jax.jit
  def apply(v, volumes):
    b, d, h, w = volumes.shape
    slices = jnp.clip((volumes.astype(jnp.float32).reshape(b * d, h, w) - lo) / (hi - lo), 0.0, 1.0)
    if image_size:
      slices = _resize(slices, (image_size, image_size))
    x = (slices[..., None] - mean_a) / std_a  # Broadcast the grey slice to every channel.
    return model.apply(v, x).reshape(b, d, -1).mean(axis=1)

  size = f"{image_size}x{image_size}" if image_size else "native size"
  version = (f"slice2d-{arch}-{digest}-{size}-range{lo:g},{hi:g}-mean{','.join(f'{m:g}' for m in mean)}"
             f"-std{','.join(f'{s:g}' for s in std)}")
  return Extractor("slice2d", version, 512 * (4 if spec.block == "bottleneck" else 1),
                   f"each slice mapped from [{lo:g}, {hi:g}] to [0, 1], resized to {size} (bilinear), "
                   f"{c} channel(s) normalised by mean {tuple(mean)} std {tuple(std)}; layer4 pooled, "
                   "averaged over slices", apply, variables, batch_size)
