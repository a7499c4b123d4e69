"""Privatizers for `audit.audit_private_step`: the trainers' real step and six broken ones.

An engine turns one padded, masked, sharded Poisson batch into a noisy gradient, with the signature

  fn(loss_fn, params, batch, mask, num_microbatches, rng, *, dp, noise_multiplier,
     expected_batch_size, mesh) -> grads

`trainer` is `jaxldm.train.dp.private_gradient` itself (what both trainers call), NOT a copy. The
broken engines exist to prove that the audit has power: each reproduces one classic DP-SGD bug
that does not crash, and the audit must flag every one of them (tests/privacy/test_audit.py, and
`jaxldm privacy audit --engine NAME`). Never train with them.

  noise_per_microbatch  Gaussian noise added to every microbatch's sum (noise grows with
                        sqrt(#microbatches), which varies with the Poisson batch size; invisible
                        when every batch fits in one microbatch)
  noise_per_device      every device adds full noise to its shard's sum before the all-reduce
                        (noise x sqrt(#devices); invisible on one device)
  actual_batch_size     divides by the actual (private, varying) batch size instead of q * N
  half_sigma            the trainer's step with half the claimed noise multiplier
  no_clipping           per-example clipping skipped (unbounded sensitivity)
  mask_ignored          padding rows counted: the mask is ignored and every microbatch computed
"""

from __future__ import annotations

from collections.abc import Callable
import dataclasses
from typing import Any

import jax
from jax import lax
import jax.numpy as jnp

from jaxldm.privacy import clipping
from jaxldm.privacy import noise

P = jax.sharding.PartitionSpec
_NO_CLIP = 1e30  # A clip norm no gradient reaches: clipping.clip_gradient scales by exactly 1.


@dataclasses.dataclass(frozen=True)
class Engine:
  """A privatizer the audit can be pointed at."""
  name: str
  description: str
  fn: Callable[..., Any]
  noise_scale: float = 1.0  # The engine adds noise_scale * sigma while the claim stays sigma.
  broken: bool = True


def _trainer(loss_fn, params, batch, mask, num_microbatches, rng, *, dp, noise_multiplier,
             expected_batch_size, mesh):
  """The trainers' step: `dp.private_gradient`, of which only the gradient is used; with
  dp.microbatch_loop "accumulate" (CPU trainers) the same two halves the host-accumulated step
  compiles (`dp.chunk_sums` per chunk of m x devices rows, then `dp.release_sums`)."""
  from jaxldm.train import dp as dp_lib

  if dp_lib.microbatch_loop(dp) == 'accumulate':
    grads, _ = dp_lib.accumulated_gradient(loss_fn, params, batch, mask, rng, dp=dp,
                                           noise_multiplier=noise_multiplier,
                                           expected_batch_size=expected_batch_size,
                                           chunk_rows=dp.microbatch_size * mesh.devices.size)
    return grads
  # The trainers shard the batch over the mesh and let jit partition the step.
  grads, _ = dp_lib.private_gradient(loss_fn, params, batch, mask, num_microbatches, rng, dp=dp,
                                     noise_multiplier=noise_multiplier,
                                     expected_batch_size=expected_batch_size)
  return grads


def _divide(tree, divisor):
  return jax.tree_util.tree_map(lambda x: x / jnp.asarray(divisor, x.dtype), tree)


def _noise_per_microbatch(loss_fn, params, batch, mask, num_microbatches, rng, *, dp,
                          noise_multiplier, expected_batch_size, mesh):
  del mesh
  example_rng, noise_rng = noise.split_step_rng(rng)
  m = dp.microbatch_size
  n = mask.shape[0] // m
  split = lambda x: x.reshape((n, m) + x.shape[1:])
  batches, masks = jax.tree_util.tree_map(split, batch), split(mask)
  std = noise_multiplier * dp.l2_clip_norm

  def body(j, total):
    microbatch = jax.tree_util.tree_map(lambda x: x[j], batches)
    grad_sum, _ = clipping.clipped_grad_sum(loss_fn, params, microbatch,
                                            jax.random.fold_in(example_rng, j),
                                            l2_clip_norm=dp.l2_clip_norm, mask=masks[j],
                                            per_layer=bool(dp.per_layer))
    grad_sum = noise.add_noise(grad_sum, jax.random.fold_in(noise_rng, j), std=std)  # BUG.
    return jax.tree_util.tree_map(jnp.add, total, grad_sum)

  zeros = jax.tree_util.tree_map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
  return _divide(lax.fori_loop(0, num_microbatches, body, zeros), expected_batch_size)


def _noise_per_device(loss_fn, params, batch, mask, num_microbatches, rng, *, dp,
                      noise_multiplier, expected_batch_size, mesh):
  del num_microbatches  # Each device loops over its own rows.
  example_rng, noise_rng = noise.split_step_rng(rng)
  std = noise_multiplier * dp.l2_clip_norm

  def local(batch, mask, example_rng, noise_rng):
    grad_sum, _ = clipping.clipped_grad_sum(loss_fn, params, batch, example_rng,
                                            l2_clip_norm=dp.l2_clip_norm, mask=mask,
                                            microbatch_size=dp.microbatch_size,
                                            per_layer=bool(dp.per_layer))
    device_rng = jax.random.fold_in(noise_rng, lax.axis_index('data'))
    grad_sum = noise.add_noise(grad_sum, device_rng, std=std)  # BUG: before the all-reduce.
    return lax.psum(grad_sum, 'data')

  total = jax.shard_map(local, mesh=mesh, in_specs=(P('data'), P('data'), P(), P()),
                        out_specs=P(), check_vma=False)(batch, mask, example_rng, noise_rng)
  return _divide(total, expected_batch_size)


def _actual_batch_size(loss_fn, params, batch, mask, num_microbatches, rng, *, dp,
                       noise_multiplier, expected_batch_size, mesh):
  del mesh, expected_batch_size
  actual = jnp.maximum(jnp.sum(mask), 1.0)  # BUG: the Poisson batch size is itself private.
  grads, _ = noise.private_grad(loss_fn, params, batch, rng, l2_clip_norm=dp.l2_clip_norm,
                                noise_multiplier=noise_multiplier, expected_batch_size=actual,
                                mask=mask, microbatch_size=dp.microbatch_size,
                                num_microbatches=num_microbatches, per_layer=bool(dp.per_layer))
  return grads


def _no_clipping(loss_fn, params, batch, mask, num_microbatches, rng, *, dp, noise_multiplier,
                 expected_batch_size, mesh):
  del mesh
  example_rng, noise_rng = noise.split_step_rng(rng)
  grad_sum, _ = clipping.clipped_grad_sum(loss_fn, params, batch, example_rng,
                                          l2_clip_norm=_NO_CLIP,  # BUG: nothing is clipped.
                                          mask=mask, microbatch_size=dp.microbatch_size,
                                          num_microbatches=num_microbatches,
                                          per_layer=bool(dp.per_layer))
  grad_sum = noise.add_noise(grad_sum, noise_rng, std=noise_multiplier * dp.l2_clip_norm)
  return _divide(grad_sum, expected_batch_size)


def _mask_ignored(loss_fn, params, batch, mask, num_microbatches, rng, *, dp, noise_multiplier,
                  expected_batch_size, mesh):
  del num_microbatches  # BUG: every row is real, so every microbatch is computed.
  return _trainer(loss_fn, params, batch, jnp.ones_like(mask), None, rng, dp=dp,
                  noise_multiplier=noise_multiplier, expected_batch_size=expected_batch_size,
                  mesh=mesh)


TRAINER = Engine('trainer', "the trainers' own step (jaxldm.train.dp.private_gradient)", _trainer,
                 broken=False)

BROKEN_ENGINES: dict[str, Engine] = {e.name: e for e in (
    Engine('noise_per_microbatch', 'noise added to every microbatch sum', _noise_per_microbatch),
    Engine('noise_per_device', 'every device adds full noise before the all-reduce',
           _noise_per_device),
    Engine('actual_batch_size', 'divides by the actual batch size, not the expected q * N',
           _actual_batch_size),
    Engine('half_sigma', "the trainer's step with half the claimed noise", _trainer,
           noise_scale=0.5),
    Engine('no_clipping', 'per-example clipping skipped', _no_clipping),
    Engine('mask_ignored', 'padding rows counted (mask ignored)', _mask_ignored),
)}

ENGINES: dict[str, Engine] = {'trainer': TRAINER, **BROKEN_ENGINES}


def get(name: str) -> Engine:
  try:
    return ENGINES[name]
  except KeyError:
    raise ValueError(f'unknown engine {name!r}; choose from {", ".join(ENGINES)}') from None
