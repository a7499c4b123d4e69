"""Building blocks shared by the autoencoder, the latent UNet and the discriminator.

Arrays are (B, D, H, W, C) with D the slice axis. Normalisation is GroupNorm only: batch statistics
couple the examples of a batch, which breaks per-example DP-SGD, so BatchNorm never appears here.
Kernels and strides are per axis so thick-slice MRI can use in-plane (1, 3, 3) kernels and
(1, 2, 2) strides while isotropic CT uses 3x3x3.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxldm.models import conv
from jaxldm.models.conv import Conv

Triple = tuple[int, int, int]


def num_groups(channels: int, max_groups: int = 32) -> int:
  """The largest group count <= max_groups that divides `channels`."""
  for g in range(min(max_groups, channels), 0, -1):
    if channels % g == 0:
      return g
  return 1


@jax.custom_jvp
def _swish_by_division(x):
  return x / (1 + jnp.exp(-x))


@_swish_by_division.defjvp
def _swish_by_division_jvp(primals, tangents):
  (x,), (dx,) = primals, tangents
  s = jax.nn.sigmoid(x)
  return _swish_by_division(x), dx * (s + x * s * (1 - s))


def swish(x):
  """x * sigmoid(x) (`nn.swish`); in a non-private step on CPU (`conv.examples_merged()`) as x / (1 + e^-x).

  The same function to float rounding (~1e-8), written for XLA's fusion pass: an activation that
  feeds a convolution is also the operand of its kernel gradient, which XLA:CPU wants transposed
  (channels as the batch, images as the features). With a cheap last operation (the product of
  `nn.swish`) XLA recomputes GroupNorm + swish inside that transpose, reading the inputs with a
  stride of one image, 3-6 ms per layer; with an expensive one (a division) the activation is written
  once and transposed as a plain copy (~0.3 ms). Non-private steps: tiny autoencoder -11%, tiny UNet -4%.
  Per-example (DP) steps measured no gain (tiny autoencoder, batch 8: +6%) and keep `nn.swish`, as do
  other backends (not measured there). benchmarks/NOTES.md, session 13.
  """
  if conv.examples_are_merged() and jax.default_backend() == "cpu":
    return _swish_by_division(x)
  return nn.swish(x)


class Norm(nn.Module):
  """GroupNorm with a group count that always divides the channels."""
  max_groups: int = 32
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    return nn.GroupNorm(num_groups=num_groups(x.shape[-1], self.max_groups), epsilon=1e-6,
                        dtype=self.dtype)(x)


class ResBlock3D(nn.Module):
  """Pre-activation residual block; an optional embedding (e.g. the timestep) is added in the middle."""
  features: int
  kernel: Triple = (3, 3, 3)
  dropout: float = 0.0
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, emb=None, *, deterministic: bool = True):
    h = swish(Norm(dtype=self.dtype)(x))
    h = Conv(self.features, self.kernel, padding="SAME", dtype=self.dtype, name="conv1")(h)
    if emb is not None:
      scale_shift = nn.Dense(2 * self.features, dtype=self.dtype, name="emb_proj")(nn.swish(emb))
      scale, shift = jnp.split(scale_shift[:, None, None, None, :], 2, axis=-1)
      h = Norm(dtype=self.dtype)(h) * (1 + scale) + shift
    else:
      h = Norm(dtype=self.dtype)(h)
    h = swish(h)
    if self.dropout > 0:
      h = nn.Dropout(self.dropout)(h, deterministic=deterministic)
    # Zero-initialised last conv: each block starts as the identity, which keeps deep nets stable.
    h = Conv(self.features, self.kernel, padding="SAME", dtype=self.dtype,
                kernel_init=nn.initializers.zeros, name="conv2")(h)
    if x.shape[-1] != self.features:
      x = Conv(self.features, (1, 1, 1), dtype=self.dtype, name="skip")(x)
    return x + h


class Downsample(nn.Module):
  """Strided convolution; stride per axis ((1, 2, 2) keeps the thick-slice axis)."""
  features: int
  stride: Triple = (2, 2, 2)
  kernel: Triple = (3, 3, 3)
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    return Conv(self.features, self.kernel, strides=self.stride, padding="SAME", dtype=self.dtype)(x)


class _UpsampledConv(nn.Module):
  """nn.Conv(features, kernel, padding="SAME") applied to x nearest-upsampled by `stride`, computed without
  the upsampled copy (`conv.upsampled_conv`). Its parameters are nn.Conv's: same names, shapes, initialisers."""
  features: int
  kernel: Triple
  stride: Triple
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", nn.Conv.kernel_init, tuple(self.kernel) + (x.shape[-1], self.features),
                        jnp.float32)
    bias = self.param("bias", nn.Conv.bias_init, (self.features,), jnp.float32)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    return conv.upsampled_conv(x, kernel, tuple(self.stride)) + bias


class Upsample(nn.Module):
  """Nearest-neighbour upsampling by `stride` then a convolution (no checkerboard artefacts).

  On the CPU convolution route the two are computed as convolutions of the low-resolution input, one
  per output phase (`conv.upsampled_conv`: same parameters, same result to float rounding, ~2x faster
  per layer); with XLA's own convolutions (other backends, not measured there) as written."""
  features: int
  stride: Triple = (2, 2, 2)
  kernel: Triple = (3, 3, 3)
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    if conv.resolved_weight_grad() != "native" and x.ndim == 5:
      return _UpsampledConv(self.features, self.kernel, self.stride, dtype=self.dtype, name="Conv_0")(x)
    for axis, s in zip((1, 2, 3), self.stride):
      if s > 1:
        x = jnp.repeat(x, s, axis=axis)
    return Conv(self.features, self.kernel, padding="SAME", dtype=self.dtype)(x)


class Attention(nn.Module):
  """Multi-head attention over a token axis with an optional key mask.

  `x` is (..., Tq, C); `context` (..., Tk, Ck) defaults to `x`; `mask` (..., Tk) with 1 = attend.
  `token_axis=-3`: self-attention over the tokens of `x` (..., T, N, C) for each of its N positions,
  without moving the token axis (no transposed copy of the input or output).
  """
  heads: int = 4
  dtype: jnp.dtype = jnp.float32
  token_axis: int = -2

  @nn.compact
  def __call__(self, x, context=None, mask=None):
    if self.token_axis not in (-2, -3) or (self.token_axis == -3 and (context is not None or mask is not None)):
      raise ValueError(f"token_axis {self.token_axis}: -2, or -3 for self-attention without a mask")
    context = x if context is None else context
    channels = x.shape[-1]
    heads = math.gcd(self.heads, channels)
    head_dim = channels // heads
    q = nn.DenseGeneral((heads, head_dim), dtype=self.dtype, name="q")(x)
    k = nn.DenseGeneral((heads, head_dim), dtype=self.dtype, name="k")(context)
    v = nn.DenseGeneral((heads, head_dim), dtype=self.dtype, name="v")(context)
    n = "" if self.token_axis == -2 else "n"
    logits = jnp.einsum(f"...q{n}hd,...k{n}hd->...{n}hqk", q, k) / jnp.sqrt(head_dim).astype(q.dtype)
    if mask is not None:
      big_neg = jnp.finfo(logits.dtype).min
      logits = jnp.where(mask[..., None, None, :] > 0, logits, big_neg)
    weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
    out = jnp.einsum(f"...{n}hqk,...k{n}hd->...q{n}hd", weights, v)
    return nn.DenseGeneral(channels, axis=(-2, -1), dtype=self.dtype, kernel_init=nn.initializers.zeros,
                           name="out")(out)


# XLA compiler options of the programs that initialise parameters. On XLA:CPU the random-number
# generators dominate an init's compile time (each threefry `normal`/`uniform` call ~0.5-2 s at the
# default LLVM level); level 1 compiled the tiny UNet's init 2.6x faster (66.7 -> 26.0 s on a loaded
# 2-core CPU) to bitwise the same parameters (tests/models/test_models.py checks that). An init runs
# once, so its code's speed does not matter. Level 0 is NOT used: it drops FMA contraction and changed
# parameters by up to 2e-7.
INIT_COMPILER_OPTIONS = {"xla_backend_optimization_level": 1}


@functools.lru_cache(maxsize=32)
def _jitted_init(module: nn.Module):
  """`module.init` as one jitted program (cached per module), compiled for speed of compilation."""
  return jax.jit(module.init, compiler_options=INIT_COMPILER_OPTIONS)


def init_params(module: nn.Module, rng: jax.Array, *inputs):
  """`module.init(rng, *inputs)`: one compiled program, not op-by-op dispatch."""
  return _jitted_init(module)(rng, *inputs)


@functools.lru_cache(maxsize=32)
def _abstract_params(module: nn.Module, specs: tuple) -> dict:
  # Through the jitted init: its trace is then shared with `init_params` on the same module and shapes.
  return _jitted_init(module).eval_shape(*_init_args(specs))


def _init_args(specs: tuple) -> tuple:
  return (jax.random.PRNGKey(0), *(jax.ShapeDtypeStruct(s, d) for s, d in specs))


def abstract_params(module: nn.Module, *inputs) -> dict:
  """The shapes and dtypes of `module.init(key, *inputs)`'s parameters, traced once per module and
  input shapes (a checkpoint's loaders need them for every load; the trace of a UNet's init is ~0.3 s).
  Shared between callers: read it, do not mutate it."""
  specs = tuple((tuple(x.shape), jnp.dtype(x.dtype)) for x in inputs)
  try:
    hash(module)
  except TypeError:  # A module with an unhashable field (e.g. a list): traced every time.
    return jax.eval_shape(module.init, *_init_args(specs))
  return _abstract_params(module, specs)


def sinusoidal_embedding(values: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
  """Transformer-style embedding of scalars (timesteps, slice indices): (...,) -> (..., dim)."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = values.astype(jnp.float32)[..., None] * freqs
  emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, [(0, 0)] * (emb.ndim - 1) + [(0, 1)])
  return emb


def as_triple(value: int | Sequence[int]) -> Triple:
  if isinstance(value, int):
    return (value, value, value)
  value = tuple(int(v) for v in value)
  if len(value) != 3:
    raise ValueError(f"expected 3 values (D, H, W), got {value}")
  return value  # type: ignore[return-value]
