"""Peer benchmark: the same UNet / autoencoder in PyTorch, plain and under Opacus.

  jaxldm bench compare --model unet --config ldm:tiny --batch 8     # both, back to back
  python scripts/bench_opacus.py --model unet --config ldm:tiny --batch 8,16 \
      --json benchmarks/cpu_unet_tiny_opacus.json                           # this side alone

Needs torch and opacus (`pip install -e '.[bench]'`); importing this module without them raises
ImportError (`require_torch` turns that into one readable line). `--device cuda` runs on a GPU
(default: cuda when torch sees one, else cpu).

Why a PyTorch port: "DP costs x over non-private" only means something next to what the usual tool
costs on the same network. The modules below rebuild jaxldm's Flax models layer for layer from the
same config (parameter counts are printed side by side and must be equal), the losses are the same
per-example losses (UNet: epsilon/v-prediction MSE averaged over K (t, noise) draws, linear betas,
condition dropout; autoencoder: L1 + kl_weight * KL per voxel, no critic) and the data is the same
random batch (`jaxldm.bench.grads.Target.make_batch`).

Modes (each times forward + backward + [per-sample clip + noise], never an optimizer update):
  nonprivate        plain PyTorch: backward of the batch mean loss;
  opacus_functorch  `GradSampleModule` with grad_sample_mode="functorch" (Opacus 1.6: every layer's
                    per-sample gradient by `torch.func.vmap(grad(...))` of that layer, fed by the
                    activations/backprops its hooks captured);
  opacus_hooks      grad_sample_mode="hooks": Opacus's hand-written grad samplers (Linear, Conv3d,
                    GroupNorm, LayerNorm; the two custom parameter layers below register their own;
                    without them Opacus 1.6 would quietly fall back to functorch for those layers).
After backward the DP modes do what `DPOptimizer.pre_step` does (checked against it in the test):
per-example L2 norm over all parameters, clip to C = 1, sum, add N(0, (sigma C)^2) once with
sigma = 1, divide by B. Written out here rather than called because with noise multiplicity K > 1
the model sees B*K rows and the K rows of an example must be summed BEFORE clipping (one example
= one privacy unit, as in jaxldm); with K = 1 it is exactly DPOptimizer's arithmetic.

Timing mirrors `jaxldm bench grads`: the first call of each mode is reported as "compile_s" (PyTorch
has no compile step; it is the cold call), `--warmup` untimed calls, then the modes alternate in
each of `--repeats` rounds and the median wall time is `step_s`. Threads: `torch.set_num_threads`,
default all cores. Everything runs in float32 (a bfloat16 config is reported as float32 here).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import math
import os
import pathlib
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# The first layer's input (data) needs no gradient, so its full backward hook fires on the output
# gradient alone: expected, and what Opacus's per-sample gradient of that layer uses.
warnings.filterwarnings("ignore", message="Full backward hook is firing")

from jaxldm import hostmem  # noqa: E402
from jaxldm.config import ConfigError, load_config, split_override_args  # noqa: E402
from jaxldm.models.layers import as_triple, num_groups  # noqa: E402

MODES = ("nonprivate", "opacus_functorch", "opacus_hooks")
MODELS = ("unet", "autoencoder")


# ---------------------------------------------------------------------------------------------
# Layers (channels-first (B, C, D, H, W) tensors; jaxldm's are channels-last, same maths)
# ---------------------------------------------------------------------------------------------
def _same_pads(size: int, kernel: int, stride: int) -> tuple[int, int]:
  """JAX's SAME padding: out = ceil(size / stride), the odd pixel goes to the HIGH side."""
  out = -(-size // stride)
  total = max((out - 1) * stride + kernel - size, 0)
  return total // 2, total - total // 2


class SameConv3d(nn.Module):
  """Conv3d with JAX's "SAME" padding.

  A wrapper (no parameters of its own) around a plain nn.Conv3d, so Opacus's conv grad sampler sees
  the already padded input; symmetric cases (stride 1, odd kernel) use Conv3d's own padding.
  """

  def __init__(self, cin: int, cout: int, kernel, stride=(1, 1, 1), *, zero_init: bool = False):
    super().__init__()
    self.kernel, self.stride = as_triple(kernel), as_triple(stride)
    self.symmetric = all(s == 1 and k % 2 for k, s in zip(self.kernel, self.stride))
    padding = tuple((k - 1) // 2 for k in self.kernel) if self.symmetric else 0
    self.conv = nn.Conv3d(cin, cout, self.kernel, self.stride, padding=padding)
    if zero_init:
      nn.init.zeros_(self.conv.weight)
      nn.init.zeros_(self.conv.bias)

  def forward(self, x):
    if not self.symmetric:
      pads = []
      for size, k, s in reversed(list(zip(x.shape[2:], self.kernel, self.stride))):
        pads.extend(_same_pads(size, k, s))  # F.pad lists the LAST axis first.
      x = F.pad(x, pads)
    return self.conv(x)


def group_norm(channels: int) -> nn.GroupNorm:
  return nn.GroupNorm(num_groups(channels), channels, eps=1e-6)  # Flax GroupNorm: eps 1e-6.


def layer_norm(channels: int) -> nn.LayerNorm:
  return nn.LayerNorm(channels, eps=1e-6)  # Flax LayerNorm: eps 1e-6.


def zero_linear(cin: int, cout: int) -> nn.Linear:
  layer = nn.Linear(cin, cout)
  nn.init.zeros_(layer.weight)
  nn.init.zeros_(layer.bias)
  return layer


def sinusoidal_embedding(values: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
  """jaxldm.models.layers.sinusoidal_embedding: (...,) -> (..., dim)."""
  half = dim // 2
  freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=values.device) / half)
  args = values.float()[..., None] * freqs
  emb = torch.cat([torch.sin(args), torch.cos(args)], dim=-1)
  return F.pad(emb, (0, 1)) if dim % 2 else emb


class ResBlock3D(nn.Module):
  """jaxldm.models.layers.ResBlock3D: pre-activation, timestep scale/shift, zero-init conv2, 1x1 skip."""

  def __init__(self, cin: int, cout: int, kernel, emb_dim: int | None = None):
    super().__init__()
    self.norm1, self.conv1 = group_norm(cin), SameConv3d(cin, cout, kernel)
    self.emb_proj = nn.Linear(emb_dim, 2 * cout) if emb_dim else None
    self.norm2 = group_norm(cout)
    self.conv2 = SameConv3d(cout, cout, kernel, zero_init=True)
    self.skip = SameConv3d(cin, cout, (1, 1, 1)) if cin != cout else None

  def forward(self, x, emb=None):
    h = self.conv1(F.silu(self.norm1(x)))
    h = self.norm2(h)
    if self.emb_proj is not None:
      scale, shift = self.emb_proj(F.silu(emb))[:, :, None, None, None].chunk(2, dim=1)
      h = h * (1 + scale) + shift
    h = self.conv2(F.silu(h))
    return (self.skip(x) if self.skip is not None else x) + h


class Downsample(nn.Module):
  def __init__(self, cin: int, cout: int, stride, kernel):
    super().__init__()
    self.conv = SameConv3d(cin, cout, kernel, stride)

  def forward(self, x):
    return self.conv(x)


class Upsample(nn.Module):
  """Nearest-neighbour repeat by `stride` per axis, then a SAME conv."""

  def __init__(self, cin: int, cout: int, stride, kernel):
    super().__init__()
    self.stride = as_triple(stride)
    self.conv = SameConv3d(cin, cout, kernel)

  def forward(self, x):
    for axis, s in zip((2, 3, 4), self.stride):
      if s > 1:
        x = torch.repeat_interleave(x, s, dim=axis)
    return self.conv(x)


class Attention(nn.Module):
  """jaxldm.models.layers.Attention with plain nn.Linear q/k/v/out (Opacus-supported layers).

  Flax's DenseGeneral((heads, head_dim)) has the parameter count of Linear(C_in, C); heads =
  gcd(heads, C) as in jaxldm. The scores use torch's fused scaled_dot_product_attention.
  """

  def __init__(self, channels: int, context_channels: int | None = None, heads: int = 4):
    super().__init__()
    context_channels = context_channels or channels
    self.heads = math.gcd(heads, channels)
    self.q = nn.Linear(channels, channels)
    self.k = nn.Linear(context_channels, channels)
    self.v = nn.Linear(context_channels, channels)
    self.out = zero_linear(channels, channels)

  def forward(self, x, context=None, mask=None):
    """x (..., Tq, C); context (..., Tk, Ck) defaults to x; mask (..., Tk), 1 = attend."""
    context = x if context is None else context
    lead, tq, c = x.shape[:-2], x.shape[-2], x.shape[-1]
    tk, h = context.shape[-2], self.heads
    split = lambda t, n: t.reshape(-1, n, h, c // h).transpose(1, 2)  # (N, heads, T, head_dim)
    q, k, v = split(self.q(x), tq), split(self.k(context), tk), split(self.v(context), tk)
    attn_mask = None if mask is None else (mask.reshape(-1, 1, 1, tk) > 0)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
    return self.out(out.transpose(1, 2).reshape(*lead, tq, c))


class AttributeEmbed(nn.Module):
  """A separate Linear(1 -> token_dim) per attribute, as one (A, token_dim) weight + bias."""

  def __init__(self, num_attributes: int, token_dim: int):
    super().__init__()
    self.weight = nn.Parameter(torch.randn(num_attributes, token_dim))  # Flax: normal(1.0).
    self.bias = nn.Parameter(torch.zeros(num_attributes, token_dim))

  def forward(self, values):  # (N, A) -> (N, A, token_dim)
    return values[..., None] * self.weight + self.bias


class AttributeTimeEmbedding(nn.Module):
  """jaxldm.models.unet.AttributeEmbedding: MLP of (masked values, mask), added to the timestep embedding."""

  def __init__(self, num_attributes: int, dim: int):
    super().__init__()
    self.hidden, self.out = nn.Linear(2 * num_attributes, dim), zero_linear(dim, dim)

  def forward(self, values, mask):
    x = torch.cat([torch.where(mask > 0, values, torch.zeros_like(values)), mask], dim=-1)
    return self.out(F.silu(self.hidden(x)))


class NullToken(nn.Module):
  """Prepends a learned, always-attendable token: (N, A, C) -> (N, 1 + A, C)."""

  def __init__(self, channels: int):
    super().__init__()
    self.token = nn.Parameter(0.02 * torch.randn(1, 1, channels))

  def forward(self, tokens):
    return torch.cat([self.token.expand(tokens.shape[0], 1, -1), tokens], dim=1)


class SliceEmbedding(nn.Module):
  """Linear(C, C) of the sinusoidal slice-index embedding, computed per example.

  jaxldm applies the Dense to a batch-free (D, C) table; Opacus needs a batch axis on every layer's
  input, so the table is broadcast to (N, D, C) first (same parameters, a negligible extra cost).
  """

  def __init__(self, channels: int):
    super().__init__()
    self.channels = channels
    self.dense = nn.Linear(channels, channels)

  def forward(self, n: int, slices: int):
    table = sinusoidal_embedding(torch.arange(slices, device=self.dense.weight.device), self.channels)
    return self.dense(table.expand(n, slices, self.channels))


def _register_grad_samplers() -> None:
  """Opacus hooks-mode per-sample gradients of the two custom-parameter layers (backprops: dL/d out)."""
  from opacus.grad_sample import register_grad_sampler

  @register_grad_sampler(AttributeEmbed)
  def _attribute_embed(layer, activations, backprops):
    values = activations[0]  # (N, A)
    return {layer.weight: values[..., None] * backprops, layer.bias: backprops}

  @register_grad_sampler(NullToken)
  def _null_token(layer, activations, backprops):
    return {layer.token: backprops[:, None, :1, :]}  # (N, 1, 1, C)


class AttributeEncoder(nn.Module):
  """jaxldm.models.unet.AttributeEncoder: (N, A) values + mask -> (N, 1 + A, context) tokens + mask."""

  def __init__(self, num_attributes: int, context_dim: int, token_dim: int = 16, heads: int = 4):
    super().__init__()
    self.embed = AttributeEmbed(num_attributes, token_dim)
    self.proj = nn.Linear(token_dim, context_dim)
    self.null = NullToken(context_dim)
    self.norm = layer_norm(context_dim)
    self.mix = Attention(context_dim, heads=heads)
    self.out_norm = layer_norm(context_dim)

  def forward(self, values, mask):
    values = torch.where(mask > 0, values, torch.zeros_like(values))
    tokens = self.null(self.proj(F.selu(self.embed(values))))
    mask = torch.cat([torch.ones_like(mask[:, :1]), mask], dim=1)
    tokens = tokens + self.mix(self.norm(tokens), mask=mask)
    return self.out_norm(tokens), mask


class AttentionBlock3D(nn.Module):
  """jaxldm.models.unet.AttentionBlock3D: spatial, across-slice, MLP, cross; pre-norm, residual."""

  def __init__(self, channels: int, heads: int, context_dim: int | None):
    super().__init__()
    c = channels
    self.ln_spatial, self.spatial = layer_norm(c), Attention(c, heads=heads)
    self.slice_emb = SliceEmbedding(c)
    self.ln_slices, self.slices = layer_norm(c), Attention(c, heads=heads)
    self.ln_mlp, self.mlp_in, self.mlp_out = layer_norm(c), nn.Linear(c, 4 * c), zero_linear(4 * c, c)
    if context_dim:
      self.ln_cross, self.cross = layer_norm(c), Attention(c, context_dim, heads=heads)
    else:
      self.cross = None

  def forward(self, x, context=None, context_mask=None):
    b, c, d, h, w = x.shape
    tokens = x.permute(0, 2, 3, 4, 1).reshape(b, d, h * w, c)
    tokens = tokens + self.spatial(self.ln_spatial(tokens))
    across = tokens.transpose(1, 2)  # (B, H*W, D, C)
    across = across + self.slices(self.ln_slices(across) + self.slice_emb(b, d)[:, None])
    tokens = across.transpose(1, 2).reshape(b, d * h * w, c)
    hidden = F.gelu(self.mlp_in(self.ln_mlp(tokens)), approximate="tanh")  # Flax nn.gelu: tanh form.
    tokens = tokens + self.mlp_out(hidden)
    if self.cross is not None and context is not None:
      tokens = tokens + self.cross(self.ln_cross(tokens), context, context_mask)
    return tokens.reshape(b, d, h, w, c).permute(0, 4, 1, 2, 3)


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------
class LatentUNet(nn.Module):
  """jaxldm.models.unet.LatentUNet, same blocks, order and skip concatenations."""

  def __init__(self, *, in_channels: int, base_channels: int, channel_mult, num_res_blocks: int,
               attention_levels, mid_attention: bool, heads: int, kernel, stride,
               num_attributes: int, context_dim: int, attribute_embedding: bool = False):
    super().__init__()
    self.base_channels, self.num_attributes = base_channels, num_attributes
    temb = 4 * base_channels
    self.time_in, self.time_out = nn.Linear(base_channels, temb), nn.Linear(temb, temb)
    ctx = context_dim if num_attributes > 0 else None
    self.attributes = AttributeEncoder(num_attributes, context_dim, heads=heads) if ctx else None
    self.attribute_embedding = (AttributeTimeEmbedding(num_attributes, temb)
                                if ctx and attribute_embedding else None)
    chans = [base_channels * m for m in channel_mult]
    res = lambda cin, cout: ResBlock3D(cin, cout, kernel, temb)
    attn = lambda ch: AttentionBlock3D(ch, heads, ctx)

    self.conv_in = SameConv3d(in_channels, chans[0], kernel)
    skips, ch = [chans[0]], chans[0]
    self.down, self.skip_after = nn.ModuleList(), []  # skip_after[i]: layer i's output is a skip.
    for level, cout in enumerate(chans):
      for _ in range(num_res_blocks):
        self.down.append(res(ch, cout))
        self.skip_after.append(level not in attention_levels)
        ch = cout
        if level in attention_levels:
          self.down.append(attn(ch))
          self.skip_after.append(True)
        skips.append(ch)
      if level < len(chans) - 1:
        self.down.append(Downsample(ch, cout, stride, kernel))
        self.skip_after.append(True)
        skips.append(ch)
    self.mid = nn.ModuleList([res(ch, chans[-1])] + ([attn(chans[-1])] if mid_attention else [])
                             + [res(chans[-1], chans[-1])])
    ch = chans[-1]
    self.up = nn.ModuleList()
    for level in reversed(range(len(chans))):
      for _ in range(num_res_blocks + 1):
        self.up.append(res(ch + skips.pop(), chans[level]))
        ch = chans[level]
        if level in attention_levels:
          self.up.append(attn(ch))
      if level > 0:
        self.up.append(Upsample(ch, chans[level], stride, kernel))
    self.norm_out = group_norm(ch)
    self.conv_out = SameConv3d(ch, in_channels, kernel, zero_init=True)

  def forward(self, x, t, attributes=None, attribute_mask=None):
    temb = self.time_out(F.silu(self.time_in(sinusoidal_embedding(t, self.base_channels))))
    context = context_mask = None
    if self.attributes is not None:
      if attributes is None:
        attributes = torch.zeros(x.shape[0], self.num_attributes, device=x.device)
        attribute_mask = torch.zeros_like(attributes)
      elif attribute_mask is None:
        attribute_mask = torch.ones_like(attributes)
      context, context_mask = self.attributes(attributes, attribute_mask)
      if self.attribute_embedding is not None:
        temb = temb + self.attribute_embedding(attributes, attribute_mask)

    def block(layer, h):
      if isinstance(layer, ResBlock3D):
        return layer(h, temb)
      if isinstance(layer, AttentionBlock3D):
        return layer(h, context, context_mask)
      return layer(h)

    h = self.conv_in(x)
    skips = [h]
    for layer, is_skip in zip(self.down, self.skip_after):
      h = block(layer, h)
      if is_skip:
        skips.append(h)
    for layer in self.mid:
      h = block(layer, h)
    for layer in self.up:
      if isinstance(layer, ResBlock3D):
        h = torch.cat([h, skips.pop()], dim=1)
      h = block(layer, h)
    return self.conv_out(F.silu(self.norm_out(h)))


class VolumeAttention(nn.Module):
  """jaxldm.models.autoencoder._volume_attention: GroupNorm, one head over all voxels."""

  def __init__(self, channels: int):
    super().__init__()
    self.norm, self.attention = group_norm(channels), Attention(channels, heads=1)

  def forward(self, h):
    b, c, d, hh, w = h.shape
    tokens = self.norm(h).permute(0, 2, 3, 4, 1).reshape(b, d * hh * w, c)
    return self.attention(tokens).reshape(b, d, hh, w, c).permute(0, 4, 1, 2, 3)


class AutoencoderKL(nn.Module):
  """jaxldm.models.autoencoder.AutoencoderKL: encoder -> Gaussian posterior (sampled) -> decoder."""

  def __init__(self, *, channels, num_res_blocks: int, latent_channels: int, kernel, stride,
               attention: bool):
    super().__init__()
    chans = list(channels)
    enc = [SameConv3d(1, chans[0], kernel)]
    ch = chans[0]
    for level, cout in enumerate(chans):
      for _ in range(num_res_blocks):
        enc.append(ResBlock3D(ch, cout, kernel))
        ch = cout
      if level < len(chans) - 1:
        enc.append(Downsample(ch, cout, stride, kernel))
    enc.append(ResBlock3D(ch, chans[-1], kernel))
    if attention:
      enc.append(VolumeAttention(chans[-1]))
    enc += [ResBlock3D(chans[-1], chans[-1], kernel), group_norm(chans[-1])]
    self.encoder = nn.ModuleList(enc)
    self.enc_out = SameConv3d(chans[-1], 2 * latent_channels, kernel)

    dec = [SameConv3d(latent_channels, chans[-1], kernel), ResBlock3D(chans[-1], chans[-1], kernel)]
    if attention:
      dec.append(VolumeAttention(chans[-1]))
    dec.append(ResBlock3D(chans[-1], chans[-1], kernel))
    ch = chans[-1]
    for level in reversed(range(len(chans))):
      for _ in range(num_res_blocks + 1):
        dec.append(ResBlock3D(ch, chans[level], kernel))
        ch = chans[level]
      if level > 0:
        dec.append(Upsample(ch, chans[level - 1], stride, kernel))
        ch = chans[level - 1]
    dec.append(group_norm(ch))
    self.decoder = nn.ModuleList(dec)
    self.dec_out = SameConv3d(ch, 1, kernel)

  @staticmethod
  def _run(layers, h):
    for layer in layers:
      h = h + layer(h) if isinstance(layer, VolumeAttention) else layer(h)
    return F.silu(h)  # The stacks end in GroupNorm: swish before the output conv.

  def forward(self, x, generator: torch.Generator | None = None):
    mean, logvar = self.enc_out(self._run(self.encoder, x)).chunk(2, dim=1)
    logvar = logvar.clamp(-30.0, 20.0)
    z = mean
    if generator is not None:
      z = z + torch.exp(0.5 * logvar) * torch.randn(mean.shape, generator=generator, device=mean.device)
    return self.dec_out(self._run(self.decoder, z)), mean, logvar


# ---------------------------------------------------------------------------------------------
# Targets: model + per-example loss + data, from the jaxldm config
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class TorchTarget:
  model: str
  module: nn.Module
  # loss(module, batch, generator) -> (B,) per-example losses; the module sees B * multiplicity rows.
  loss: Callable[[nn.Module, dict, torch.Generator], torch.Tensor]
  make_batch: Callable[[int], dict]  # B -> dict of torch tensors (jaxldm's random batch, channels-first).
  multiplicity: int  # Rows per example in the model's batch (the UNet's noise multiplicity K).
  jax_params: int  # Parameter count of the jaxldm model (the comparison's reference).
  jax_leaves: int
  reference: Any = None  # The jaxldm.bench.grads.Target it mirrors (its params: the Flax tree).
  device: str = "cpu"  # Where module and batches live ("cpu", "cuda", "cuda:1", ...).

  def generator(self, seed: int) -> torch.Generator:
    return torch.Generator(device=self.device).manual_seed(seed)

  def to(self, device: str) -> "TorchTarget":
    """The same target on `device` (module moved in place, batches made there)."""
    self.module.to(device)
    make = self.make_batch
    if self.device == "cpu" and device != "cpu":
      self.make_batch = lambda b: {k: v.to(device) for k, v in make(b).items()}
    self.device = device
    return self


def count(module: nn.Module) -> tuple[int, int]:
  """(parameters, tensors) that train."""
  params = [p for p in module.parameters() if p.requires_grad]
  return sum(p.numel() for p in params), len(params)


def unet_target(spec: str, overrides: Sequence[str] = ()) -> TorchTarget:
  import jax

  from jaxldm.bench import grads
  from jaxldm.diffusion.schedules import make_schedule

  config = load_config(spec, overrides)
  if config.get("trainer") != "ldm":
    raise ConfigError(f"--config {spec}: --model unet needs an LDM config (trainer 'ldm')")
  if config.train.trainable != "all":
    raise ConfigError(f"--config {spec}: config key 'train.trainable' is {config.train.trainable!r}; the "
                      "PyTorch port only mirrors 'all' (--config.train.trainable=all)")
  ref = grads.build_target("unet", spec, overrides)
  ae = grads._autoencoder_config_for(spec).model
  down = tuple(s ** (len(ae.channels) - 1) for s in as_triple(ae.stride))
  latent_shape = tuple(s // f for s, f in zip(config.data.shape, down))
  m, d = config.model, config.diffusion
  num_attributes = len(config.data.attributes)
  module = LatentUNet(in_channels=ae.latent_channels, base_channels=m.base_channels,
                      channel_mult=tuple(m.channel_mult), num_res_blocks=m.num_res_blocks,
                      attention_levels=tuple(m.attention_levels), mid_attention=m.mid_attention,
                      heads=m.heads, kernel=as_triple(m.kernel), stride=as_triple(m.stride),
                      num_attributes=num_attributes, context_dim=m.context_dim,
                      attribute_embedding=m.attribute_embedding)
  schedule = make_schedule(d.schedule, d.num_timesteps, d.beta_start, d.beta_end)
  abar = torch.tensor(np.asarray(schedule.alphas_cumprod, np.float32))
  k, drop, prediction = int(d.noise_multiplicity), float(d.cond_drop_prob), d.prediction

  def loss(net, batch, gen):
    """diffusion_loss per example: rows b*K .. b*K+K-1 are example b's K (t, noise) draws."""
    x0 = batch["latent"].repeat_interleave(k, dim=0)
    n = x0.shape[0]
    t = torch.randint(0, d.num_timesteps, (n,), generator=gen, device=gen.device)
    noise = torch.randn(x0.shape, generator=gen, device=gen.device)
    ab = abar.to(x0.device)[t].view(n, 1, 1, 1, 1)
    x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
    attributes = batch["attributes"].repeat_interleave(k, dim=0)
    mask = batch["attribute_mask"].repeat_interleave(k, dim=0)
    if drop > 0:
      mask = mask * (torch.rand((n, 1), generator=gen, device=gen.device) < 1.0 - drop).float()
    target = noise if prediction == "epsilon" else ab.sqrt() * noise - (1 - ab).sqrt() * x0
    err = torch.square(net(x_t, t, attributes, mask) - target)
    return err.reshape(n // k, -1).mean(dim=1)

  def make_batch(b):
    arrays = ref.make_batch(b)
    return {"latent": torch.from_numpy(arrays["latent"]).permute(0, 4, 1, 2, 3).contiguous(),
            "attributes": torch.from_numpy(arrays["attributes"]),
            "attribute_mask": torch.from_numpy(arrays["attribute_mask"])}

  assert tuple(ref.make_batch(1)["latent"].shape[1:4]) == latent_shape
  leaves = jax.tree_util.tree_leaves(ref.params)
  return TorchTarget("unet", module, loss, make_batch, k, int(sum(x.size for x in leaves)), len(leaves),
                     ref)


def autoencoder_target(spec: str, overrides: Sequence[str] = ()) -> TorchTarget:
  import jax

  from jaxldm.bench import grads

  config = load_config(spec, overrides)
  if config.get("trainer") != "autoencoder":
    raise ConfigError(f"--config {spec}: --model autoencoder needs an autoencoder config")
  ref = grads.build_target("autoencoder", spec, overrides)
  m = config.model
  module = AutoencoderKL(channels=tuple(m.channels), num_res_blocks=m.num_res_blocks,
                         latent_channels=m.latent_channels, kernel=as_triple(m.kernel),
                         stride=as_triple(m.stride), attention=m.attention)
  kl_weight = float(config.loss.kl_weight)

  def loss(net, batch, gen):
    """generator_loss without a critic: L1 + kl_weight * KL / voxels, per example."""
    x = batch["volume"]
    b = x.shape[0]
    recon, mean, logvar = net(x, gen)
    l1 = torch.abs(recon - x).reshape(b, -1).mean(dim=1)
    kl = 0.5 * (torch.square(mean) + torch.exp(logvar) - 1.0 - logvar)
    return l1 + kl_weight * kl.reshape(b, -1).sum(dim=1) / x[0].numel()

  def make_batch(b):
    return {"volume": torch.from_numpy(ref.make_batch(b)["volume"])[:, None].contiguous()}

  leaves = jax.tree_util.tree_leaves(ref.params)
  return TorchTarget("autoencoder", module, loss, make_batch, 1, int(sum(x.size for x in leaves)),
                     len(leaves), ref)


def default_device() -> str:
  return "cuda" if torch.cuda.is_available() else "cpu"


def build(model: str, spec: str, overrides: Sequence[str] = (), *, seed: int = 0,
          device: str = "cpu") -> TorchTarget:
  """The PyTorch twin of `jaxldm.bench.grads.build_target(model, spec, overrides)`, on `device`.

  Raises RuntimeError when the parameter counts differ: then the port is not the same network.
  """
  if model not in MODELS:
    raise ConfigError(f"--model {model!r}: choose one of {', '.join(MODELS)}")
  torch.manual_seed(seed)
  target = (unet_target if model == "unet" else autoencoder_target)(spec, overrides)
  n, leaves = count(target.module)
  if (n, leaves) != (target.jax_params, target.jax_leaves):
    raise RuntimeError(f"{model} {spec}: PyTorch port has {n:,} parameters in {leaves} tensors, jaxldm "
                       f"{target.jax_params:,} in {target.jax_leaves}: the architectures differ")
  return target.to(device) if device != "cpu" else target


# ---------------------------------------------------------------------------------------------
# Gradient modes
# ---------------------------------------------------------------------------------------------
def clip_and_noise(params: Sequence[nn.Parameter], batch_size: int, *, multiplicity: int = 1,
                   l2_clip_norm: float = 1.0, noise_multiplier: float = 1.0,
                   generator: torch.Generator | None = None) -> list[torch.Tensor]:
  """DPOptimizer.pre_step's arithmetic on `p.grad_sample` (per ROW); sets and returns `p.grad`.

  The grad samples must be per-row gradients of the SUM of per-example losses (loss_reduction="sum");
  the `multiplicity` rows of one example are summed first, so clipping is per example.
  """
  samples = [p.grad_sample for p in params]
  if multiplicity > 1:
    samples = [g.reshape(batch_size, multiplicity, *g.shape[1:]).sum(dim=1) for g in samples]
  norms = torch.stack([g.reshape(batch_size, -1).norm(2, dim=-1) for g in samples], dim=1).norm(2, dim=1)
  factor = (l2_clip_norm / (norms + 1e-6)).clamp(max=1.0)  # Opacus's per-sample clip factor.
  out = []
  for p, g in zip(params, samples):
    summed = torch.einsum("i,i...", factor, g)
    if noise_multiplier > 0:
      summed = summed + torch.normal(0.0, noise_multiplier * l2_clip_norm, summed.shape, generator=generator,
                                     device=summed.device)
    p.grad = summed / batch_size  # expected_batch_size = B, loss_reduction "mean".
    out.append(p.grad)
  return out


def gradient_fn(mode: str, target: TorchTarget, batch_size: int, *, l2_clip_norm: float = 1.0,
                noise_multiplier: float = 1.0) -> Callable[[dict, int], list[torch.Tensor]]:
  """fn(batch, seed) -> one gradient tensor per parameter (module order), for one mode.

  The DP modes wrap a deep copy of the module (Opacus attaches hooks to the module it wraps), so
  every mode starts from the same weights.
  """
  if mode not in MODES:
    raise ConfigError(f"--modes: unknown mode {mode!r}; choose from {', '.join(MODES)}")
  if mode == "nonprivate":
    net = target.module
    params = [p for p in net.parameters() if p.requires_grad]

    def fn(batch, seed):
      gen = target.generator(seed)
      for p in params:
        p.grad = None
      target.loss(net, batch, gen).mean().backward()
      return [p.grad for p in params]
    return fn

  from opacus.grad_sample.utils import wrap_model

  _register_grad_samplers()
  net = wrap_model(copy.deepcopy(target.module), grad_sample_mode=mode.removeprefix("opacus_"),
                   loss_reduction="sum")
  params = [p for p in net.parameters() if p.requires_grad]

  def fn(batch, seed):
    gen = target.generator(seed)
    for p in params:
      p.grad, p.grad_sample = None, None
    target.loss(net, batch, gen).sum().backward()
    return clip_and_noise(params, batch_size, multiplicity=target.multiplicity, l2_clip_norm=l2_clip_norm,
                          noise_multiplier=noise_multiplier, generator=gen)
  return fn


# ---------------------------------------------------------------------------------------------
# Measurement (jaxldm.bench.grads.run's protocol)
# ---------------------------------------------------------------------------------------------
def cpu_name() -> str:
  from jaxldm.bench.grads import host_cpu  # One reading of /proc/cpuinfo for both benchmarks.
  return host_cpu()


def _rss_peak_bytes() -> int:
  from jaxldm.bench.grads import rss_peak_bytes  # Same measure as jaxldm's records.
  return rss_peak_bytes()


def device_name(device: str) -> str:
  """The GPU's name (e.g. "NVIDIA H200") or the host CPU's."""
  if device.startswith("cuda"):
    return torch.cuda.get_device_name(torch.device(device))
  return cpu_name()


def _sync(device: str) -> None:
  if device.startswith("cuda"):
    torch.cuda.synchronize(torch.device(device))


def run(target: TorchTarget, *, batches: Sequence[int], modes: Sequence[str], repeats: int = 5,
        warmup: int = 2, seed: int = 0, progress=None) -> list[dict]:
  """Times every (mode, batch); one record per pair, keys as `jaxldm bench grads` writes them.

  On a GPU every call is followed by `torch.cuda.synchronize` (inside the timed span), the peak
  is `torch.cuda.max_memory_allocated` of the whole batch size (all modes; reset per batch size), and
  cuDNN benchmarks its convolution algorithms (the warm-up calls absorb that).
  """
  import opacus

  for m in modes:
    if m not in MODES:
      raise ConfigError(f"--modes: unknown mode {m!r}; choose from {', '.join(MODES)}")
  n_params, _ = count(target.module)
  dev = target.device
  gpu = dev.startswith("cuda")
  if gpu:  # cuDNN picks each convolution's algorithm by timing them (in the warm-up), as XLA autotunes.
    torch.backends.cudnn.benchmark = True
  device = device_name(dev)
  records = []
  for b in batches:
    if gpu:
      torch.cuda.reset_peak_memory_stats(torch.device(dev))
    batch = target.make_batch(b)
    fns, compile_s = {}, {}
    for mode in modes:
      fns[mode] = gradient_fn(mode, target, b)
      t0 = time.perf_counter()
      fns[mode](batch, seed)
      _sync(dev)
      compile_s[mode] = time.perf_counter() - t0
      for i in range(warmup):
        fns[mode](batch, seed + 1 + i)
      _sync(dev)
      if progress:
        progress(f"first call {mode} B={b} ({compile_s[mode]:.1f} s)")
    times = {mode: [] for mode in modes}
    for r in range(repeats):
      for mode in modes:  # Alternate modes: load drift hits all of them.
        t0 = time.perf_counter()
        fns[mode](batch, seed + 1000 + r)
        _sync(dev)
        times[mode].append(time.perf_counter() - t0)
      if progress:
        progress(f"B={b} repeat {r + 1}/{repeats}")
    peak = int(torch.cuda.max_memory_allocated(torch.device(dev))) if gpu else _rss_peak_bytes()
    del fns, batch
    for mode in modes:
      step_s = statistics.median(times[mode])
      records.append({
          "mode": mode, "model": target.model, "batch": b, "params": n_params, "step_s": step_s,
          "examples_per_s": b / step_s, "peak_bytes": peak,
          "peak_source": "torch_cuda_max_allocated" if gpu else "process_rss",
          "program_bytes": None, "compile_s": compile_s[mode], "microbatch": None,
          "times_s": times[mode], "dtype": "float32", "backend": "torch-cuda" if gpu else "torch-cpu",
          "device_kind": device, "num_threads": torch.get_num_threads(), "host_memory": hostmem.status(),
          "date": datetime.date.today().isoformat(),
          "framework": "pytorch", "torch_version": torch.__version__,
          "opacus_version": opacus.__version__, "noise_multiplicity": target.multiplicity})
  base = {(r["model"], r["batch"]): r["step_s"] for r in records if r["mode"] == "nonprivate"}
  for r in records:
    ref = base.get((r["model"], r["batch"]))
    r["ratio_to_nonprivate"] = r["step_s"] / ref if ref else None
  return records


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------
def _ints(text: str) -> tuple[int, ...]:
  return tuple(int(v) for v in text.split(",") if v.strip())


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog="bench_opacus.py", description=__doc__.split("\n\n")[0],
      epilog="Config overrides: --config.a.b=value, as for `jaxldm bench grads`.")
  p.add_argument("--model", choices=MODELS, required=True, help="which network")
  p.add_argument("--config", required=True, help="its jaxldm training config[:variant]")
  p.add_argument("--batch", type=_ints, default=(8,), help="batch sizes, comma-separated (default 8)")
  p.add_argument("--modes", type=lambda t: tuple(m.strip() for m in t.split(",") if m.strip()),
                 default=MODES, help=f"comma-separated subset of {','.join(MODES)} (default all)")
  p.add_argument("--repeats", type=int, default=5, help="timed repeats per mode (median reported)")
  p.add_argument("--warmup", type=int, default=2, help="untimed calls after the first (default 2)")
  p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (default: all cores)")
  p.add_argument("--device", default="", help="torch device: cpu, cuda, cuda:1 (default: cuda if available)")
  p.add_argument("--keep-going", action="store_true",
                 help="a batch size that fails (out of memory) is recorded with status oom/error, not fatal")
  p.add_argument("--json", metavar="OUT.json", help="write the records here")
  p.add_argument("--png", metavar="OUT.png", help="also plot them (jaxldm.bench.report.plot)")
  return p


def main(argv: Sequence[str] | None = None) -> int:
  from rich.console import Console

  from jaxldm.bench import report

  argv = list(sys.argv[1:] if argv is None else argv)
  try:
    overrides, rest = split_override_args(argv)
    args = build_parser().parse_args(rest)
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    target = build(args.model, args.config, overrides, device=args.device or default_device())
  except ConfigError as e:
    print(f"bench_opacus: error: {e}", file=sys.stderr)
    return 2
  console = Console(stderr=True)
  n, leaves = count(target.module)
  console.print(f"parameters  jaxldm {target.jax_params:,} ({target.jax_leaves} arrays)   "
                f"pytorch {n:,} ({leaves} tensors)   equal")
  with console.status("benchmarking") as status:
    progress = lambda msg: status.update(f"benchmarking: {msg}")
    if not args.keep_going:
      records = run(target, batches=args.batch, modes=args.modes, repeats=args.repeats,
                    warmup=args.warmup, progress=progress)
    else:
      records = []
      for b in args.batch:
        try:
          records += run(target, batches=(b,), modes=args.modes, repeats=args.repeats, warmup=args.warmup,
                         progress=progress)
        except (RuntimeError, MemoryError) as e:  # torch.cuda.OutOfMemoryError is a RuntimeError.
          oom = "out of memory" in str(e).lower() or isinstance(e, MemoryError)
          records += [{"mode": m, "model": target.model, "batch": b, "status": "oom" if oom else "error",
                       "error": f"{type(e).__name__}: {str(e).strip()[:300]}", "framework": "pytorch",
                       "device_kind": device_name(target.device)} for m in args.modes]
          if target.device.startswith("cuda"):
            torch.cuda.empty_cache()
        if args.json:  # After each batch: a caller that stops this process at a time limit keeps what was measured.
          report.save(args.json, records)
  records_ok = [r for r in records if "step_s" in r]
  if not records_ok:
    if args.json:
      report.save(args.json, records)
    print("bench_opacus: every configuration failed", file=sys.stderr)
    return 1
  Console(width=None if sys.stdout.isatty() else 140).print(report.table(records_ok, title=f"{args.model} {args.config} PyTorch/Opacus on "
                                              f"{records[0]['device_kind']}, {torch.get_num_threads()} threads"))
  if args.json:
    report.save(args.json, records)
  if args.png:
    report.plot(records_ok, args.png)
  return 0


if __name__ == "__main__":
  sys.exit(main())
