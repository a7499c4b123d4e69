"""Convolutions laid out for XLA:CPU: 2D convolutions over slices, per-example kernel gradients.

Two things make 3D convolutions slow on XLA:CPU, and DP-SGD pays for both:

1. Kernel gradient. DP-SGD needs one gradient per example. `jax.vmap` of a convolution's kernel
   gradient becomes a grouped "backprop-filter" convolution, which XLA:CPU runs ~1.8x slower than
   the batched one (itself slow). Written as one matrix product per kernel tap,

     dK[tap] = sum_positions  x[position * stride + tap]^T  dy[position]   (an (in, out) matrix),

   it is plain GEMMs: batched over examples they are batched GEMMs at the same speed, so a
   per-example gradient costs what a batched one does.
2. Forward pass and input gradient. XLA:CPU runs a 3D convolution 2-7x slower than the same work
   as a 2D convolution, and the input gradient of a strided 3D convolution (a transposed conv)
   30-100x slower. A channels-last (N, D, H, W, C) convolution with a (kd, kh, kw) kernel is
   therefore computed as ONE 2D convolution over the N * D_out (example, slice) pairs whose
   channels are the kd depth-shifted (depth-padded, depth-strided) input slices stacked:
   `conv_by_slices`. A depth-1 kernel is a reshape; the input gradient is this formulation's own
   transpose (2D transposed convolutions), which XLA:CPU runs fast.

Kernel gradient on the route, two choices:
- "slices" (the CPU default): the 2D convolution's own kernel gradient (XLA's backprop-filter). Per
  example (the custom VJP's backward pass under `jax.vmap`, DP-SGD) it is one 2D gradient per example,
  unrolled (`_kernel_grads`): XLA:CPU runs a vmapped one, a grouped convolution, ~6x slower. Small
  layers (see PAIR_MAX_FLOPS) run two examples per convolution, their channels concatenated (the gradient's
  diagonal blocks): fewer, larger calls. Above MAX_UNROLL examples in one vmap it
  falls back to the per-tap GEMMs.
- "taps": the per-tap GEMMs above, batched or per example alike (any batch size, no unrolling).
Measured on the tiny autoencoder, batch 8, 2-core CPU (benchmarks/NOTES.md, session 11): private step
224 -> 173 ms, non-private 226 -> 158 ms, and 142 ms with `examples_merged()`.

Non-private steps take the gradient of a `jax.vmap`ped per-example loss; `jax.vmap` of a custom VJP
computes the kernel gradient per example and sums it. Tracing such a step within `examples_merged()`
(or wrapping its loss with `merging_examples`) runs each convolution on the merged batch instead: one
batched kernel gradient. A per-example gradient traced within it fails loudly.

The route is picked when a model is traced: `auto` (the default) takes "slices" on CPU, where it was
measured to pay, and XLA's native convolution and gradients elsewhere; `set_weight_grad`, the
`weight_grad` context manager or the `JAXLDM_CONV_WEIGHT_GRAD` environment variable override it.
Parameters, their names and initialisation are nn.Conv's, so checkpoints do not depend on the choice.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import math
import os
from collections.abc import Iterator

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

WEIGHT_GRADS = ("auto", "slices", "taps", "native")
# Per-example kernel gradients computed one 2D convolution per example (unrolled) up to this many
# examples in one vmap; beyond it, the per-tap GEMMs (batched GEMMs, any size).
MAX_UNROLL = 16
# Unrolled per-example kernel gradients of SMALL convolutions run two examples per 2D convolution: their
# channels concatenated, the gradient's two diagonal blocks are the two examples' own (the off-diagonal
# cross terms are computed and dropped: 4x the flops of one, half the calls). Measured on the 2-core CPU
# (16 examples of one layer, ms, one convolution per example -> pairs): 6x16x16 16->16 4.87 -> 2.67,
# 8->16 2.45 -> 1.35, 6x32x32 8->8 4.89 -> 4.63; but 32->32 5.41 -> 9.45, 8->1 2.87 -> 4.32, 16->4 2.47 ->
# 2.79. Pairs when both channel counts (the input's times the kernel's depth) are at least
# PAIR_MIN_CHANNELS and one example's gradient is at most PAIR_MAX_FLOPS: the tiny autoencoder's DP
# trainer step 182 -> 167 ms, the tiny LDM's DP trainer step unchanged (312 / 316 vs 315 / 307 ms; its 16- and
# 32-channel layers pair too): benchmarks/RESULTS.md and NOTES.md, session 14.
PAIR_MIN_CHANNELS = 8
PAIR_MAX_FLOPS = 8e6
_setting = {"weight_grad": os.environ.get("JAXLDM_CONV_WEIGHT_GRAD", "auto"), "merge_examples": False,
            "unroll": True}


def _check_weight_grad(mode: str) -> str:
  if mode not in WEIGHT_GRADS:
    raise ValueError(f"conv weight gradient {mode!r}: choose one of {', '.join(WEIGHT_GRADS)}")
  return mode


def set_weight_grad(mode: str) -> None:
  """Chooses the kernel-gradient implementation for models traced from now on."""
  _setting["weight_grad"] = _check_weight_grad(mode)


@contextlib.contextmanager
def _overriding(key: str, value) -> Iterator[None]:
  """`_setting[key] = value` within the block, the previous value restored after it."""
  previous = _setting[key]
  _setting[key] = value
  try:
    yield
  finally:
    _setting[key] = previous


def weight_grad(mode: str) -> contextlib.AbstractContextManager:
  """Context manager form of `set_weight_grad` (restores the previous choice)."""
  return _overriding("weight_grad", _check_weight_grad(mode))


def resolved_weight_grad() -> str:
  mode = _setting["weight_grad"]
  if mode not in WEIGHT_GRADS:
    raise ValueError(f"JAXLDM_CONV_WEIGHT_GRAD={mode!r}: choose one of {', '.join(WEIGHT_GRADS)}")
  if mode == "auto":
    return "slices" if jax.default_backend() == "cpu" else "native"
  return mode


def cached_per_route(maxsize: int = 16):
  """Decorates a builder of jitted functions: one build per (arguments, convolution route in force).

  The route is read when a model is traced, so a function jitted under one route must not serve
  another; keying the builder's cache on `resolved_weight_grad()` here keeps every caller from adding
  it by hand. Arguments that cannot be hashed (a module with a list field) are built every time.
  """
  def decorate(build):
    cached = functools.lru_cache(maxsize=maxsize)(lambda route, *args: build(*args))

    @functools.wraps(build)
    def builder(*args):
      try:
        hash(args)
      except TypeError:  # Unhashable arguments: nothing to key a cache on.
        return build(*args)
      return cached(resolved_weight_grad(), *args)

    builder.cache_clear = cached.cache_clear
    return builder
  return decorate


def examples_merged() -> contextlib.AbstractContextManager:
  """Within it, a convolution traced under `jax.vmap` with an unbatched kernel runs on the whole batch.

  For NON-PRIVATE gradients only (`jax.grad` of a `jax.vmap`ped per-example loss): the vmapped
  examples are merged into the convolution's batch axis, so the kernel gradient is one batched
  gradient instead of one per example summed afterwards (what `jax.vmap` of a custom VJP gives). A
  per-example gradient (`jax.vmap` of `jax.grad`, DP-SGD) traced within it fails loudly ("Linearization
  failed"): it never silently mixes examples. XLA's own convolution (`native`) merges by itself.
  """
  return _overriding("merge_examples", True)


def examples_are_merged() -> bool:
  """True while a step is traced within `examples_merged()` (a non-private step)."""
  return _setting["merge_examples"]


def in_traced_loop() -> contextlib.AbstractContextManager:
  """Within it (the body of an in-graph loop, e.g. the DP engine's microbatch loop), per-example kernel
  gradients on the `slices` route use the per-tap GEMMs instead of one unrolled 2D gradient per example:
  XLA:CPU ran the unrolled ones ~1.9x slower inside a while loop (tiny autoencoder, 16 examples in
  microbatches of 8: 1,220 vs 630 ms; plain `vmap` 268 ms). Same gradients either way."""
  return _overriding("unroll", False)


def merging_examples(fn):
  """`fn` traced within `examples_merged()` (wrap the batch loss of a non-private step with it)."""
  @functools.wraps(fn)
  def wrapped(*args, **kwargs):
    with examples_merged():
      return fn(*args, **kwargs)
  return wrapped


def _dimension_numbers(ndim: int) -> lax.ConvDimensionNumbers:
  """Channels-last numbers (N, spatial..., C) x (spatial..., I, O), as nn.Conv uses."""
  spatial = tuple(range(1, ndim - 1))
  return lax.ConvDimensionNumbers(lhs_spec=(0, ndim - 1) + spatial,
                                  rhs_spec=(ndim - 1, ndim - 2) + tuple(range(ndim - 2)),
                                  out_spec=(0, ndim - 1) + spatial)


def _conv(x, kernel, strides, pads, dilation=None):
  """XLA's own convolution (any rank), channels-last."""
  return lax.conv_general_dilated(x, kernel, strides, pads, rhs_dilation=dilation,
                                  dimension_numbers=_dimension_numbers(x.ndim))


def _depth_windows(x, depth_kernel, stride, pad, dilation):
  """The depth-shifted views x_pad[:, t*dilation + i*stride] (i < output depth), one per depth tap."""
  if pad != (0, 0):
    x = jnp.pad(x, ((0, 0), pad) + ((0, 0),) * (x.ndim - 2))
  out_depth = (x.shape[1] - dilation * (depth_kernel - 1) - 1) // stride + 1
  if depth_kernel == 1 and stride == 1:
    return [x], out_depth
  return [lax.slice_in_dim(x, t * dilation, t * dilation + (out_depth - 1) * stride + 1, stride=stride,
                           axis=1) for t in range(depth_kernel)], out_depth


def conv_by_slices(x, kernel, strides, pads, dilation=(1, 1, 1)):
  """A channels-last 3D convolution computed as ONE 2D convolution over (example, slice) pairs.

  x (N, D, H, W, C), kernel (kd, kh, kw, C, O). The kd depth taps are depth-shifted views of the
  (depth-padded, depth-strided) input; they are stacked on the channel axis, so the whole
  convolution is a 2D convolution of N * D_out images with kd * C channels against the kernel
  reshaped to (kh, kw, kd * C, O) (a depth-1 kernel is a plain reshape: no copy at all). XLA:CPU
  runs it 2-7x faster than the 3D convolution, and its transpose (the input gradient, which
  `jax.vjp` of this function gives) 30-100x faster when strided: benchmarks/NOTES.md.
  """
  n, (kd, kh, kw, c, o) = x.shape[0], kernel.shape
  windows, out_depth = _depth_windows(x, kd, strides[0], tuple(pads[0]), dilation[0])
  h = windows[0] if kd == 1 else jnp.concatenate(windows, axis=-1)
  k = kernel[0] if kd == 1 else jnp.transpose(kernel, (1, 2, 0, 3, 4)).reshape(kh, kw, kd * c, o)
  y = _conv(h.reshape((n * out_depth,) + h.shape[2:]), k, tuple(strides[1:]), tuple(pads[1:]),
            tuple(dilation[1:]))
  return y.reshape((n, out_depth) + y.shape[1:])


def _forward(x, kernel, strides, pads, dilation):
  if x.ndim == 5:
    return conv_by_slices(x, kernel, strides, pads, dilation)
  return _conv(x, kernel, strides, pads, dilation)


def _kernel_grad(x, dy, kernel_shape, strides, pads, dilation, dtype):
  """sum over examples and positions of x[pos * stride + tap * dilation]^T dy[pos], one GEMM per tap."""
  xp = jnp.pad(x, ((0, 0),) + tuple(pads) + ((0, 0),))
  out_spatial = dy.shape[1:-1]
  windows = []
  for tap in itertools.product(*(range(k) for k in kernel_shape[:-2])):
    first = tuple(t * d for t, d in zip(tap, dilation))
    start = (0,) + first + (0,)
    limit = ((xp.shape[0],) + tuple(f + (o - 1) * s + 1 for f, o, s in zip(first, out_spatial, strides))
             + (xp.shape[-1],))
    windows.append(lax.slice(xp, start, limit, (1,) + tuple(strides) + (1,)))
  axes = tuple(range(x.ndim - 1))
  grad = jnp.stack([jnp.tensordot(w, dy, axes=(axes, axes), preferred_element_type=jnp.float32)
                    for w in windows])
  return grad.reshape(kernel_shape).astype(dtype)


# The backward pass's pieces below are jitted with their geometry static: a jitted function is traced
# once per signature (JAX caches its jaxpr), so the many calls with one signature in a step (a layer's
# input gradient, each pair of examples' kernel gradient, repeated layers) trace once instead of running
# `jax.vjp` again each time. XLA inlines the calls: the compiled step is the same.
@functools.partial(jax.jit, static_argnums=(2, 3, 4, 5, 6))
def _kernel_grad_conv(x, dy, kernel_shape, strides, pads, dilation, dtype):
  """The kernel gradient summed over x's examples: XLA's backprop-filter of the route's 2D conv."""
  _, kernel_vjp = jax.vjp(lambda k: _forward(x, k, strides, pads, dilation), jnp.zeros(kernel_shape, dtype))
  return kernel_vjp(dy)[0]


def _pairs_pay(kernel_shape, dy_shape) -> bool:
  """Whether one example's kernel gradient is small enough to pay for pairing (see PAIR_MAX_FLOPS).

  kernel_shape (..., C, O); dy_shape one example's output gradient (..., O)."""
  depth = kernel_shape[0] if len(kernel_shape) == 5 else 1
  c, o = kernel_shape[-2], kernel_shape[-1]
  flops = 2 * math.prod(dy_shape[:-1]) * math.prod(kernel_shape[:-1]) * o
  return min(depth * c, o) >= PAIR_MIN_CHANNELS and flops <= PAIR_MAX_FLOPS


def _paired_kernel_grads(x, dy, kernel_shape, strides, pads, dilation, dtype):
  """The stacked per-example kernel gradients of x[i], dy[i], two examples per 2D convolution.

  Examples a and b with their channels concatenated: the kernel gradient of that (2C -> 2O) convolution
  has the (C, O) blocks sum x_a^T dy_a and sum x_b^T dy_b on its diagonal (every position's product is
  of one example's input with one example's output gradient; the geometry is the same), which are
  exactly a's and b's own gradients. An odd last example runs alone."""
  c, o = kernel_shape[-2], kernel_shape[-1]
  wide = tuple(kernel_shape[:-2]) + (2 * c, 2 * o)
  xs, dys = _examples(x), _examples(dy)
  lead = (0,) * (len(wide) - 2)
  grads = []
  for i in range(0, x.shape[0] - 1, 2):
    pair = _kernel_grad_conv(jnp.concatenate(xs[i:i + 2], axis=-1), jnp.concatenate(dys[i:i + 2], axis=-1), wide,
                             strides, pads, dilation, dtype)
    grads += [lax.slice(pair, lead + (0, 0), wide[:-2] + (c, o)), lax.slice(pair, lead + (c, o), wide)]
  if x.shape[0] % 2:
    grads.append(_kernel_grad_conv(xs[-1], dys[-1], kernel_shape, strides, pads, dilation, dtype))
  return jnp.stack(grads)


def _examples(x):
  """[x[0], x[1], ...] as lax slices: jnp's `x[i]` parses its index each time it is traced, and the
  unrolled per-example gradients index every example of every convolution."""
  return [lax.index_in_dim(x, i, keepdims=False) for i in range(x.shape[0])]


@functools.lru_cache(maxsize=None)
def _kernel_grads(kernel_shape, strides, pads, dilation, dtype, unroll=True):
  """(summed, stacked): the kernel gradient of x's examples, and per example of a stack of batches.

  `summed(x, dy)` is the batch gradient; under `jax.vmap` (DP-SGD: the custom VJP's backward pass is
  vmapped) it becomes `stacked(x, dy)`, which computes one 2D kernel gradient per vmapped example,
  unrolled (XLA:CPU runs a vmapped one, a grouped convolution, ~6x slower), or above `MAX_UNROLL`
  examples (or with `unroll` off: `in_traced_loop`) the per-tap GEMMs. Nested vmaps (e.g. stacked
  seeds of per-example gradients) fold into the same stack.
  """
  from jax.custom_batching import custom_vmap

  args = (kernel_shape, strides, pads, dilation, dtype)

  def broadcast(axis_size, in_batched, *arrays):
    return [a if b else jnp.broadcast_to(a, (axis_size,) + a.shape) for a, b in zip(arrays, in_batched)]

  def differentiable(fast, plain):
    """`fast` (a custom_vmap, which JAX cannot linearize) with the derivative of the bilinear map it
    computes written with `plain` ops: second-order gradients (a gradient penalty) work."""
    f = jax.custom_jvp(fast)
    f.defjvp(lambda p, t: (fast(*p), plain(t[0], p[1]) + plain(p[0], t[1])))
    return f

  plain_summed = lambda x, dy: _kernel_grad_conv(x, dy, *args)
  plain_stacked = jax.vmap(plain_summed)

  @custom_vmap
  def fast_summed(x, dy):
    return plain_summed(x, dy)

  @fast_summed.def_vmap
  def _(axis_size, in_batched, x, dy):
    return stacked(*broadcast(axis_size, in_batched, x, dy)), True

  @custom_vmap
  def fast_stacked(x, dy):
    if unroll and x.shape[0] <= MAX_UNROLL:
      if x.shape[0] > 1 and _pairs_pay(kernel_shape, dy.shape[1:]):
        return _paired_kernel_grads(x, dy, *args)
      return jnp.stack([plain_summed(a, b) for a, b in zip(_examples(x), _examples(dy))])
    return jax.vmap(lambda a, b: _kernel_grad(a, b, *args))(x, dy)

  @fast_stacked.def_vmap
  def _(axis_size, in_batched, x, dy):
    x, dy = broadcast(axis_size, in_batched, x, dy)
    grads = stacked(x.reshape((-1,) + x.shape[2:]), dy.reshape((-1,) + dy.shape[2:]))
    return grads.reshape((axis_size, x.shape[1]) + grads.shape[1:]), True

  summed = differentiable(fast_summed, plain_summed)
  stacked = differentiable(fast_stacked, plain_stacked)
  return summed, stacked


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def conv_taps(x, kernel, strides: tuple[int, ...], pads: tuple[tuple[int, int], ...],
              dilation: tuple[int, ...], kernel_grad: str = "taps"):
  """Channels-last convolution (explicit padding) on the CPU route.

  5-D inputs (N, D, H, W, C) run forward and input gradient as 2D convolutions (`conv_by_slices`);
  other ranks use XLA's convolution for both. The kernel gradient: "taps" one GEMM per kernel tap,
  "slices" the 2D convolution's own (one per example under `jax.vmap`: `_kernel_grads`).
  """
  return _forward(x, kernel, strides, pads, dilation)


def _conv_taps_fwd(x, kernel, strides, pads, dilation, kernel_grad):
  return conv_taps(x, kernel, strides, pads, dilation, kernel_grad), (x, kernel)


@functools.partial(jax.jit, static_argnums=(3, 4, 5))
def _input_grad(x, kernel, dy, strides, pads, dilation):
  """The transpose of the forward formulation (2D transposed convolutions for 5-D inputs); the
  forward value computed by vjp is unused and removed by XLA. Jitted: see `_kernel_grad_conv`."""
  _, input_vjp = jax.vjp(lambda a: _forward(a, kernel, strides, pads, dilation), x)
  return input_vjp(dy)[0]


def _conv_taps_bwd(strides, pads, dilation, kernel_grad, residuals, dy):
  x, kernel = residuals
  dx = _input_grad(x, kernel, dy, strides, pads, dilation)
  if kernel_grad == "slices":
    summed, _ = _kernel_grads(kernel.shape, strides, pads, dilation, kernel.dtype, _setting["unroll"])
    return dx, summed(x, dy)
  return dx, _kernel_grad(x, dy, kernel.shape, strides, pads, dilation, kernel.dtype)


conv_taps.defvjp(_conv_taps_fwd, _conv_taps_bwd)


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, precision=None):
  """Drop-in for `lax.conv_general_dilated` as nn.Conv calls it; the CPU route where it applies.

  The route takes channels-last convolutions without input dilation or feature groups (kernel
  dilation is fine); anything else, or the "native" setting, is XLA's own convolution. On the route a
  1x1x1 convolution without stride or padding is a matrix product (`pointwise`).

  Unlike lax, `dimension_numbers=None` means channels-last, the layout of every model here.
  """
  dimension_numbers = dimension_numbers or _dimension_numbers(lhs.ndim)
  channels_last = tuple(dimension_numbers) == tuple(_dimension_numbers(lhs.ndim))
  route = resolved_weight_grad()
  if (route == "native" or (lhs_dilation and any(d != 1 for d in lhs_dilation))
      or not channels_last or feature_group_count != 1 or precision is not None):
    return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
                                    rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
                                    feature_group_count=feature_group_count, precision=precision)
  strides = tuple(int(s) for s in window_strides)
  dilation = tuple(int(d) for d in rhs_dilation) if rhs_dilation else (1,) * len(strides)
  if isinstance(padding, str):
    effective = tuple(d * (k - 1) + 1 for d, k in zip(dilation, rhs.shape[:-2]))
    pads = lax.padtype_to_pads(lhs.shape[1:-1], effective, strides, padding)
  else:
    pads = padding
  pads = tuple((int(lo), int(hi)) for lo, hi in pads)
  if all(k == 1 for k in rhs.shape[:-2]) and set(strides) == {1} and all(p == (0, 0) for p in pads):
    return pointwise(lhs, rhs)
  if _setting["merge_examples"]:
    return _merged_conv(strides, pads, dilation, route)(lhs, rhs)
  return conv_taps(lhs, rhs, strides, pads, dilation, route)


def pointwise(x, kernel):
  """A 1x1x1 convolution (stride 1, no padding) as what it is: one matrix product over the channels.

  Plain `dot_general`, so every transformation is JAX's own: the kernel gradient is x^T dy over all
  rows, and under `jax.vmap` (DP-SGD) one small GEMM per example, with no custom VJP and no unrolling.
  On the 2-core CPU (batch 8, forward + both gradients, ms, route's 2D convolution -> dot; per example
  in brackets): 6x16x16 48->16 1.54 -> 0.73 (1.58 -> 0.96), 32->16 1.02 -> 0.90 (1.40 -> 0.90), 6x8x8
  64->32 0.72 -> 0.59 (1.17 -> 0.52), 48->32 0.58 -> 0.54 (0.72 -> 0.40): benchmarks/NOTES.md, session 16.
  """
  c, o = kernel.shape[-2:]
  return lax.dot_general(x, kernel.reshape(c, o), (((x.ndim - 1,), (0,)), ((), ())))


def _phase_taps(stride: int, size: int) -> list[tuple[np.ndarray, tuple[int, int]]]:
  """One axis of `upsampled_conv`: per output phase a < stride, (taps, pads).

  Output o = stride * i + a of a SAME convolution (kernel `size`, pad below p = (size - 1) // 2) over the
  nearest-upsampled axis reads upsampled index o + t - p for tap t, i.e. input index i + (a + t - p) // stride:
  the taps that land on the same input index add up. `taps` (n_a, size) maps the kernel's taps to the
  phase's n_a effective ones; `pads` is the zero padding of the input that those offsets need (an upsampled
  index is outside the volume exactly when its input index is)."""
  p = (size - 1) // 2
  out = []
  for a in range(stride):
    offsets = sorted({(a + t - p) // stride for t in range(size)})
    taps = np.zeros((len(offsets), size), np.float32)
    for t in range(size):
      taps[offsets.index((a + t - p) // stride), t] = 1.0
    out.append((taps, (-offsets[0], offsets[-1])))
  return out


def upsampled_conv(x, kernel, strides):
  """conv(nearest_upsample(x, strides), kernel, SAME, stride 1) computed on x's own grid, phase by phase.

  x (N, D, H, W, C), kernel (kd, kh, kw, C, O). Nearest upsampling repeats every voxel; the convolution
  that follows sees, for each output phase (the position within a repeated block), a fixed smaller kernel
  on the low-resolution input (the sum of the taps that read the same voxel: `_phase_taps`). So the
  layer is prod(strides) convolutions of x with those kernels (2 x 2 in-plane for a 3 x 3 kernel and
  stride 2: 2.25x fewer flops, and no upsampled copy to write, store for the backward pass and read
  back), interleaved. Same result to float rounding; the kernel's gradient flows through the tap sums.
  Tiny UNet's layer (batch 8, 6x8x8 32 -> 32, forward + both gradients) 7.5-9.9 -> 2.8 ms, per example
  4.7-4.9 ms either way; tiny autoencoder's (6x16x16 16 -> 8) 5.7 -> 2.8 ms, per example 6.1 -> 3.2 ms
  (benchmarks/NOTES.md, session 16)."""
  per_axis = [_phase_taps(s, k) for s, k in zip(strides, kernel.shape[:-2])]
  phases = []
  for (td, pd), (th, ph), (tw, pw) in itertools.product(*per_axis):
    k = jnp.einsum("dt,eu,fv,tuvio->defio", td, th, tw, kernel.astype(jnp.float32)).astype(kernel.dtype)
    phases.append(conv_general_dilated(x, k, (1, 1, 1), (pd, ph, pw)))
  y = jnp.stack(phases, axis=-2)  # (N, D, H, W, phases, O), phases in (d, h, w) order.
  n, d, h, w = y.shape[:4]
  sd, sh, sw = strides
  y = y.reshape(n, d, h, w, sd, sh, sw, -1).transpose(0, 1, 4, 2, 5, 3, 6, 7)
  return y.reshape(n, d * sd, h * sh, w * sw, -1)


@functools.lru_cache(maxsize=None)
def _merged_conv(strides, pads, dilation, route):
  """conv_taps whose vmap over examples (kernel unbatched) is one convolution of the merged batch."""
  from jax.custom_batching import custom_vmap

  @custom_vmap
  def merged(x, kernel):
    return conv_taps(x, kernel, strides, pads, dilation, route)

  @merged.def_vmap
  def _(axis_size, in_batched, x, kernel):
    if in_batched[1] or not in_batched[0]:  # A batched kernel: nothing to merge.
      in_axes = tuple(0 if b else None for b in in_batched)
      return jax.vmap(lambda a, k: conv_taps(a, k, strides, pads, dilation, route), in_axes=in_axes)(x, kernel), True
    y = conv_taps(x.reshape((-1,) + x.shape[2:]), kernel, strides, pads, dilation, route)
    return y.reshape(x.shape[:2] + y.shape[1:]), True

  return merged


# nn.Conv on the route above: same parameters, names ("Conv_0", ...) and init.
Conv = functools.partial(nn.Conv, conv_general_dilated=conv_general_dilated)
