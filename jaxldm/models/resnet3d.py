"""ResNets for feature extraction from pretrained PyTorch weights: MedicalNet (3D) and torchvision (2D).

One Flax module serves both layouts so one weight converter (`jaxldm.eval.torch_weights`) serves
both:
  * MedicalNet (Chen et al. 2019, Tencent/MedicalNet `models/resnet.py`): 1 input channel; conv1
    7x7x7 stride 2 padding 3; max-pool 3 stride 2 padding 1; layer1 (64), layer2 (128, stride 2),
    layer3 (256, stride 1, dilation 2), layer4 (512, stride 1, dilation 4); shortcut "A" (strided
    identity + zero channels) or "B" (1x1 conv + BN) wherever shape changes. ResNet-10/18/34 use
    BasicBlock with (1,1,1,1)/(2,2,2,2)/(3,4,6,3) blocks, ResNet-50 Bottleneck with (3,4,6,3).
  * torchvision ResNet-18/50 (2D): 3 input channels, the same stem, layers 2-4 strided (no
    dilation), shortcut "B", the Bottleneck stride on its 3x3 conv (v1.5).
The feature is the global average pool of layer4 (512 or 2048 channels); the segmentation head of
MedicalNet and the classifier of torchvision are not built.

BatchNorm runs in inference mode with the file's running statistics. This module is for frozen
feature extraction only: it is never trained here (and DP training refuses BatchNorm anyway).
Arrays are channels-last: (B, D, H, W, C) in 3D, (B, H, W, C) in 2D.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxldm.models.conv import Conv

WIDTHS = (64, 128, 256, 512)
EXPANSION = {"basic": 1, "bottleneck": 4}
# Depth -> (block, blocks per layer), as in MedicalNet and torchvision.
DEPTHS = {10: ("basic", (1, 1, 1, 1)), 18: ("basic", (2, 2, 2, 2)), 34: ("basic", (3, 4, 6, 3)),
          50: ("bottleneck", (3, 4, 6, 3)), 101: ("bottleneck", (3, 4, 23, 3)),
          152: ("bottleneck", (3, 8, 36, 3)), 200: ("bottleneck", (3, 24, 36, 3))}


def depth_of(block: str, layers: Sequence[int]) -> int | None:
  for depth, spec in DEPTHS.items():
    if spec == (block, tuple(layers)):
      return depth
  return None


def _bn(name: str) -> nn.BatchNorm:
  # PyTorch's BatchNorm eps; running statistics only (feature extraction).
  return nn.BatchNorm(use_running_average=True, epsilon=1e-5, name=name)


def _conv(features: int, kernel: int, dims: int, *, stride: int = 1, dilation: int = 1, name: str) -> nn.Conv:
  pad = dilation * (kernel - 1) // 2  # PyTorch's explicit symmetric padding for odd kernels.
  return Conv(features, (kernel,) * dims, strides=(stride,) * dims, padding=[(pad, pad)] * dims,
              kernel_dilation=(dilation,) * dims, use_bias=False, name=name)


class Block(nn.Module):
  """BasicBlock or Bottleneck with PyTorch's layer names (conv1, bn1, ..., downsample_conv/_bn)."""
  kind: str
  planes: int
  stride: int = 1
  dilation: int = 1
  project: bool = False    # Whether the shortcut changes shape (first block of a layer, if needed).
  shortcut: str = "B"
  dims: int = 3

  @nn.compact
  def __call__(self, x):
    d, s = self.dims, self.stride
    if self.kind == "basic":
      h = nn.relu(_bn("bn1")(_conv(self.planes, 3, d, stride=s, dilation=self.dilation, name="conv1")(x)))
      h = _bn("bn2")(_conv(self.planes, 3, d, dilation=self.dilation, name="conv2")(h))
    else:
      h = nn.relu(_bn("bn1")(_conv(self.planes, 1, d, name="conv1")(x)))
      h = nn.relu(_bn("bn2")(_conv(self.planes, 3, d, stride=s, dilation=self.dilation, name="conv2")(h)))
      h = _bn("bn3")(_conv(self.planes * 4, 1, d, name="conv3")(h))
    out_channels = self.planes * EXPANSION[self.kind]
    residual = x
    if self.project:
      if self.shortcut == "A":
        # MedicalNet's downsample_basic_block: avg_pool(kernel 1, stride s) == subsampling, then zeros.
        residual = x[(slice(None),) + (slice(None, None, s),) * d]
        pad = out_channels - residual.shape[-1]
        residual = jnp.pad(residual, [(0, 0)] * (d + 1) + [(0, pad)])
      else:
        residual = _bn("downsample_bn")(_conv(out_channels, 1, d, stride=s, name="downsample_conv")(x))
    return nn.relu(h + residual)


class ResNet(nn.Module):
  """(B, *spatial, in_channels) -> (B, 512 * expansion) global-average-pooled layer4 features."""
  block: str = "basic"
  layers: Sequence[int] = (1, 1, 1, 1)
  shortcut: str = "B"
  dims: int = 3
  dilated: bool = True     # MedicalNet: layer3/4 stride 1, dilation 2/4. torchvision: all strided.

  @nn.compact
  def __call__(self, x) -> jax.Array:
    if self.block not in EXPANSION:
      raise ValueError(f"block must be one of {sorted(EXPANSION)}, got {self.block!r}")
    if self.shortcut not in ("A", "B"):
      raise ValueError(f"shortcut must be 'A' or 'B', got {self.shortcut!r}")
    d = self.dims
    x = nn.relu(_bn("bn1")(_conv(64, 7, d, stride=2, name="conv1")(x)))
    x = nn.max_pool(x, (3,) * d, strides=(2,) * d, padding=[(1, 1)] * d)
    inplanes = 64
    for i, (planes, blocks) in enumerate(zip(WIDTHS, self.layers)):
      if self.dilated:
        stride, dilation = ((1, 1), (2, 1), (1, 2), (1, 4))[i]
      else:
        stride, dilation = (1 if i == 0 else 2), 1
      out_channels = planes * EXPANSION[self.block]
      for j in range(blocks):
        first = j == 0
        x = Block(self.block, planes, stride=stride if first else 1, dilation=dilation,
                  project=first and (stride != 1 or inplanes != out_channels), shortcut=self.shortcut,
                  dims=d, name=f"layer{i + 1}_{j}")(x)
        inplanes = out_channels
    return x.mean(axis=tuple(range(1, d + 1)))


def medicalnet_resnet(depth: int, shortcut: str = "B") -> ResNet:
  """MedicalNet's ResNet-`depth` (10, 18, 34, 50, ...): 3D, dilated layers 3 and 4."""
  if depth not in DEPTHS:
    raise ValueError(f"depth must be one of {sorted(DEPTHS)}, got {depth}")
  block, layers = DEPTHS[depth]
  return ResNet(block=block, layers=layers, shortcut=shortcut, dims=3, dilated=True)


def torchvision_resnet(depth: int) -> ResNet:
  """torchvision's 2D ResNet-`depth` (18, 34, 50, ...): strided layers, projection shortcuts."""
  if depth not in DEPTHS or depth == 10:
    raise ValueError(f"depth must be one of {sorted(set(DEPTHS) - {10})}, got {depth}")
  block, layers = DEPTHS[depth]
  return ResNet(block=block, layers=layers, shortcut="B", dims=2, dilated=False)
