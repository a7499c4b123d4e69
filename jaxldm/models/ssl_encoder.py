"""A small self-supervised 3D encoder for memorization detection and feature statistics (Dar et al. 2023).

Trained contrastively (NT-Xent, `jaxldm/train/ssl.py`) so that a volume and an augmented copy of it
map close together and different volumes apart. The EMBEDDING (the global average pool of the last
feature map, before the projection head) is the feature used downstream: SimCLR found the layer
before the head keeps more information than the head's output, which the contrastive loss makes
invariant to everything the augmentations change.

Built like the autoencoder's encoder (per-axis kernels and strides, GroupNorm only) so thick-slice
MRI uses in-plane (1, 3, 3) kernels and (1, 2, 2) strides, and so the same per-example code could be
trained with DP-SGD on private data if one wanted to.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxldm.models.conv import Conv
from jaxldm.models.layers import Downsample, Norm, ResBlock3D, Triple, swish


class SSLEncoder(nn.Module):
  """(B, D, H, W, 1) volumes -> (embedding [B, channels[-1]], projection [B, projection_dim])."""
  channels: Sequence[int] = (16, 32, 64)
  num_res_blocks: int = 1
  kernel: Triple = (1, 3, 3)
  stride: Triple = (1, 2, 2)
  projection_dim: int = 64
  dtype: jnp.dtype = jnp.float32

  def setup(self):
    self.conv_in = Conv(self.channels[0], self.kernel, padding="SAME", dtype=self.dtype)
    blocks, downs = [], []
    for level, ch in enumerate(self.channels):
      blocks.append([ResBlock3D(ch, self.kernel, dtype=self.dtype) for _ in range(self.num_res_blocks)])
      if level < len(self.channels) - 1:
        downs.append(Downsample(self.channels[level + 1], self.stride, self.kernel, dtype=self.dtype))
    self.blocks, self.downs = blocks, downs
    self.norm_out = Norm(dtype=self.dtype)
    # Projection head (SimCLR): only the contrastive loss sees its output.
    self.head_hidden = nn.Dense(self.channels[-1], dtype=self.dtype)
    self.head_out = nn.Dense(self.projection_dim, dtype=self.dtype)

  def embed(self, x) -> jax.Array:
    """The frozen feature: global average pool of the last feature map, float32 [B, channels[-1]]."""
    h = self.conv_in(x)
    for level, level_blocks in enumerate(self.blocks):
      for block in level_blocks:
        h = block(h)
      if level < len(self.downs):
        h = self.downs[level](h)
    h = swish(self.norm_out(h))
    return h.astype(jnp.float32).mean(axis=(1, 2, 3))

  def project(self, embedding) -> jax.Array:
    return self.head_out(nn.relu(self.head_hidden(embedding))).astype(jnp.float32)

  def __call__(self, x) -> tuple[jax.Array, jax.Array]:
    embedding = self.embed(x)
    return embedding, self.project(embedding)
