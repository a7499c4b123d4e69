"""Noise schedules for discrete-time DDPM (Ho et al. 2020) and conversions between parameterisations.

Daum et al. 2024: T = 150, linear betas 1e-4 .. 7e-2, epsilon prediction.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

KINDS = ("linear", "scaled_linear", "cosine")
PREDICTIONS = ("epsilon", "v")


class Schedule(NamedTuple):
  betas: jax.Array            # [T]
  alphas_cumprod: jax.Array   # [T]  abar_t = prod_{s<=t} (1 - beta_s)

  @property
  def num_timesteps(self) -> int:
    return self.betas.shape[0]


def make_schedule(kind: str = "linear", num_timesteps: int = 150, beta_start: float = 1e-4,
                  beta_end: float = 7e-2) -> Schedule:
  if num_timesteps < 1:
    raise ValueError(f"num_timesteps must be >= 1, got {num_timesteps}")
  if kind == "linear":
    betas = np.linspace(beta_start, beta_end, num_timesteps, dtype=np.float64)
  elif kind == "scaled_linear":
    betas = np.linspace(beta_start ** 0.5, beta_end ** 0.5, num_timesteps, dtype=np.float64) ** 2
  elif kind == "cosine":  # Nichol & Dhariwal 2021, s = 0.008, betas capped at 0.999.
    s = 0.008
    steps = np.arange(num_timesteps + 1, dtype=np.float64) / num_timesteps
    f = np.cos((steps + s) / (1 + s) * np.pi / 2) ** 2
    betas = np.clip(1 - f[1:] / f[:-1], 0, 0.999)
  else:
    raise ValueError(f"unknown beta schedule {kind!r}; choose one of {', '.join(KINDS)}")
  if np.any(betas <= 0) or np.any(betas >= 1):
    raise ValueError(f"betas must lie in (0, 1); got range [{betas.min()}, {betas.max()}]")
  alphas_cumprod = np.cumprod(1.0 - betas)
  return Schedule(jnp.asarray(betas, jnp.float32), jnp.asarray(alphas_cumprod, jnp.float32))


def _abar(schedule: Schedule, t, ndim: int):
  ab = schedule.alphas_cumprod[t]
  return ab.reshape(ab.shape + (1,) * (ndim - ab.ndim))


def q_sample(schedule: Schedule, x0, t, noise):
  """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps."""
  ab = _abar(schedule, t, x0.ndim)
  return jnp.sqrt(ab) * x0 + jnp.sqrt(1.0 - ab) * noise


def target(schedule: Schedule, prediction: str, x0, t, noise):
  """What the network is trained to output."""
  if prediction == "epsilon":
    return noise
  if prediction == "v":  # Salimans & Ho 2022: v = sqrt(abar) eps - sqrt(1 - abar) x0.
    ab = _abar(schedule, t, x0.ndim)
    return jnp.sqrt(ab) * noise - jnp.sqrt(1.0 - ab) * x0
  raise ValueError(f"unknown prediction {prediction!r}; choose one of {', '.join(PREDICTIONS)}")


def to_x0_eps(schedule: Schedule, prediction: str, x_t, t, output):
  """Model output -> (x0, eps) estimates."""
  ab = _abar(schedule, t, x_t.ndim)
  if prediction == "epsilon":
    eps = output
    x0 = (x_t - jnp.sqrt(1.0 - ab) * eps) / jnp.sqrt(ab)
  elif prediction == "v":
    x0 = jnp.sqrt(ab) * x_t - jnp.sqrt(1.0 - ab) * output
    eps = jnp.sqrt(1.0 - ab) * x_t + jnp.sqrt(ab) * output
  else:
    raise ValueError(f"unknown prediction {prediction!r}; choose one of {', '.join(PREDICTIONS)}")
  return x0, eps
