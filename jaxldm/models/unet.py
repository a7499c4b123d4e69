"""Attribute-conditioned latent UNet (Daum et al. 2024) and its attribute encoder.

At the configured levels each attention block does, in order: spatial self-attention within each
slice, self-attention across slices (with a slice-index embedding), an MLP, and cross-attention to
the attribute tokens. Attributes: each one gets its own Linear(1 -> token_dim) + SELU, the tokens are
mixed by one self-attention layer. With `attribute_embedding`, the attribute vector (values and
mask) also goes through a two-layer MLP whose output is added to the timestep embedding, so every
residual block sees the condition (as a class embedding does in ADM-style UNets), not only the
blocks at the attention levels; its output layer starts at zero. A missing attribute is masked out
of attention (never encoded as a magic value); a learned null token is always attendable, so an
all-missing condition (classifier-free guidance's unconditional branch) is well defined.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxldm.models.conv import Conv
from jaxldm.models.layers import (Attention, Downsample, Norm, ResBlock3D, Triple, Upsample,
                                  sinusoidal_embedding, swish)


class AttributeEncoder(nn.Module):
  """(B, A) values + (B, A) mask -> (B, 1 + A, context_dim) tokens and their (B, 1 + A) mask."""
  num_attributes: int
  context_dim: int = 64
  token_dim: int = 16
  heads: int = 4
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, values, mask):
    a = self.num_attributes
    # A separate Linear(1 -> token_dim) per attribute, as one (A, token_dim) weight.
    w = self.param("embed_kernel", nn.initializers.normal(1.0), (a, self.token_dim))
    b = self.param("embed_bias", nn.initializers.zeros, (a, self.token_dim))
    values = jnp.where(mask > 0, values, 0.0).astype(self.dtype)
    tokens = nn.selu(values[..., None] * w + b)
    tokens = nn.Dense(self.context_dim, dtype=self.dtype, name="proj")(tokens)
    null = self.param("null_token", nn.initializers.normal(0.02), (1, 1, self.context_dim))
    tokens = jnp.concatenate([jnp.broadcast_to(null, (tokens.shape[0], 1, self.context_dim)).astype(tokens.dtype),
                              tokens], axis=1)
    mask = jnp.concatenate([jnp.ones((mask.shape[0], 1), mask.dtype), mask], axis=1)
    tokens = tokens + Attention(self.heads, dtype=self.dtype, name="mix")(
        nn.LayerNorm(dtype=self.dtype)(tokens), mask=mask)
    return nn.LayerNorm(dtype=self.dtype, name="out_norm")(tokens), mask


class AttributeEmbedding(nn.Module):
  """(B, A) values + (B, A) mask -> (B, dim): added to the timestep embedding.

  The input is the masked values next to the mask, so a missing attribute and a value of 0 differ;
  the all-missing condition (classifier-free guidance's unconditional branch) maps to a learned
  constant. The output layer is zero-initialised: at initialisation the UNet is unchanged.
  """
  dim: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, values, mask):
    x = jnp.concatenate([jnp.where(mask > 0, values, 0.0), mask], axis=-1).astype(self.dtype)
    h = nn.swish(nn.Dense(self.dim, dtype=self.dtype, name="hidden")(x))
    return nn.Dense(self.dim, dtype=self.dtype, kernel_init=nn.initializers.zeros, name="out")(h)


class AttentionBlock3D(nn.Module):
  """Spatial attention, slice attention, MLP, cross-attention: each pre-norm and residual."""
  heads: int = 4
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, context=None, context_mask=None):
    b, d, h, w, c = x.shape
    ln = lambda name: nn.LayerNorm(dtype=self.dtype, name=name)  # Per token: no batch coupling.
    # 1. Spatial self-attention: the H*W positions of each slice.
    tokens = x.reshape(b, d, h * w, c)
    tokens = tokens + Attention(self.heads, dtype=self.dtype, name="spatial")(ln("ln_spatial")(tokens))
    # 2. Self-attention across slices, told which slice is which.
    slice_emb = nn.Dense(c, dtype=self.dtype, name="slice_emb")(sinusoidal_embedding(jnp.arange(d), c))
    tokens = tokens + Attention(self.heads, dtype=self.dtype, token_axis=-3, name="slices")(
        ln("ln_slices")(tokens) + slice_emb[:, None].astype(tokens.dtype))
    tokens = tokens.reshape(b, d * h * w, c)
    # 3. MLP.
    hidden = nn.gelu(nn.Dense(4 * c, dtype=self.dtype, name="mlp_in")(ln("ln_mlp")(tokens)))
    tokens = tokens + nn.Dense(c, dtype=self.dtype, kernel_init=nn.initializers.zeros, name="mlp_out")(hidden)
    # 4. Cross-attention to the attribute tokens.
    if context is not None:
      tokens = tokens + Attention(self.heads, dtype=self.dtype, name="cross")(
          ln("ln_cross")(tokens), context=context, mask=context_mask)
    return tokens.reshape(b, d, h, w, c)


class LatentUNet(nn.Module):
  """Epsilon/v-prediction UNet on latents (B, D, H, W, Z), conditioned on timestep and attributes."""
  out_channels: int = 4
  base_channels: int = 128
  channel_mult: Sequence[int] = (1, 2, 3)
  num_res_blocks: int = 2
  attention_levels: Sequence[int] = (1, 2)   # Level indices with attention blocks (0 = full res).
  mid_attention: bool = True
  heads: int = 4
  kernel: Triple = (3, 3, 3)
  stride: Triple = (1, 2, 2)
  num_attributes: int = 0                     # 0: unconditional (no cross-attention).
  context_dim: int = 64
  attribute_embedding: bool = False           # Attributes also added to the timestep embedding.
  dropout: float = 0.0
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, t, attributes=None, attribute_mask=None, *, deterministic: bool = True):
    temb_dim = 4 * self.base_channels
    temb = sinusoidal_embedding(t, self.base_channels)
    temb = nn.Dense(temb_dim, dtype=self.dtype, name="time_in")(temb)
    temb = nn.Dense(temb_dim, dtype=self.dtype, name="time_out")(nn.swish(temb))

    context = context_mask = None
    if self.num_attributes > 0:
      if attributes is None:
        attributes = jnp.zeros((x.shape[0], self.num_attributes), jnp.float32)
        attribute_mask = jnp.zeros_like(attributes)
      elif attribute_mask is None:
        attribute_mask = jnp.ones_like(attributes)
      context, context_mask = AttributeEncoder(self.num_attributes, self.context_dim, heads=self.heads,
                                               dtype=self.dtype, name="attributes")(attributes, attribute_mask)
      if self.attribute_embedding:
        temb = temb + AttributeEmbedding(temb_dim, dtype=self.dtype, name="attribute_embedding")(
            attributes, attribute_mask)

    res = lambda ch: ResBlock3D(ch, self.kernel, self.dropout, dtype=self.dtype)
    attn = lambda: AttentionBlock3D(self.heads, dtype=self.dtype)
    chans = [self.base_channels * m for m in self.channel_mult]

    h = Conv(chans[0], self.kernel, padding="SAME", dtype=self.dtype, name="conv_in")(x.astype(self.dtype))
    skips = [h]
    for level, ch in enumerate(chans):
      for _ in range(self.num_res_blocks):
        h = res(ch)(h, temb, deterministic=deterministic)
        if level in self.attention_levels:
          h = attn()(h, context, context_mask)
        skips.append(h)
      if level < len(chans) - 1:
        h = Downsample(ch, self.stride, self.kernel, dtype=self.dtype)(h)
        skips.append(h)

    h = res(chans[-1])(h, temb, deterministic=deterministic)
    if self.mid_attention:
      h = attn()(h, context, context_mask)
    h = res(chans[-1])(h, temb, deterministic=deterministic)

    for level in reversed(range(len(chans))):
      for _ in range(self.num_res_blocks + 1):
        h = res(chans[level])(jnp.concatenate([h, skips.pop()], axis=-1), temb, deterministic=deterministic)
        if level in self.attention_levels:
          h = attn()(h, context, context_mask)
      if level > 0:
        h = Upsample(chans[level], self.stride, self.kernel, dtype=self.dtype)(h)

    h = swish(Norm(dtype=self.dtype)(h))
    out = Conv(self.out_channels, self.kernel, padding="SAME", dtype=self.dtype,
                  kernel_init=nn.initializers.zeros, name="conv_out")(h)
    return out.astype(jnp.float32)


def check_shape(shape: Sequence[int], stride: Triple, levels: int) -> None:
  """Each spatial size must divide by the total down-sampling, or skip connections misalign."""
  for axis, (size, s) in enumerate(zip(shape, stride)):
    factor = s ** (levels - 1)
    if size % factor:
      raise ValueError(f"latent axis {axis} has size {size}, not divisible by the UNet's total "
                       f"down-sampling {factor}; change the data shape or the UNet's channel_mult/stride")
