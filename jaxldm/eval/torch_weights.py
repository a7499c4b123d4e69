"""PyTorch ResNet weight files (MedicalNet 3D, torchvision 2D) -> Flax variables for `models.resnet3d`.

torch is imported lazily, here only: it is needed once, to read the user's `.pth` file, and is
never a dependency of training or sampling (`pip install torch`, a CPU wheel is enough).

The architecture is read from the file rather than asked of the user: the dimensionality from
conv1's kernel, Basic vs Bottleneck blocks from the presence of conv3, the blocks per layer by
counting, shortcut "B" (1x1 conv + BN) vs "A" (MedicalNet's strided identity + zero channels) from
the presence of `downsample` weights. A file the module cannot consume completely (a missing key,
a shape mismatch) is refused with the key named, so a half-loaded network never produces features.
"""

from __future__ import annotations

import hashlib
import os
import re
from typing import Any, NamedTuple

import numpy as np

from jaxldm.config import ConfigError
from jaxldm.models.resnet3d import ResNet, depth_of


class ResNetSpec(NamedTuple):
  dims: int                # 3 (MedicalNet) or 2 (torchvision).
  block: str               # "basic" or "bottleneck".
  layers: tuple[int, ...]  # Blocks per layer (4 layers).
  shortcut: str            # "A" or "B".
  in_channels: int         # conv1's input channels (1 for MedicalNet, 3 for ImageNet nets).

  @property
  def depth(self) -> int | None:
    return depth_of(self.block, self.layers)

  def build(self, *, dilated: bool) -> ResNet:
    return ResNet(block=self.block, layers=self.layers, shortcut=self.shortcut, dims=self.dims, dilated=dilated)


def file_digest(path: str | os.PathLike) -> str:
  """sha256 of a weight file (first 16 hex digits): the extractor's version names its weights."""
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      digest.update(chunk)
  return digest.hexdigest()[:16]


def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """A PyTorch state dict file as {name: float32/int array}, `module.` (DataParallel) prefixes removed.

  Accepts a bare state dict or a checkpoint dict holding one under "state_dict" (MedicalNet's
  files) or "model". Read with weights_only=True: a weight file cannot run code on load.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise ConfigError(f"weight file {path} does not exist; pass the path to a PyTorch state dict (.pth)")
  try:
    import torch
  except ImportError as e:
    raise ConfigError(f"reading {path} needs PyTorch, which is optional: pip install torch (the CPU "
                      "wheel is enough)") from e
  try:
    obj = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # torch raises several types (pickle, zip, safety refusals).
    raise ConfigError(f"{path} is not a readable PyTorch weight file: {str(e)[:300]}") from e
  for key in ("state_dict", "model"):
    if isinstance(obj, dict) and isinstance(obj.get(key), dict):
      obj = obj[key]
  if not isinstance(obj, dict):
    raise ConfigError(f"{path} holds a {type(obj).__name__}, not a state dict (a dict of tensors)")
  out = {}
  for name, value in obj.items():
    if not torch.is_tensor(value):
      continue
    while name.startswith("module."):
      name = name[len("module."):]
    value = value.detach().cpu()
    out[name] = (value.float() if value.is_floating_point() else value).numpy()
  if not out:
    raise ConfigError(f"{path} contains no tensors")
  return out


def infer_resnet(state: dict[str, np.ndarray], source: str = "the weight file") -> ResNetSpec:
  """The ResNet layout a state dict describes (see the module docstring)."""
  if "conv1.weight" not in state:
    raise ConfigError(f"{source} has no 'conv1.weight': not a MedicalNet/torchvision ResNet state dict "
                      f"(first keys: {', '.join(list(state)[:5])})")
  conv1 = state["conv1.weight"]
  dims = conv1.ndim - 2
  if dims not in (2, 3) or conv1.shape[0] != 64:
    raise ConfigError(f"{source}: conv1.weight has shape {conv1.shape}; expected (64, C, 7, 7[, 7])")
  layers = []
  for i in range(1, 5):
    blocks = {int(m.group(1)) for k in state if (m := re.match(rf"layer{i}\.(\d+)\.", k))}
    if not blocks or blocks != set(range(len(blocks))):
      raise ConfigError(f"{source}: layer{i} blocks {sorted(blocks)} are missing or not numbered 0..n-1")
    layers.append(len(blocks))
  block = "bottleneck" if "layer1.0.conv3.weight" in state else "basic"
  shortcut = "B" if any(k.startswith("layer2.0.downsample.") for k in state) else "A"
  return ResNetSpec(dims, block, tuple(layers), shortcut, int(conv1.shape[1]))


def _torch_name(flax_path: tuple[str, ...], collection: str) -> str:
  """Flax variable path -> PyTorch state dict key."""
  *modules, leaf = flax_path
  parts = []
  for m in modules:
    if (layer := re.fullmatch(r"(layer\d)_(\d+)", m)):
      parts += [layer.group(1), layer.group(2)]
    elif m == "downsample_conv":
      parts.append("downsample.0")
    elif m == "downsample_bn":
      parts.append("downsample.1")
    else:
      parts.append(m)
  torch_leaf = {("params", "kernel"): "weight", ("params", "scale"): "weight", ("params", "bias"): "bias",
                ("batch_stats", "mean"): "running_mean", ("batch_stats", "var"): "running_var"}[(collection, leaf)]
  return ".".join(parts + [torch_leaf])


def resnet_variables(state: dict[str, np.ndarray], model: ResNet, source: str = "the weight file") -> dict[str, Any]:
  """Flax variables {"params", "batch_stats"} of `model` filled from a PyTorch state dict.

  Conv weights (O, I, *k) become (*k, I, O); BN weight/bias -> scale/bias, running_mean/var ->
  mean/var. Every variable of the model must be in the file with the right shape; keys of the
  file the model does not use (MedicalNet's conv_seg head, torchvision's fc) are ignored.
  """
  import jax
  import jax.numpy as jnp

  dummy = jnp.zeros((1,) + (32,) * model.dims + (state["conv1.weight"].shape[1],), jnp.float32)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), dummy)
  out: dict[str, Any] = {}
  for collection, tree in shapes.items():
    flat = {}
    for path, target in jax.tree_util.tree_flatten_with_path(tree)[0]:
      names = tuple(str(getattr(p, "key", p)) for p in path)
      key = _torch_name(names, collection)
      if key not in state:
        raise ConfigError(f"{source} lacks {key!r}, which a {model.block} ResNet with layers "
                          f"{tuple(model.layers)} and shortcut {model.shortcut} needs")
      value = np.asarray(state[key], np.float32)
      if names[-1] == "kernel":
        value = np.transpose(value, tuple(range(2, value.ndim)) + (1, 0))
      if value.shape != tuple(target.shape):
        raise ConfigError(f"{source}: {key!r} has shape {state[key].shape}, the model expects "
                          f"{tuple(target.shape)} (after the layout change)")
      flat[names] = jax.device_put(value)  # A transfer; jnp.asarray compiles a program per shape.
    out[collection] = _unflatten(flat)
  return out


def _unflatten(flat: dict[tuple[str, ...], Any]) -> dict:
  tree: dict = {}
  for names, value in flat.items():
    node = tree
    for name in names[:-1]:
      node = node.setdefault(name, {})
    node[names[-1]] = value
  return tree
