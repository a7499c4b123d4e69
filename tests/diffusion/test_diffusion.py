"""Schedules, the per-example loss and the samplers, checked against exact oracles."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxldm.diffusion import diffusion_loss, make_schedule, q_sample, sample, target, to_x0_eps

SHAPE = (2, 3, 4, 2)  # One latent (D, H, W, Z).


def test_paper_schedule():
  s = make_schedule("linear", 150, 1e-4, 7e-2)
  assert s.num_timesteps == 150
  np.testing.assert_allclose([s.betas[0], s.betas[-1]], [1e-4, 7e-2], rtol=1e-5)
  assert bool(jnp.all(jnp.diff(s.alphas_cumprod) < 0))
  for kind in ("scaled_linear", "cosine"):
    s = make_schedule(kind, 100, 1e-4, 2e-2)
    assert bool(jnp.all((s.betas > 0) & (s.betas < 1)))
  with pytest.raises(ValueError, match="unknown beta schedule"):
    make_schedule("quadratic")


@pytest.mark.parametrize("prediction", ["epsilon", "v"])
def test_parameterisations_invert(prediction):
  s = make_schedule("cosine", 50)
  x0 = jax.random.normal(jax.random.PRNGKey(0), (4,) + SHAPE)
  eps = jax.random.normal(jax.random.PRNGKey(1), x0.shape)
  t = jnp.array([0, 10, 30, 49])
  x_t = q_sample(s, x0, t, eps)
  x0_hat, eps_hat = to_x0_eps(s, prediction, x_t, t, target(s, prediction, x0, t, eps))
  np.testing.assert_allclose(x0_hat, x0, atol=2e-3)
  np.testing.assert_allclose(eps_hat, eps, atol=2e-3)


def _oracle(schedule, prediction, x_star_cond, x_star_uncond=None):
  """The exact denoiser of a point mass at x_star (per condition)."""
  def apply_fn(params, x_t, t, attributes, mask):
    del params, attributes
    x0 = jnp.broadcast_to(x_star_cond, x_t.shape)
    if mask is not None and x_star_uncond is not None:
      uncond = (mask.sum(-1) == 0).reshape((-1,) + (1,) * (x_t.ndim - 1))
      x0 = jnp.where(uncond, x_star_uncond, x0)
    ab = schedule.alphas_cumprod[t].reshape((-1,) + (1,) * (x_t.ndim - 1))
    eps = (x_t - jnp.sqrt(ab) * x0) / jnp.sqrt(1 - ab)
    return target(schedule, prediction, x0, t, eps)
  return apply_fn


@pytest.mark.parametrize("prediction", ["epsilon", "v"])
def test_loss_is_zero_for_the_oracle(prediction):
  s = make_schedule("linear", 150, 1e-4, 7e-2)
  x_star = jax.random.normal(jax.random.PRNGKey(2), SHAPE)
  example = {"latent": x_star, "attributes": jnp.ones(3), "attribute_mask": jnp.ones(3)}
  loss = diffusion_loss(_oracle(s, prediction, x_star), None, example, jax.random.PRNGKey(3),
                        schedule=s, prediction=prediction, noise_multiplicity=4)
  assert loss.shape == () and float(loss) < 1e-8
  wrong = lambda *a: jnp.zeros_like(a[1])
  assert float(diffusion_loss(wrong, None, example, jax.random.PRNGKey(3), schedule=s, prediction=prediction)) > 0.1


def test_noise_multiplicity_averages_k_draws():
  """The K-draw loss is the mean of per-draw squared errors (a variance reduction, not a sum)."""
  s = make_schedule("linear", 150, 1e-4, 7e-2)
  x_star = jnp.ones(SHAPE)
  zero = lambda params, x_t, t, a, m: jnp.zeros_like(x_t)
  losses = [float(diffusion_loss(zero, None, {"latent": x_star}, jax.random.PRNGKey(i), schedule=s,
                                 noise_multiplicity=k)) for i, k in ((0, 1), (1, 1), (2, 64))]
  # The epsilon target has unit variance: the K=64 average sits near 1, single draws scatter.
  assert abs(losses[2] - 1.0) < 0.1
  with pytest.raises(ValueError, match="ONE example"):
    diffusion_loss(zero, None, {"latent": jnp.ones((2,) + SHAPE)}, jax.random.PRNGKey(0), schedule=s)


@pytest.mark.parametrize("method, steps", [("ddim", 20), ("ddpm", None)])
@pytest.mark.parametrize("prediction", ["epsilon", "v"])
def test_sampler_recovers_a_point_mass(method, steps, prediction):
  s = make_schedule("linear", 150, 1e-4, 7e-2)
  x_star = jax.random.normal(jax.random.PRNGKey(4), SHAPE)
  run = jax.jit(functools.partial(sample, _oracle(s, prediction, x_star), None, (3,) + SHAPE,
                                  schedule=s, prediction=prediction, method=method, num_steps=steps))
  out = run(jax.random.PRNGKey(5))
  np.testing.assert_allclose(out, jnp.broadcast_to(x_star, out.shape), atol=1e-3)
  np.testing.assert_array_equal(out, run(jax.random.PRNGKey(5)))  # Deterministic for a key.


def test_classifier_free_guidance_extrapolates():
  s = make_schedule("linear", 150, 1e-4, 7e-2)
  cond, uncond = jnp.full(SHAPE, 1.0), jnp.full(SHAPE, -1.0)
  fn = _oracle(s, "epsilon", cond, uncond)
  attrs = jnp.ones((2, 3))
  for scale, expected in ((1.0, 1.0), (0.0, -1.0), (2.0, 3.0)):
    out = sample(fn, None, (2,) + SHAPE, jax.random.PRNGKey(6), schedule=s, attributes=attrs,
                 guidance_scale=scale, method="ddim", num_steps=10)
    np.testing.assert_allclose(out, expected, atol=2e-3)


@pytest.mark.parametrize("method, steps", [("ddim", 10), ("ddpm", None)])
def test_shared_noise_leaves_only_the_conditioning(method, steps):
  """shared_noise: a batch with equal conditioning gives equal samples; different conditioning, different ones."""
  s = make_schedule("linear", 60, 1e-4, 7e-2)

  def fn(params, x, t, attributes, mask):  # A denoiser whose output depends on x and the attribute.
    return 0.5 * x + attributes[:, :1, None, None, None] * mask[:, :1, None, None, None]

  def draw(attrs, shared):
    return sample(fn, None, (3,) + SHAPE, jax.random.PRNGKey(7), schedule=s, attributes=attrs,
                  method=method, num_steps=steps, shared_noise=shared)
  same = jnp.ones((3, 2))
  out = draw(same, True)
  np.testing.assert_array_equal(out[0], out[1])
  np.testing.assert_array_equal(out[0], out[2])
  assert not np.allclose(draw(same, False)[0], draw(same, False)[1])  # Without it: a noise per example.
  rising = jnp.array([[0.0, 1.0], [1.0, 1.0], [2.0, 1.0]])
  varied = draw(rising, True)
  assert not np.allclose(varied[0], varied[2])
