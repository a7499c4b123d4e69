"""Can the models learn at all? Tiny networks must overfit one fixed batch, and conditioning must steer
the sampler.

These are the cheapest end-to-end signals that gradients reach every part of the models: a wiring bug
(a detached branch, a loss that ignores the target, attributes that never reach cross-attention)
leaves every shape check green but stops the loss from falling or the samples from depending on the
condition. Models and steps are built directly, without the trainers, so that a failure points at the
models and losses rather than at I/O or config plumbing.
"""

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy.ndimage import gaussian_filter

from jaxldm.diffusion import diffusion_loss, make_schedule, sample
from jaxldm.models import AutoencoderKL, LatentUNet
from jaxldm.train.autoencoder import generator_loss

# These programs run a few dozen times on tiny arrays, so XLA's CPU backend optimisation (most of the
# compile time of a small Flax model) costs far more than it saves. Numerics are unaffected beyond
# rounding; the assertions below do not rely on bitwise equality ACROSS programs, only within one.
_jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})

AE = AutoencoderKL(channels=(8, 16), num_res_blocks=1, latent_channels=2, kernel=(1, 3, 3),
                   stride=(1, 2, 2), attention=False)
UNET = LatentUNet(out_channels=2, base_channels=8, channel_mult=(1, 2), num_res_blocks=1,
                  attention_levels=(1,), heads=2, kernel=(1, 3, 3), stride=(1, 2, 2),
                  num_attributes=3, context_dim=8)
# Short schedule whose last step still keeps sqrt(0.34) of the signal: with two training latents the
# ideal denoiser can always tell them apart, so a near-zero loss is reachable.
SCHEDULE = make_schedule("linear", 10, 1e-4, 0.2)
LATENTS = (2, 4, 8, 8, 2)  # (B, D, H, W, Z)
ATTRIBUTES = jnp.array([[1.0, -1.0, 0.5], [-1.0, 1.0, -0.5]])

# Step counts with room to spare: over seeds 0-6 these gave falls of at least 13x (autoencoder) and
# 10x (LDM), while most of the file's time goes to compiling, not to the steps.
AE_STEPS = 100
LDM_STEPS = 30
MIN_FALL = 5.0  # Acceptance criterion: the loss falls by at least this factor.


class Fit(NamedTuple):
  first: float   # Loss of the initial parameters, with the evaluation key.
  last: float    # Loss of the final parameters, with the same key.
  params: Any


def _overfit(batch_loss, params, steps, eval_key, train_key=None, lr=1e-2):
  """Adam on `batch_loss(params, key)`; the first and last losses use the same fixed key.

  With `train_key=None` every step reuses `eval_key` too (the same noise draws each step). The jitted
  update returns the loss of the parameters it was given, so calling it with `eval_key` also serves as
  the (comparable) evaluation, without compiling a second program.
  """
  tx = optax.adam(lr)

  @_jit
  def update(params, opt_state, key):
    loss, grads = jax.value_and_grad(batch_loss)(params, key)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  opt_state = tx.init(params)
  first = update(params, opt_state, eval_key)[2]
  for i in range(steps):
    key = eval_key if train_key is None else jax.random.fold_in(train_key, i)
    params, opt_state, _ = update(params, opt_state, key)
  last = update(params, opt_state, eval_key)[2]
  return Fit(float(first), float(last), params)


def _per_example_keys(key, n):
  """Example i of a batch uses fold_in(key, i), as the trainers do."""
  return jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(n))


def _apply_unet(params, x_t, t, attributes, mask):
  return UNET.apply(params, x_t, t, attributes, mask)


def _smooth_volumes(seed, n=2, shape=(4, 16, 16)):
  """Smooth in-plane random fields, standardised: compressible like anatomy, unlike white noise."""
  rng = np.random.default_rng(seed)
  v = np.stack([gaussian_filter(rng.normal(size=shape), (0.5, 2.0, 2.0)) for _ in range(n)])
  return jnp.asarray((v - v.mean()) / v.std(), jnp.float32)


def fit_autoencoder(seed, steps=AE_STEPS):
  volumes = _smooth_volumes(seed)
  params = _jit(AE.init)(jax.random.PRNGKey(seed), volumes[:1, ..., None])

  def batch_loss(params, key):
    loss = lambda v, k: generator_loss(AE, None, params, None, {"volume": v}, k, kl_weight=1e-6,
                                       adv_weight=0.0, adv_loss="hinge")[0]
    return jax.vmap(loss)(volumes, _per_example_keys(key, volumes.shape[0])).mean()

  # Fresh posterior samples every step: the autoencoder must fit the batch, not one noise draw.
  return _overfit(batch_loss, params, steps, jax.random.PRNGKey(1000 + seed),
                  train_key=jax.random.PRNGKey(2000 + seed))


def fit_ldm(seed, steps=LDM_STEPS):
  batch = {"latent": jax.random.normal(jax.random.PRNGKey(seed), LATENTS), "attributes": ATTRIBUTES,
           "attribute_mask": jnp.ones_like(ATTRIBUTES)}
  params = _jit(UNET.init)(jax.random.PRNGKey(seed), batch["latent"], jnp.zeros((LATENTS[0],), jnp.int32),
                           ATTRIBUTES, batch["attribute_mask"])

  def batch_loss(params, key):
    loss = lambda ex, k: diffusion_loss(_apply_unet, params, ex, k, schedule=SCHEDULE,
                                        noise_multiplicity=4, cond_drop_prob=0.1)
    return jax.vmap(loss)(batch, _per_example_keys(key, LATENTS[0])).mean()

  # One fixed key for every step: the same 4 (timestep, noise) draws per latent, so the loss measured
  # at the start and at the end is of the very same regression problem.
  return _overfit(batch_loss, params, steps, jax.random.PRNGKey(1000 + seed))


@pytest.fixture(scope="module")
def ldm_fit():
  return fit_ldm(0)


def test_autoencoder_overfits_a_fixed_batch():
  fit = fit_autoencoder(0)
  assert np.isfinite(fit.last)
  assert fit.first / fit.last >= MIN_FALL, f"L1+KL loss {fit.first:.4f} -> {fit.last:.4f} in {AE_STEPS} steps"


def test_latent_diffusion_overfits_a_fixed_batch(ldm_fit):
  # The zero-initialised output conv predicts eps = 0 at first: a loss near E[eps^2] = 1.
  assert 0.5 < ldm_fit.first < 2.0
  assert np.isfinite(ldm_fit.last)
  assert ldm_fit.first / ldm_fit.last >= MIN_FALL, (
      f"diffusion loss {ldm_fit.first:.4f} -> {ldm_fit.last:.4f} in {LDM_STEPS} steps")


def test_conditioning_and_guidance_change_samples(ldm_fit):
  """Uses the overfit UNet: at initialisation its output conv is zero, so every sample would be the
  same function of the start noise whatever the condition, and these checks would be vacuous."""
  def draws(params, key, attributes):
    run = functools.partial(sample, _apply_unet, params, LATENTS, key, schedule=SCHEDULE,
                            attributes=attributes, method="ddim", num_steps=10)
    return {scale: run(guidance_scale=scale) for scale in (0.0, 1.0, 2.0)}

  draw = _jit(draws)  # One program for all three scales: one compile, reused by the four calls.
  key = jax.random.PRNGKey(7)
  a = draw(ldm_fit.params, key, ATTRIBUTES)
  b = draw(ldm_fit.params, key, ATTRIBUTES[::-1])  # Each latent gets the other's attributes.
  again = draw(ldm_fit.params, key, ATTRIBUTES)
  other_key = draw(ldm_fit.params, jax.random.PRNGKey(8), ATTRIBUTES)

  max_diff = lambda x, y: float(jnp.max(jnp.abs(x - y)))
  for scale in (0.0, 1.0, 2.0):
    assert bool(jnp.all(jnp.isfinite(a[scale])))
    # Same key, same condition: identical samples (the sampler's only randomness is its key) ...
    np.testing.assert_array_equal(a[scale], again[scale])
    # ... and a different key does change them, so the line above is not trivially true.
    assert max_diff(a[scale], other_key[scale]) > 1e-2
  # Different attribute values, same key: different volumes.
  assert max_diff(a[1.0], b[1.0]) > 1e-2
  assert max_diff(a[2.0], b[2.0]) > 1e-2
  # Guidance scale 0 is the unconditional model: the attribute VALUES are masked out entirely.
  np.testing.assert_allclose(a[0.0], b[0.0], atol=1e-5)
  # Unconditional vs guided, same key and attributes: different volumes.
  assert max_diff(a[0.0], a[2.0]) > 1e-2
