"""3D KL autoencoder (the first stage of the latent diffusion model) and a 3D PatchGAN critic.

The autoencoder compresses (D, H, W, 1) volumes to (D', H', W', latent_channels) latents with a
diagonal Gaussian posterior. For thick-slice short-axis MRI (Daum et al. 2024) kernels are in-plane
(1, 3, 3) and strides (1, 2, 2): only H and W shrink. For isotropic data use 3x3x3 and 2x2x2.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxldm.models.conv import Conv
from jaxldm.models.layers import Attention, Downsample, Norm, ResBlock3D, Triple, Upsample, swish


class Posterior(NamedTuple):
  mean: jax.Array     # [B, D', H', W', Z]
  logvar: jax.Array   # [B, D', H', W', Z]


class Encoder(nn.Module):
  channels: Sequence[int] = (32, 64, 128)
  num_res_blocks: int = 1
  latent_channels: int = 4
  kernel: Triple = (1, 3, 3)
  stride: Triple = (1, 2, 2)
  attention: bool = False
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x) -> Posterior:
    h = Conv(self.channels[0], self.kernel, padding="SAME", dtype=self.dtype, name="conv_in")(x)
    for level, ch in enumerate(self.channels):
      for _ in range(self.num_res_blocks):
        h = ResBlock3D(ch, self.kernel, dtype=self.dtype)(h)
      if level < len(self.channels) - 1:
        h = Downsample(ch, self.stride, self.kernel, dtype=self.dtype)(h)
    h = ResBlock3D(self.channels[-1], self.kernel, dtype=self.dtype)(h)
    if self.attention:
      h = h + _volume_attention(h, self.dtype)
    h = ResBlock3D(self.channels[-1], self.kernel, dtype=self.dtype)(h)
    h = swish(Norm(dtype=self.dtype)(h))
    moments = Conv(2 * self.latent_channels, self.kernel, padding="SAME", dtype=self.dtype,
                      name="conv_out")(h).astype(jnp.float32)
    mean, logvar = jnp.split(moments, 2, axis=-1)
    return Posterior(mean, jnp.clip(logvar, -30.0, 20.0))


class Decoder(nn.Module):
  channels: Sequence[int] = (32, 64, 128)
  num_res_blocks: int = 1
  out_channels: int = 1
  kernel: Triple = (1, 3, 3)
  stride: Triple = (1, 2, 2)
  attention: bool = False
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, z):
    h = Conv(self.channels[-1], self.kernel, padding="SAME", dtype=self.dtype, name="conv_in")(z)
    h = ResBlock3D(self.channels[-1], self.kernel, dtype=self.dtype)(h)
    if self.attention:
      h = h + _volume_attention(h, self.dtype)
    h = ResBlock3D(self.channels[-1], self.kernel, dtype=self.dtype)(h)
    for level in reversed(range(len(self.channels))):
      for _ in range(self.num_res_blocks + 1):
        h = ResBlock3D(self.channels[level], self.kernel, dtype=self.dtype)(h)
      if level > 0:
        h = Upsample(self.channels[level - 1], self.stride, self.kernel, dtype=self.dtype)(h)
    h = swish(Norm(dtype=self.dtype)(h))
    return Conv(self.out_channels, self.kernel, padding="SAME", dtype=self.dtype,
                   name="conv_out")(h).astype(jnp.float32)


def _volume_attention(h, dtype):
  """Self-attention over all voxels of the (small) lowest-resolution feature map."""
  b, d, hh, w, c = h.shape
  tokens = Norm(dtype=dtype)(h).reshape(b, d * hh * w, c)
  return Attention(heads=1, dtype=dtype, name="mid_attention")(tokens).reshape(b, d, hh, w, c)


class AutoencoderKL(nn.Module):
  """Encoder -> Gaussian posterior -> decoder. `key=None` decodes the posterior mean."""
  channels: Sequence[int] = (32, 64, 128)
  num_res_blocks: int = 1
  latent_channels: int = 4
  kernel: Triple = (1, 3, 3)
  stride: Triple = (1, 2, 2)
  attention: bool = False
  dtype: jnp.dtype = jnp.float32

  def setup(self):
    kw = dict(channels=self.channels, num_res_blocks=self.num_res_blocks, kernel=self.kernel,
              stride=self.stride, attention=self.attention, dtype=self.dtype)
    self.encoder = Encoder(latent_channels=self.latent_channels, **kw)
    self.decoder = Decoder(out_channels=1, **kw)

  def encode(self, x) -> Posterior:
    return self.encoder(x)

  def decode(self, z):
    return self.decoder(z)

  def __call__(self, x, key=None):
    posterior = self.encode(x)
    z = posterior.mean
    if key is not None:
      z = z + jnp.exp(0.5 * posterior.logvar) * jax.random.normal(key, z.shape, z.dtype)
    return self.decode(z), posterior

  @property
  def downsampling(self) -> Triple:
    n = len(self.channels) - 1
    return tuple(s ** n for s in self.stride)  # type: ignore[return-value]


def kl_divergence(posterior: Posterior) -> jax.Array:
  """KL(q(z|x) || N(0, I)) summed over latent elements, per example: [B]."""
  kl = 0.5 * (jnp.square(posterior.mean) + jnp.exp(posterior.logvar) - 1.0 - posterior.logvar)
  return kl.reshape(kl.shape[0], -1).sum(-1)


class PatchDiscriminator3D(nn.Module):
  """3D PatchGAN critic: one real/fake logit per receptive-field patch. GroupNorm, no BatchNorm."""
  channels: Sequence[int] = (32, 64, 128)
  kernel: Triple = (1, 4, 4)
  stride: Triple = (1, 2, 2)
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    h = x
    for i, ch in enumerate(self.channels):
      h = Conv(ch, self.kernel, strides=self.stride, padding="SAME", dtype=self.dtype)(h)
      if i > 0:
        h = Norm(dtype=self.dtype)(h)
      h = nn.leaky_relu(h, 0.2)
    return Conv(1, self.kernel, padding="SAME", dtype=self.dtype, name="logits")(h).astype(jnp.float32)
