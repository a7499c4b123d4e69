"""Per-example gradient clipping: the bounded-sensitivity half of DP-SGD.

DP-SGD is only private if every example's influence on the summed gradient is bounded. This module
computes one gradient per example (`jax.vmap` of `jax.value_and_grad`, never a batched loss), clips
each to L2 norm <= C and sums them. It knows its own sensitivity (`sensitivity`), so the noise
module can calibrate to the SUM without knowing how clipping was done.

Invariants kept here (docs/privacy.md):
  * `loss_fn` sees ONE example: `loss_fn(params, example, rng) -> scalar`. A loss that returns
    anything but a scalar is rejected at trace time, because a batched loss would silently mix
    examples before clipping.
  * No batch statistics: BatchNorm couples the examples of a batch, so a per-example gradient no
    longer depends on one example only; variables holding `batch_stats` are refused.
  * Padding (mask 0) contributes exactly zero, even when its gradient is NaN or inf: the masked
    gradient is selected away with `jnp.where` (not multiplied by 0, which would turn NaN into NaN).
  * Microbatching (`microbatch_size`) only trades memory for a sequential loop; the result is the
    same sum, and every example gets the same key with or without it.

Randomness: example i (its index in the full batch, padding included) gets
`rng_i = jax.random.fold_in(rng, i)`. Because i is the global index, a key does not depend on the
microbatch size, so results are identical with and without microbatching.

Jitting: the caller jits. `l2_clip_norm` may be a Python float (static) or a traced scalar (e.g. to
sweep C without recompiling); it is validated (> 0) only when it is concrete. `microbatch_size`,
`has_aux` and `per_layer` must be static. `num_microbatches` may be traced: see
`clipped_grad_sum`.
"""

from collections.abc import Callable, Mapping
import math
from typing import Any

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

PyTree = Any
LossFn = Callable[..., Any]


# ---------------------------------------------------------------------------------------------
# Validation.
# ---------------------------------------------------------------------------------------------
def _concrete_float(x: Any) -> float | None:
  """Returns `x` as a float when its value is known at trace time, else None."""
  try:
    return float(x)
  except (TypeError, jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
    return None


def check_l2_clip_norm(l2_clip_norm: Any) -> None:
  """Raises ValueError for a concrete clip norm that is not a finite positive number.

  C <= 0 would zero every gradient (or flip its sign) and the privacy analysis assumes C > 0.
  A traced C cannot be checked here; the caller validates it when building the config.
  """
  if jnp.ndim(l2_clip_norm) != 0:
    raise ValueError(f'l2_clip_norm must be a scalar, got shape {jnp.shape(l2_clip_norm)}.')
  value = _concrete_float(l2_clip_norm)
  if value is not None and not (value > 0 and math.isfinite(value)):
    raise ValueError(f'l2_clip_norm must be a finite number > 0, got {value}.')


def _contains_key(tree: PyTree, name: str) -> bool:
  if isinstance(tree, Mapping):
    return any(k == name or _contains_key(v, name) for k, v in tree.items())
  if isinstance(tree, (list, tuple)):
    return any(_contains_key(v, name) for v in tree)
  return False


def check_no_batch_stats(variables: PyTree) -> None:
  """Raises ValueError if `variables` holds a `batch_stats` collection (BatchNorm).

  BatchNorm normalizes each example by statistics of the whole batch, so one example's output (and
  gradient) depends on every other example: per-example clipping no longer bounds one example's
  influence and the DP guarantee is void. Use GroupNorm or LayerNorm instead.
  """
  if _contains_key(variables, 'batch_stats'):
    raise ValueError(
        'The model variables contain a "batch_stats" collection (BatchNorm). Batch statistics '
        'couple the examples of a batch and break per-example privacy: replace BatchNorm with '
        'GroupNorm or LayerNorm for DP training.')


def sensitivity(l2_clip_norm: Any, per_layer: bool = False, num_leaves: int | None = None) -> Any:
  """L2 sensitivity of the clipped gradient sum under add/remove-one-example neighbours.

  Flat clipping bounds each example's gradient by C. Per-layer clipping bounds each of the k
  leaves by C / sqrt(k), so the whole gradient still has norm <= sqrt(k * C^2 / k) = C: the
  sensitivity is C either way, and `num_leaves` is accepted only so callers need not special-case
  the per-layer budget split (it must be >= 1 when given).
  """
  if per_layer and num_leaves is not None and num_leaves < 1:
    raise ValueError(f'num_leaves must be >= 1 for per-layer clipping, got {num_leaves}.')
  return l2_clip_norm


# ---------------------------------------------------------------------------------------------
# Clipping of one example's gradient.
# ---------------------------------------------------------------------------------------------
def clip_gradient(grad: PyTree, *, l2_clip_norm: Any,
                  per_layer: bool = False) -> tuple[PyTree, jax.Array, jax.Array]:
  """Clips ONE example's gradient (no batch axis; vmap it for many).

  The scale is `C / max(norm, C)`: exactly 1 for norm <= C (no rounding of small gradients, and a
  zero gradient is fine), and C / norm otherwise, so the clipped norm is C up to float rounding.
  A NaN norm gives a NaN scale on purpose: a non-finite real example must fail loudly.

  Args:
    grad: the gradient pytree of one example.
    l2_clip_norm: C.
    per_layer: clip each of the k leaves to C / sqrt(k) instead of the whole gradient to C.

  Returns:
    (clipped gradient in float32 or wider, pre-clipping global L2 norm, whether it was clipped).
  """
  leaves, scales, norm, was_clipped = _clip_scales(grad, l2_clip_norm=l2_clip_norm, per_layer=per_layer)
  treedef = jax.tree_util.tree_structure(grad)
  return jax.tree_util.tree_unflatten(treedef, [g * s for g, s in zip(leaves, scales)]), norm, was_clipped


def _promoted_leaves(grad: PyTree) -> list[jax.Array]:
  """The gradient's leaves in float32 or wider (the clipped sum's precision)."""
  return [g.astype(jnp.promote_types(g.dtype, jnp.float32)) for g in jax.tree_util.tree_leaves(grad)]


def _clip_scales(grad: PyTree, *, l2_clip_norm, per_layer, stacked: bool = False):
  """One example's gradient leaves in float32 or wider, each leaf's clip scale (a scalar), the global
  norm and whether it was clipped.

  stacked: `grad`'s leaves are already promoted and hold one example per row of a leading axis; the
  scales, norms and flags are then (B,) vectors, each row's the same as its example's alone. The DP
  engine computes them so, after its vmap: the same operations, traced once for the stack instead of
  through vmap's batching rules for each of hundreds of leaves."""
  leaves = jax.tree_util.tree_leaves(grad) if stacked else _promoted_leaves(grad)
  first = 1 if stacked else 0
  sq_norms = [jnp.sum(g * g, axis=tuple(range(first, g.ndim))) for g in leaves]
  norm = jnp.sqrt(sum(sq_norms))
  if per_layer:
    leaf_clip = l2_clip_norm / math.sqrt(len(leaves))
    leaf_norms = [jnp.sqrt(s) for s in sq_norms]
    scales = [leaf_clip / jnp.maximum(n, leaf_clip) for n in leaf_norms]
    was_clipped = jnp.any(jnp.stack([n > leaf_clip for n in leaf_norms]), axis=0)
  else:
    scale = l2_clip_norm / jnp.maximum(norm, l2_clip_norm)
    scales = [scale] * len(leaves)
    was_clipped = norm > l2_clip_norm
  return leaves, scales, norm, was_clipped


# ---------------------------------------------------------------------------------------------
# Clipped gradient sum over a batch.
# ---------------------------------------------------------------------------------------------
def _scalar_loss_fn(loss_fn: LossFn, has_aux: bool) -> Callable[..., tuple[jax.Array, Any]]:
  """Wraps `loss_fn` to always return (loss, aux) and to reject non-scalar losses when traced."""

  def wrapped(params, example, rng):
    out = loss_fn(params, example, rng)
    if has_aux:
      if not (isinstance(out, tuple) and len(out) == 2):
        raise TypeError('With has_aux=True, loss_fn must return a (scalar loss, aux) pair; got '
                        f'{type(out).__name__}.')
      loss, aux = out
    else:
      loss, aux = out, None
    shape = jnp.shape(loss)
    if shape != ():
      raise ValueError(
          f'loss_fn must return the scalar loss of ONE example (no batch axis), got shape {shape}. '
          'DP-SGD clips per example: write the loss for a single example; the batch axis is '
          'vmapped by the privacy engine.')
    if not jnp.issubdtype(jnp.result_type(loss), jnp.floating):
      raise TypeError(f'loss_fn must return a floating-point scalar, got {jnp.result_type(loss)}.')
    return loss, aux

  return wrapped


def _batch_size(batch: PyTree) -> int:
  leaves = jax.tree_util.tree_leaves(batch)
  if not leaves:
    raise ValueError('batch has no array leaves.')
  sizes = {jnp.shape(x)[0] if jnp.ndim(x) else None for x in leaves}
  if None in sizes or len(sizes) != 1:
    raise ValueError('Every batch leaf needs the same leading batch axis; got leading sizes '
                     f'{sorted(str(s) for s in sizes)}.')
  return sizes.pop()


def _microbatch_sum(value_and_grad, params, batch, mask, index, rng, *, l2_clip_norm, per_layer):
  """Clipped gradient sum and per-example stats of one microbatch (all examples vmapped)."""

  def one(example, example_index):
    (loss, aux), grad = value_and_grad(params, example, jax.random.fold_in(rng, example_index))
    return _promoted_leaves(grad), loss, aux

  treedef = jax.tree_util.tree_structure(params)
  leaves, loss, aux = jax.vmap(one)(batch, index)
  leaves, scales, norm, was_clipped = _clip_scales(leaves, l2_clip_norm=l2_clip_norm, per_layer=per_layer,
                                                   stacked=True)
  # Flat clipping has one scale for every leaf: masked (below) once, not once per leaf.
  scales = scales if per_layer else scales[:1]

  def masked(x):  # A select, not `* mask`: NaN/inf from padding must not leak (0 * NaN = NaN).
    # lax, not jnp.where: this runs for every parameter leaf (hundreds), and jnp.where is a nested jit
    # with its own broadcasting and type promotion each time it is traced.
    return lax.select(lax.broadcast_in_dim(mask, jnp.shape(x), (0,)), x, lax.full_like(x, 0))

  weights = [masked(s) for s in scales] * (1 if per_layer else len(leaves))
  # sum_i mask_i * scale_i * g_i as one (B,) x (B, ...) product per leaf: XLA:CPU ran the multiply-and-sum
  # as two operations per leaf (the scale broadcast to the stacked gradient's shape, then a reduction);
  # the product is one (benchmarks/NOTES.md, session 21). HIGHEST: no reduced-precision (TF32, bf16-pass)
  # products on accelerators; the sum is the float32 sum of the clipped gradients the sensitivity bounds.
  grad_sum = jax.tree_util.tree_unflatten(treedef, [_weighted_sum(w, masked(g)) for g, w in zip(leaves, weights)])
  per_example = {
      'loss': masked(loss),
      'grad_norm': masked(norm),
      'clipped': masked(was_clipped),
      'aux': jax.tree_util.tree_map(masked, aux),
  }
  return grad_sum, per_example


def _weighted_sum(w: jax.Array, g: jax.Array) -> jax.Array:
  """sum_i w_i g_i over the leading axis, in the wider of the two dtypes."""
  if w.dtype != g.dtype:  # E.g. a float64 norm's scale on a float32 leaf (x64 mode): jnp promotes.
    return jnp.tensordot(w, g, axes=(0, 0), precision=lax.Precision.HIGHEST)
  return lax.dot_general(w, g, (((0,), (0,)), ((), ())), precision=lax.Precision.HIGHEST)


def clipped_grad_sum(loss_fn: LossFn,
                     params: PyTree,
                     batch: PyTree,
                     rng: jax.Array,
                     *,
                     l2_clip_norm: Any,
                     mask: jax.Array | None = None,
                     microbatch_size: int | None = None,
                     num_microbatches: Any = None,
                     has_aux: bool = False,
                     per_layer: bool = False,
                     index_offset: Any = 0) -> tuple[PyTree, dict[str, Any]]:
  """Sum over real examples of the clipped per-example gradients.

  grad_sum = sum_i mask_i * clip(grad loss_fn(params, example_i, fold_in(rng, offset + i)), C)

  Why microbatching: vmap materializes one gradient per example, so memory grows with B. With
  `microbatch_size=m` the batch is reshaped to (B // m, m) and a loop accumulates the sums of
  m-example microbatches; the result equals the unbatched one up to float summation order.

  Why `num_microbatches`: Poisson batches vary in size. The batcher pads to ONE fixed buffer size
  (a multiple of m) and reports how many microbatches actually hold real examples; passing that
  count (may be traced) makes the loop run only over those, so one compilation serves every step
  and at most m - 1 padding examples are computed. Microbatches past the count are not computed at
  all: they must be padding. If one of them holds a real example (a bug upstream), grad_sum is
  set to NaN so the step fails loudly instead of silently dropping a sampled example.

  Args:
    loss_fn: `loss_fn(params, example, rng) -> scalar` (or `(scalar, aux)` with has_aux) for ONE
      example.
    params: parameters to differentiate (a pytree; a flax variables dict is checked for BatchNorm).
    batch: pytree whose leaves have a leading batch axis B.
    rng: key for this step; example i gets fold_in(rng, i).
    l2_clip_norm: C > 0; static or traced (validated only when concrete).
    mask: (B,), nonzero = real example, 0 = padding. Padding contributes exactly zero (even a
      NaN gradient) and reads as zero in the per-example outputs. Any nonzero value counts as 1:
      a mask is not a weight (weights > 1 would break the sensitivity bound).
    microbatch_size: m, static; B must be divisible by m.
    num_microbatches: optional count (<= B // m, may be traced) of leading microbatches to compute;
      requires microbatch_size.
    has_aux: loss_fn returns (loss, aux); aux is returned per example in aux["aux"].
    per_layer: clip each of the k parameter leaves to C / sqrt(k) (sensitivity still C).
    index_offset: the global index of row 0 (may be traced): a chunk of rows [o, o + B) of a
      larger batch gets the keys those rows get in the whole batch, so chunk sums add up to the
      batch's sum (`jaxldm.train.dp`'s host-accumulated step).

  Returns:
    grad_sum: pytree like params (float32 or wider).
    aux: "loss" (B,), "grad_norm" (B,) pre-clipping L2 norm, "clipped" (B,) whether each real
      example was clipped (per-layer: any leaf), "clipped_fraction" () over real examples, "aux"
      per-example aux (B, ...) or None. These are
      per-example values: in a DP run only aggregates may leave the step.

  Raises:
    ValueError: C <= 0, BatchNorm variables, bad shapes, B not divisible by m, non-scalar loss.
  """
  check_l2_clip_norm(l2_clip_norm)
  check_no_batch_stats(params)
  batch_size = _batch_size(batch)
  if mask is None:
    mask = jnp.ones((batch_size,), bool)
  else:
    if jnp.shape(mask) != (batch_size,):
      raise ValueError(f'mask must have shape ({batch_size},) like the batch, got '
                       f'{jnp.shape(mask)}.')
    mask = jnp.asarray(mask) != 0
  value_and_grad = jax.value_and_grad(_scalar_loss_fn(loss_fn, has_aux), has_aux=True)
  index = jnp.arange(batch_size, dtype=jnp.uint32) + jnp.asarray(index_offset, jnp.uint32)
  kwargs = dict(l2_clip_norm=l2_clip_norm, per_layer=per_layer)

  if microbatch_size is None:
    if num_microbatches is not None:
      raise ValueError('num_microbatches requires microbatch_size.')
    grad_sum, per_example = _microbatch_sum(value_and_grad, params, batch, mask, index, rng,
                                            **kwargs)
  else:
    grad_sum, per_example = _microbatched_sum(value_and_grad, params, batch, mask, index, rng,
                                              microbatch_size, num_microbatches, **kwargs)

  num_real = jnp.sum(mask)
  aux = {
      'loss': per_example['loss'],
      'grad_norm': per_example['grad_norm'],
      'clipped_fraction': jnp.sum(per_example['clipped']) / jnp.maximum(num_real, 1),
      'clipped': per_example['clipped'],
      'aux': per_example['aux'] if has_aux else None,
  }
  return grad_sum, aux


def _microbatched_sum(value_and_grad, params, batch, mask, index, rng, microbatch_size,
                      num_microbatches, **kwargs):
  """Loops over microbatches (scan for a static count, while-loop for a traced one)."""
  batch_size = mask.shape[0]
  if not isinstance(microbatch_size, (int, np.integer)) or microbatch_size < 1:
    raise ValueError(f'microbatch_size must be a positive int, got {microbatch_size!r}.')
  if batch_size % microbatch_size:
    raise ValueError(f'Batch size {batch_size} is not divisible by microbatch_size '
                     f'{microbatch_size}: pad the batch to a multiple of it (with mask 0).')
  n = batch_size // microbatch_size
  split = lambda x: x.reshape((n, microbatch_size) + x.shape[1:])
  batch, mask, index = jax.tree_util.tree_map(split, (batch, mask, index))
  take = lambda xs, j: jax.tree_util.tree_map(lambda x: lax.dynamic_index_in_dim(x, j, 0, False),
                                              xs)

  @jax.jit
  def run(j):
    # The loop body: per-example convolution kernel gradients as GEMMs (`conv.in_traced_loop`: the
    # unrolled ones run slower inside XLA:CPU's while loop). Speed only; the gradients are the same.
    from jaxldm.models import conv
    with conv.in_traced_loop():
      return _microbatch_sum(value_and_grad, params, *take((batch, mask, index), j), rng, **kwargs)

  # Jitted so that the shapes below and the loop's body share ONE trace of the model (the body's call
  # has the same argument type, a non-weak int32, and hits jit's cache): tracing is most of what a
  # microbatched step costs before it runs.
  index_type = jax.ShapeDtypeStruct((), jnp.int32)
  sum_shape, example_shape = jax.eval_shape(run, index_type)
  zeros = lambda s, lead=(): jnp.zeros(lead + s.shape, s.dtype)
  init = (jax.tree_util.tree_map(zeros, sum_shape),
          jax.tree_util.tree_map(lambda s: zeros(s, (n,)), example_shape))

  def body(j, carry):
    grad_sum, per_example = carry
    mb_sum, mb_example = run(lax.convert_element_type(j, jnp.int32))
    grad_sum = jax.tree_util.tree_map(jnp.add, grad_sum, mb_sum)
    per_example = jax.tree_util.tree_map(
        lambda buf, x: lax.dynamic_update_index_in_dim(buf, x, j, 0), per_example, mb_example)
    return grad_sum, per_example

  if num_microbatches is None:
    count = n
  elif isinstance(num_microbatches, (int, np.integer)):
    count = min(int(num_microbatches), n)
  else:
    count = jnp.minimum(num_microbatches, n)
  grad_sum, per_example = lax.fori_loop(0, count, body, init)
  if num_microbatches is not None:
    skipped_real = jnp.sum(jnp.where(jnp.arange(n) >= count, jnp.sum(mask, axis=1), 0))
    poisoned = skipped_real > 0
    grad_sum = jax.tree_util.tree_map(lambda g: lax.select(poisoned, lax.full_like(g, jnp.nan), g), grad_sum)
  unsplit = lambda x: x.reshape((batch_size,) + x.shape[2:])
  return grad_sum, jax.tree_util.tree_map(unsplit, per_example)
