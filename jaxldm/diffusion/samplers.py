"""DDPM (ancestral) and DDIM samplers with classifier-free guidance, one `lax.scan` each.

Deterministic for a key: the start noise and step i's noise come from split/fold_in of it. Guidance runs the
conditional and unconditional branches in ONE network call on a doubled batch.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxldm.diffusion.losses import ApplyFn
from jaxldm.diffusion.schedules import Schedule, to_x0_eps

METHODS = ("ddpm", "ddim")


def timesteps(schedule: Schedule, method: str, num_steps: int | None) -> np.ndarray:
  """Descending timesteps visited by the sampler."""
  T = schedule.num_timesteps
  if method == "ddpm" or num_steps is None or num_steps >= T:
    return np.arange(T - 1, -1, -1)
  if num_steps < 1:
    raise ValueError(f"num_steps must be >= 1, got {num_steps}")
  return np.unique(np.linspace(0, T - 1, num_steps).round().astype(np.int32))[::-1].copy()


def _guided(apply_fn, params, x, t, attributes, mask, guidance_scale):
  b = x.shape[0]
  tt = jnp.full((b,), t, jnp.int32)
  if attributes is None:
    return apply_fn(params, x, tt, None, None)
  if guidance_scale == 1.0:
    return apply_fn(params, x, tt, attributes, mask)
  out = apply_fn(params, jnp.concatenate([x, x]), jnp.concatenate([tt, tt]),
                 jnp.concatenate([attributes, attributes]), jnp.concatenate([mask, jnp.zeros_like(mask)]))
  cond, uncond = out[:b], out[b:]
  return uncond + guidance_scale * (cond - uncond)


def sample(apply_fn: ApplyFn, params: Any, shape: tuple[int, ...], rng: jax.Array, *, schedule: Schedule,
           prediction: str = "epsilon", attributes=None, attribute_mask=None, guidance_scale: float = 1.0,
           method: str = "ddim", num_steps: int | None = 50, eta: float = 0.0,
           clip_x0: float | None = None, shared_noise: bool = False) -> jax.Array:
  """Draws latents of `shape` = (B, D, H, W, Z). Jittable with the keyword arguments static.

  guidance_scale: 1 = plain conditional sampling, 0 = unconditional, > 1 = classifier-free guidance.
  method: "ddpm" (ancestral, all T steps) or "ddim" (num_steps steps; eta = 0 deterministic).
  shared_noise: every example of the batch starts from (and, for DDPM/eta > 0, is perturbed by) the
    same noise, so the batch differs only by its conditioning (conditioning sweeps).
  """
  if method not in METHODS:
    raise ValueError(f"unknown sampler {method!r}; choose one of {', '.join(METHODS)}")
  if attributes is not None and attribute_mask is None:
    attribute_mask = jnp.ones_like(attributes)
  ts = timesteps(schedule, method, num_steps)
  t_prev = np.concatenate([ts[1:], [-1]])
  ab = schedule.alphas_cumprod
  init_key, rng = jax.random.split(rng)
  noise_shape = (1, *shape[1:]) if shared_noise else shape

  def normal(key):
    return jnp.broadcast_to(jax.random.normal(key, noise_shape, jnp.float32), shape)

  x = normal(init_key)

  def step(x, inputs):
    i, t, tp = inputs
    out = _guided(apply_fn, params, x, t, attributes, attribute_mask, guidance_scale)
    x0, eps = to_x0_eps(schedule, prediction, x, jnp.full((shape[0],), t), out)
    if clip_x0 is not None:
      x0 = jnp.clip(x0, -clip_x0, clip_x0)
    ab_t = ab[t]
    ab_prev = jnp.where(tp >= 0, ab[jnp.maximum(tp, 0)], 1.0)
    z = normal(jax.random.fold_in(rng, i))
    if method == "ddpm":
      # Posterior q(x_{t-1} | x_t, x0): mean from x0 and x_t, variance beta~_t.
      beta_t = 1.0 - ab_t / ab_prev
      mean = (jnp.sqrt(ab_prev) * beta_t / (1.0 - ab_t)) * x0 + (jnp.sqrt(1.0 - beta_t) * (1.0 - ab_prev) / (1.0 - ab_t)) * x
      var = beta_t * (1.0 - ab_prev) / (1.0 - ab_t)
      x_next = mean + jnp.where(tp >= 0, jnp.sqrt(var), 0.0) * z
    else:
      sigma = eta * jnp.sqrt((1.0 - ab_prev) / (1.0 - ab_t) * (1.0 - ab_t / ab_prev))
      x_next = jnp.sqrt(ab_prev) * x0 + jnp.sqrt(jnp.maximum(1.0 - ab_prev - sigma ** 2, 0.0)) * eps + sigma * z
    return x_next, None

  xs = (jnp.arange(len(ts)), jnp.asarray(ts, jnp.int32), jnp.asarray(t_prev, jnp.int32))
  x, _ = jax.lax.scan(step, x, xs)
  return x
