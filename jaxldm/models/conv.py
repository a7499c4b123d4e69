"""Convolution whose kernel gradient is a sum of per-tap matrix products (fast per-example gradients).

Why: DP-SGD needs one gradient per example. `jax.vmap` of a convolution's kernel gradient becomes a
grouped "backprop-filter" convolution, which XLA:CPU runs ~1.8x slower than the batched one (itself
slow). Writing the kernel gradient as one matrix product per kernel tap,

  dK[tap] = sum_positions  x[position + tap]^T  dy[position]      (an (in, out) matrix per tap),

turns it into plain GEMMs: batched over examples they are batched GEMMs at the same speed, so a
per-example gradient costs what a batched one does (benchmarks/NOTES.md has the measurements). The
forward pass and the input gradient stay XLA's own convolutions.

The implementation is picked when a model is traced: `auto` (the default) uses taps on CPU, where it
was measured to pay, and XLA's convolution gradient elsewhere; `set_weight_grad("taps"|"native")`
or the `JAXLDM_CONV_WEIGHT_GRAD` environment variable override it. Parameters, their names and
initialisation are nn.Conv's, so checkpoints do not depend on the choice.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import os
from collections.abc import Iterator

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp

WEIGHT_GRADS = ("auto", "taps", "native")
_setting = {"weight_grad": os.environ.get("JAXLDM_CONV_WEIGHT_GRAD", "auto")}


def set_weight_grad(mode: str) -> None:
  """Chooses the kernel-gradient implementation for models traced from now on."""
  if mode not in WEIGHT_GRADS:
    raise ValueError(f"conv weight gradient {mode!r}: choose one of {', '.join(WEIGHT_GRADS)}")
  _setting["weight_grad"] = mode


@contextlib.contextmanager
def weight_grad(mode: str) -> Iterator[None]:
  """Context manager form of `set_weight_grad` (restores the previous choice)."""
  previous = _setting["weight_grad"]
  set_weight_grad(mode)
  try:
    yield
  finally:
    _setting["weight_grad"] = previous


def resolved_weight_grad() -> str:
  mode = _setting["weight_grad"]
  if mode not in WEIGHT_GRADS:
    raise ValueError(f"JAXLDM_CONV_WEIGHT_GRAD={mode!r}: choose one of {', '.join(WEIGHT_GRADS)}")
  if mode == "auto":
    return "taps" if jax.default_backend() == "cpu" else "native"
  return mode


def _dimension_numbers(ndim: int) -> lax.ConvDimensionNumbers:
  """Channels-last numbers (N, spatial..., C) x (spatial..., I, O), as nn.Conv uses."""
  spatial = tuple(range(1, ndim - 1))
  return lax.ConvDimensionNumbers(lhs_spec=(0, ndim - 1) + spatial,
                                  rhs_spec=(ndim - 1, ndim - 2) + tuple(range(ndim - 2)),
                                  out_spec=(0, ndim - 1) + spatial)


def _conv(x, kernel, strides, pads):
  return lax.conv_general_dilated(x, kernel, strides, pads,
                                  dimension_numbers=_dimension_numbers(x.ndim))


def _kernel_grad(x, dy, kernel_shape, strides, pads, dtype):
  """sum over examples and positions of x[pos * stride + tap]^T dy[pos], one GEMM per tap."""
  xp = jnp.pad(x, ((0, 0),) + tuple(pads) + ((0, 0),))
  out_spatial = dy.shape[1:-1]
  windows = []
  for tap in itertools.product(*(range(k) for k in kernel_shape[:-2])):
    start = (0,) + tap + (0,)
    limit = ((xp.shape[0],) + tuple(t + (o - 1) * s + 1 for t, o, s in zip(tap, out_spatial, strides))
             + (xp.shape[-1],))
    windows.append(lax.slice(xp, start, limit, (1,) + tuple(strides) + (1,)))
  axes = tuple(range(x.ndim - 1))
  grad = jnp.stack([jnp.tensordot(w, dy, axes=(axes, axes), preferred_element_type=jnp.float32)
                    for w in windows])
  return grad.reshape(kernel_shape).astype(dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv_taps(x, kernel, strides: tuple[int, ...], pads: tuple[tuple[int, int], ...]):
  """Channels-last convolution (explicit padding) with the per-tap GEMM kernel gradient."""
  return _conv(x, kernel, strides, pads)


def _conv_taps_fwd(x, kernel, strides, pads):
  return _conv(x, kernel, strides, pads), (x, kernel)


def _conv_taps_bwd(strides, pads, residuals, dy):
  x, kernel = residuals
  _, input_vjp = jax.vjp(lambda a: _conv(a, kernel, strides, pads), x)
  (dx,) = input_vjp(dy)
  return dx, _kernel_grad(x, dy, kernel.shape, strides, pads, kernel.dtype)


conv_taps.defvjp(_conv_taps_fwd, _conv_taps_bwd)


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, precision=None):
  """Drop-in for `lax.conv_general_dilated` as nn.Conv calls it; taps where it applies.

  Unlike lax, `dimension_numbers=None` means channels-last, the layout of every model here.
  """
  dimension_numbers = dimension_numbers or _dimension_numbers(lhs.ndim)
  plain = (not lhs_dilation or all(d == 1 for d in lhs_dilation)) and (
      not rhs_dilation or all(d == 1 for d in rhs_dilation))
  channels_last = tuple(dimension_numbers) == tuple(_dimension_numbers(lhs.ndim))
  if (resolved_weight_grad() != "taps" or not plain or not channels_last or feature_group_count != 1
      or precision is not None):
    return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
                                    rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
                                    feature_group_count=feature_group_count, precision=precision)
  strides = tuple(int(s) for s in window_strides)
  if isinstance(padding, str):
    pads = lax.padtype_to_pads(lhs.shape[1:-1], rhs.shape[:-2], strides, padding)
  else:
    pads = padding
  return conv_taps(lhs, rhs, strides, tuple((int(lo), int(hi)) for lo, hi in pads))


# nn.Conv with the kernel gradient above: same parameters, names ("Conv_0", ...) and init.
Conv = functools.partial(nn.Conv, conv_general_dilated=conv_general_dilated)
