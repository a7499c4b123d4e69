"""Gaussian noise for DP-SGD: the randomness half of the Gaussian mechanism.

The noise is calibrated to the SUM of clipped gradients, whose L2 sensitivity the clipping module
reports (`clipping.sensitivity`): std = noise_multiplier * sensitivity. It is added ONCE per
logical batch (never per microbatch or per device: that would multiply the noise by
sqrt(#microbatches) and silently waste utility, or, if divided back, under-noise), and the noisy
sum is divided by the EXPECTED batch size q * N, never by the actual Poisson batch size: the actual
size depends on which examples were sampled and is itself private.

Key derivation inside `private_grad` (the trainer passes rng = fold_in(run_key, step)):
  example_rng = fold_in(rng, EXAMPLE_STREAM)          # per-example randomness (diffusion t, noise)
  rng_i       = fold_in(example_rng, i)               # i = global index of the example in the batch
  noise_rng   = fold_in(rng, NOISE_STREAM)            # DP noise, independent of every rng_i
  noise       = normal(noise_rng, (total size,))      # ONE draw; leaf j (tree_flatten order) its own slice
The global example index i subsumes (microbatch, position in microbatch), so keys do not depend on
the microbatch size. Keeping the noise stream separate matters: if an example reused the noise key,
the loss randomness would be correlated with the DP noise.

Released statistics (docs/privacy.md, "Nothing un-noised leaves"): the mean loss and the fraction of
clipped examples of a private batch are membership signals if logged as computed. With
`stats_weight` w > 0, each example contributes, besides its clipped gradient (norm <= C), one extra
coordinate per statistic, bounded by w * C: its loss clipped to [-stats_bound, stats_bound] and
scaled by w * C / stats_bound, and its "was clipped" indicator times w * C. The gradient and these
coordinates form ONE vector with L2 sensitivity C_joint = C * sqrt(1 + k w^2) (k statistics), and ONE
Gaussian mechanism adds N(0, (sigma * C_joint)^2) to all of it: the accountant's analysis of sigma is
unchanged (noise relative to the sensitivity), no separate budget is spent, and the statistics' noise
scales with sigma. The price is sqrt(1 + k w^2) more gradient noise (1% for k = 2, w = 0.1). The
statistics are divided by the expected batch size, like the gradient (Andrew et al. 2021 release the
clipped count of adaptive clipping the same way).
"""

from collections.abc import Callable
from typing import Any

import jax
from jax import lax
import jax.numpy as jnp

from jaxldm.privacy import clipping
from jaxldm.privacy.checks import check_arg

PyTree = Any

EXAMPLE_STREAM = 0
NOISE_STREAM = 1


def split_step_rng(rng: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(example_rng, noise_rng) for one step; see the module docstring for why they differ."""
  return jax.random.fold_in(rng, EXAMPLE_STREAM), jax.random.fold_in(rng, NOISE_STREAM)


def stat_sums(aux: dict[str, Any], *, stats_bound: Any) -> dict[str, Any]:
  """Per-statistic sums over a batch (or a chunk of it) of the BOUNDED per-example values.

  loss and every scalar aux value: sum of clip(x, -B, B); was-clipped indicator: sum of 0/1.
  Masked (padding) rows are already zero in `aux` (clipping masks them with `where`). Sums of
  chunks add up to the sum of the batch; `release` scales them to the mechanism's coordinates.
  """
  sums = {'loss': jnp.sum(jnp.clip(aux['loss'], -stats_bound, stats_bound)),
          'clipped_fraction': jnp.sum(aux['clipped'].astype(jnp.float32))}
  for name, value in (aux.get('aux') or {}).items():
    if jnp.ndim(value) == 1:  # Scalars per example only.
      sums[name] = jnp.sum(jnp.clip(value, -stats_bound, stats_bound))
  return sums


def add_noise(grad_sum: PyTree, rng: jax.Array, *, std: Any) -> PyTree:
  """Adds N(0, std^2) independently to every coordinate.

  One float32 normal vector covers all leaves (leaf j gets its own disjoint slice), cast to each
  leaf's dtype: the coordinates are independent exactly as with one key per leaf, but XLA compiles
  one random-number generator instead of one per leaf (on CPU each costs ~0.5 s of compile time, a
  UNet has hundreds of leaves). `std` may be traced.
  """
  leaves, treedef = jax.tree_util.tree_flatten(grad_sum)
  sizes = [g.size for g in leaves]
  flat = jax.random.normal(rng, (sum(sizes),), jnp.float32)
  stds = _by_dtype(std, leaves)
  noisy, offset = [], 0
  for g, size in zip(leaves, sizes):
    # lax.slice, not flat[a:b]: jnp indexing parses its index each time, for every leaf (hundreds).
    z = lax.reshape(lax.slice(flat, (offset,), (offset + size,)), g.shape).astype(g.dtype)
    noisy.append(g + stds[g.dtype] * z)
    offset += size
  return jax.tree_util.tree_unflatten(treedef, noisy)


def _by_dtype(value: Any, leaves) -> dict:
  """{dtype: value as that dtype} for the leaves' dtypes, converted once each (not once per leaf), in
  leaf order (a set's order could change the traced program between processes)."""
  return {dtype: jnp.asarray(value, dtype) for dtype in dict.fromkeys(x.dtype for x in leaves)}


def _check_nonnegative_if_concrete(name: str, value: Any, strict: bool = False) -> None:
  """Validates a concrete value; a traced one is the caller's to validate (config time)."""
  try:
    v = float(value)
  except (TypeError, jax.errors.ConcretizationTypeError):
    return
  check_arg(name, v, '(0, inf)' if strict else '[0, inf)')


def private_grad(loss_fn: Callable[..., Any],
                 params: PyTree,
                 batch: PyTree,
                 rng: jax.Array,
                 *,
                 l2_clip_norm: Any,
                 noise_multiplier: Any,
                 expected_batch_size: Any,
                 mask: jax.Array | None = None,
                 microbatch_size: int | None = None,
                 num_microbatches: Any = None,
                 has_aux: bool = False,
                 per_layer: bool = False,
                 stats_weight: float = 0.0,
                 stats_bound: float = 1.0) -> tuple[PyTree, dict[str, Any]]:
  """DP-SGD gradient of one logical batch: (clipped sum + Gaussian noise) / expected batch size.

  g = (sum_i mask_i clip(grad_i, C) + N(0, (noise_multiplier * C)^2 I)) / expected_batch_size

  Args:
    loss_fn: `loss_fn(params, example, rng) -> scalar` for ONE example (see clipping).
    params: parameters to differentiate.
    batch: pytree with leading batch axis B (padded; see mask).
    rng: this step's key (fold_in(run_key, step)); split as in the module docstring.
    l2_clip_norm: C > 0 (static or traced).
    noise_multiplier: sigma >= 0 (static or traced); 0 gives the non-private clipped mean.
    expected_batch_size: q * N (static or traced), NOT the number of real examples in this batch.
    mask: (B,) 1 = real, 0 = padding.
    microbatch_size: see `clipping.clipped_grad_sum`.
    num_microbatches: see `clipping.clipped_grad_sum` (variable count, one compilation).
    has_aux: loss_fn returns (loss, aux).
    per_layer: per-layer clipping (sensitivity still C).
    stats_weight: w (static); > 0 releases noisy means of the loss, the clipped fraction and each
      scalar aux value through the same Gaussian mechanism (module docstring); 0 releases none.
    stats_bound: B (static) > 0; per-example losses and aux values are clipped to [-B, B].

  Returns:
    (noisy averaged gradient like params, aux from clipping (per example: never to be released
    from a DP run) plus "noise_std" of the gradient after division, i.e.
    sigma * C_joint / expected_batch_size, and with stats_weight > 0 "released": {name: noisy mean
    over the expected batch size} and "released_noise_std": {name: its noise std}).
  """
  example_rng, noise_rng = split_step_rng(rng)
  grad_sum, aux = clipping.clipped_grad_sum(
      loss_fn, params, batch, example_rng, l2_clip_norm=l2_clip_norm, mask=mask,
      microbatch_size=microbatch_size, num_microbatches=num_microbatches, has_aux=has_aux,
      per_layer=per_layer)
  sums = stat_sums(aux, stats_bound=stats_bound) if stats_weight > 0 else {}
  grad, released = release(grad_sum, sums, noise_rng, l2_clip_norm=l2_clip_norm,
                           noise_multiplier=noise_multiplier, expected_batch_size=expected_batch_size,
                           per_layer=per_layer, stats_weight=stats_weight, stats_bound=stats_bound)
  aux.update(released)
  return grad, aux


def release(grad_sum: PyTree,
            sums: dict[str, Any],
            noise_rng: jax.Array,
            *,
            l2_clip_norm: Any,
            noise_multiplier: Any,
            expected_batch_size: Any,
            per_layer: bool = False,
            stats_weight: float = 0.0,
            stats_bound: float = 1.0) -> tuple[PyTree, dict[str, Any]]:
  """The Gaussian mechanism of ONE logical batch: noise on the clipped sums, then / q N.

  `grad_sum` is the clipped gradient sum of the WHOLE logical batch (every microbatch or chunk of it
  already added: noise is added once), `sums` its `stat_sums` ({} or ignored when stats_weight is
  0), `noise_rng` the batch's noise key (`split_step_rng(rng)[1]`). `private_grad` is clipping then
  this; the trainers' host-accumulated step (`jaxldm.train.dp`) calls the same two halves.

  Returns:
    (noisy averaged gradient like grad_sum, {"noise_std": std after division, and with
    stats_weight > 0 "released": {name: noisy mean over the expected batch size},
    "released_noise_std": {name: its noise std}}).
  """
  _check_nonnegative_if_concrete('noise_multiplier', noise_multiplier)
  _check_nonnegative_if_concrete('expected_batch_size', expected_batch_size, strict=True)
  num_leaves = len(jax.tree_util.tree_leaves(grad_sum))
  sens = clipping.sensitivity(l2_clip_norm, per_layer, num_leaves)
  check_arg('stats_weight', stats_weight, '[0, inf)')
  out = {}
  if stats_weight > 0:
    check_arg('stats_bound', stats_bound, '(0, inf]')
    weight = stats_weight * l2_clip_norm
    unit = {name: (weight if name == 'clipped_fraction' else weight / stats_bound) for name in sums}
    stats = {name: sums[name] * unit[name] for name in sums}  # Each example's coordinate <= w C.
    joint = jnp.sqrt(sens**2 + len(stats) * weight**2)  # Add/remove-one L2 sensitivity of the vector.
    std = noise_multiplier * joint
    noisy_sum, noisy_stats = add_noise((grad_sum, stats), noise_rng, std=std)  # ONE mechanism.
    out['released'] = {name: noisy_stats[name] / unit[name] / expected_batch_size for name in stats}
    out['released_noise_std'] = {name: std / unit[name] / expected_batch_size for name in stats}
  else:
    std = noise_multiplier * sens
    noisy_sum = add_noise(grad_sum, noise_rng, std=std)
  divisors = _by_dtype(expected_batch_size, jax.tree_util.tree_leaves(noisy_sum))
  grad = jax.tree_util.tree_map(lambda x: x / divisors[x.dtype], noisy_sum)
  out['noise_std'] = std / expected_batch_size
  return grad, out
