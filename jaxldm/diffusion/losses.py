"""The per-example diffusion loss: ONE example in, one scalar out.

Written per example so that non-private training batches it with `vmap` and the DP engine uses the
very same function for per-example gradients (invariant 1: no batch axis inside).

Noise multiplicity (Dockhorn et al. 2023, DPDM): the example's loss is the mean over K independent
(timestep, noise) draws BEFORE any clipping, which lowers the gradient's variance at no privacy
cost (the example is still used once). Condition dropout trains the unconditional branch used by
classifier-free guidance (Daum et al.'s code never did).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from jaxldm.diffusion.schedules import Schedule, q_sample, target

# apply_fn(params, x_t [K, D, H, W, Z], t [K], attributes [K, A] | None, mask [K, A] | None) -> [K, D, H, W, Z]
ApplyFn = Callable[..., jax.Array]


def diffusion_loss(apply_fn: ApplyFn, params: Any, example: dict, rng: jax.Array, *, schedule: Schedule,
                   prediction: str = "epsilon", noise_multiplicity: int = 1,
                   cond_drop_prob: float = 0.1) -> jax.Array:
  """Mean squared error of the network's prediction, averaged over K draws.

  Args:
    example: {"latent": [D, H, W, Z], optional "attributes": [A], "attribute_mask": [A]}.
    rng: this example's key; the K draws are derived from it by fold_in.
  """
  x0 = example["latent"]
  if x0.ndim != 4:
    raise ValueError(f"diffusion_loss takes ONE example: latent must be (D, H, W, Z), got {x0.shape}")
  k = int(noise_multiplicity)
  if k < 1:
    raise ValueError(f"noise_multiplicity must be >= 1, got {noise_multiplicity}")
  # RNG: t, noise and dropout come from disjoint fold_ins of the example key.
  t = jax.random.randint(jax.random.fold_in(rng, 0), (k,), 0, schedule.num_timesteps)
  noise = jax.random.normal(jax.random.fold_in(rng, 1), (k,) + x0.shape, x0.dtype)
  x0k = jnp.broadcast_to(x0, (k,) + x0.shape)
  x_t = q_sample(schedule, x0k, t, noise)

  attributes = mask = None
  if "attributes" in example:
    attributes = jnp.broadcast_to(example["attributes"], (k,) + example["attributes"].shape)
    mask = example.get("attribute_mask")
    mask = jnp.ones_like(attributes) if mask is None else jnp.broadcast_to(mask, attributes.shape)
    if cond_drop_prob > 0:
      keep = jax.random.bernoulli(jax.random.fold_in(rng, 2), 1.0 - cond_drop_prob, (k, 1))
      mask = mask * keep.astype(mask.dtype)

  out = apply_fn(params, x_t, t, attributes, mask)
  err = jnp.square(out - target(schedule, prediction, x0k, t, noise))
  return err.mean()
