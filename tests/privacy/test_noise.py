"""private_grad against brute force; the noise's scale, freshness, placement; jit and sharding."""

import functools

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec
import numpy as np
import pytest

from jaxldm.privacy import noise

MASK = np.array([1, 1, 0, 1, 0, 1], np.int32)
EXPECTED_BATCH_SIZE = 5.0


def _noise_free(problem, brute_force, rng, *, mask, per_layer=False, has_aux=False, c=1.5):
  """Reference g for sigma = 0: brute-force clipped sum / expected batch size."""
  example_rng, _ = noise.split_step_rng(rng)
  loss_fn = problem.aux_loss_fn if has_aux else problem.loss_fn
  want = brute_force(loss_fn, problem.params, problem.batch, example_rng, l2_clip_norm=c,
                     mask=mask, per_layer=per_layer, has_aux=has_aux)
  scale = lambda t: jax.tree_util.tree_map(lambda x: x / EXPECTED_BATCH_SIZE, t)
  return scale(want.grad_sum), scale(want.abs_sum), want


@pytest.mark.parametrize('per_layer', [False, True])
@pytest.mark.parametrize('microbatch_size', [None, 2])
def test_zero_noise_matches_brute_force(problem, brute_force, tree_allclose, jit, per_layer,
                                        microbatch_size):
  rng = jax.random.key(21)
  f = jit(noise.private_grad, problem.loss_fn, l2_clip_norm=1.5, noise_multiplier=0.0,
          expected_batch_size=EXPECTED_BATCH_SIZE, microbatch_size=microbatch_size,
          per_layer=per_layer)
  for mask in (np.ones(6, np.int32), MASK):  # One compilation; mask=None: test_clipping.
    got, aux = f(problem.params, problem.batch, rng, mask=mask)
    want, scale, ref = _noise_free(problem, brute_force, rng, mask=mask, per_layer=per_layer)
    tree_allclose(got, want, rtol=1e-5, scale=scale)
    np.testing.assert_allclose(aux['loss'], ref.loss, rtol=1e-5)
    np.testing.assert_allclose(aux['grad_norm'], ref.grad_norm, rtol=1e-5)
    if not per_layer:
      real = mask.astype(bool)
      np.testing.assert_allclose(aux['clipped_fraction'], np.mean(ref.grad_norm[real] > 1.5),
                                 rtol=1e-6)
    assert 0 < float(aux['clipped_fraction']) < 1  # The problem mixes clipped and unclipped.
    assert float(aux['noise_std']) == 0.0


def test_zero_noise_matches_brute_force_with_aux(problem, brute_force, tree_allclose, jit):
  rng = jax.random.key(22)
  f = jit(noise.private_grad, problem.aux_loss_fn, l2_clip_norm=1.5, noise_multiplier=0.0,
          expected_batch_size=EXPECTED_BATCH_SIZE, microbatch_size=3, has_aux=True)
  got, aux = f(problem.params, problem.batch, rng, mask=MASK)
  want, scale, ref = _noise_free(problem, brute_force, rng, mask=MASK, has_aux=True)
  tree_allclose(got, want, rtol=1e-5, scale=scale)
  np.testing.assert_allclose(aux['loss'], ref.loss, rtol=1e-5)
  np.testing.assert_allclose(aux['aux']['sq'][:, 0], ref.loss, rtol=1e-5)


def _linear_loss(w, example, _):
  """Noise does not care about the model: a linear loss compiles in a blink."""
  return jnp.sum(w['a'] * example['a']) + jnp.sum(w['b'] * example['b'])


LINEAR_PARAMS = {'a': jnp.zeros((20,)), 'b': jnp.zeros((3, 7))}
LINEAR_BATCH = {'a': jnp.ones((6, 20)) * 0.1, 'b': -jnp.ones((6, 3, 7)) * 0.1}


@functools.cache
def _noise_sampler(sigma, c, microbatch_size):
  """jit(vmap over seeds) of the noise of private_grad: g(sigma) - clipped mean."""

  def one(seed):
    g, aux = noise.private_grad(_linear_loss, LINEAR_PARAMS, LINEAR_BATCH, jax.random.key(seed),
                                l2_clip_norm=c, noise_multiplier=sigma,
                                expected_batch_size=EXPECTED_BATCH_SIZE, mask=MASK,
                                microbatch_size=microbatch_size)
    return jnp.concatenate([x.ravel() for x in jax.tree_util.tree_leaves(g)]), aux['noise_std']

  clean, _ = noise.private_grad(_linear_loss, LINEAR_PARAMS, LINEAR_BATCH, jax.random.key(0),
                                l2_clip_norm=c, noise_multiplier=0.0,
                                expected_batch_size=EXPECTED_BATCH_SIZE, mask=MASK)
  clean = np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(clean)])
  sample = jax.jit(jax.vmap(one))
  return lambda seeds: tuple(np.asarray(x, np.float64) for x in sample(seeds)) + (clean,)


def _noise_samples(*, sigma, c, num_draws, microbatch_size=None):
  g, stds, clean = _noise_sampler(sigma, c, microbatch_size)(jnp.arange(num_draws))
  assert np.any(clean != 0)  # The clipped mean is a real signal, not zero.
  return g - clean, stds


def test_noise_std_mean_and_freshness():
  sigma, c = 1.3, 0.7
  samples, stds = _noise_samples(sigma=sigma, c=c, num_draws=1000)
  want_std = sigma * c / EXPECTED_BATCH_SIZE
  np.testing.assert_allclose(stds, want_std, rtol=1e-6)
  n = samples.size  # 1000 draws x 41 coordinates.
  assert abs(samples.std() / want_std - 1) < 0.02
  assert abs(samples.mean()) < 5 * want_std / np.sqrt(n)
  # Fresh per rng (step): no two draws share noise ...
  assert np.all(np.abs(np.corrcoef(samples[:50])[np.triu_indices(50, 1)]) < 0.7)
  # ... and the same rng gives the same noise.
  again, _ = _noise_samples(sigma=sigma, c=c, num_draws=1000)
  np.testing.assert_array_equal(again, samples)
  # Coordinates, within and across leaves, are independent: no leaf reuses another's key.
  corr = np.corrcoef(samples.T)
  off_diagonal = corr[np.triu_indices(corr.shape[0], 1)]
  assert np.max(np.abs(off_diagonal)) < 0.2  # |r| of independent pairs over 1000 draws ~ 0.03.


def test_noise_is_added_once_per_batch_not_per_microbatch():
  """Microbatching leaves the noise unchanged (same keys) and its std is not sqrt(#mb) larger."""
  sigma, c = 2.0, 0.5
  flat, _ = _noise_samples(sigma=sigma, c=c, num_draws=1000)
  micro, _ = _noise_samples(sigma=sigma, c=c, num_draws=1000, microbatch_size=2)
  np.testing.assert_allclose(micro, flat, atol=1e-6 * sigma * c)
  assert abs(micro.std() / (sigma * c / EXPECTED_BATCH_SIZE) - 1) < 0.02


def test_add_noise_independent_leaves_and_dtypes():
  tree = {'a': jnp.zeros((4000,), jnp.float32), 'b': jnp.zeros((4000,), jnp.bfloat16),
          'c': jnp.zeros((4000,), jnp.float32)}
  out = noise.add_noise(tree, jax.random.key(0), std=2.0)
  assert out['a'].dtype == jnp.float32 and out['b'].dtype == jnp.bfloat16
  a, c = np.asarray(out['a']), np.asarray(out['c'])
  assert not np.array_equal(a, c)  # Same shape, disjoint noise.
  assert abs(np.corrcoef(a, c)[0, 1]) < 0.1
  for x in (a, np.asarray(out['b'], np.float32), c):
    assert abs(x.std() / 2.0 - 1) < 0.05
  same = noise.add_noise(tree, jax.random.key(0), std=2.0)
  np.testing.assert_array_equal(same['a'], out['a'])
  zero = noise.add_noise(tree, jax.random.key(0), std=0.0)
  assert all(np.all(np.asarray(x) == 0) for x in jax.tree_util.tree_leaves(zero))


def test_noise_and_example_keys_are_different_streams():
  rng = jax.random.key(0)
  example_rng, noise_rng = noise.split_step_rng(rng)
  data = lambda k: np.asarray(jax.random.key_data(k))
  assert len({data(rng).tobytes(), data(example_rng).tobytes(), data(noise_rng).tobytes()}) == 3


def test_jit_partial_matches_unjitted(mlp_problem, tree_allclose):
  problem = mlp_problem
  kwargs = dict(l2_clip_norm=0.8, noise_multiplier=1.1, expected_batch_size=EXPECTED_BATCH_SIZE,
                microbatch_size=2)
  jitted = jax.jit(functools.partial(noise.private_grad, problem.loss_fn, **kwargs))
  rng = jax.random.key(9)
  got, got_aux = jitted(problem.params, problem.batch, rng, mask=MASK)
  want, want_aux = noise.private_grad(problem.loss_fn, problem.params, problem.batch, rng,
                                      mask=MASK, **kwargs)
  tree_allclose(got, want, rtol=1e-5)
  np.testing.assert_allclose(got_aux['grad_norm'], want_aux['grad_norm'], rtol=1e-6)
  # Different steps (keys) give different updates.
  other, _ = jitted(problem.params, problem.batch, jax.random.fold_in(rng, 1), mask=MASK)
  assert not np.allclose(other['Dense_0']['kernel'], got['Dense_0']['kernel'])


def test_traced_dp_settings_under_jit():
  """sigma, C and the expected batch size may be traced (sweeps without recompiling)."""

  @jax.jit
  def f(c, sigma, expected):
    return noise.private_grad(_linear_loss, LINEAR_PARAMS, LINEAR_BATCH, jax.random.key(1),
                              l2_clip_norm=c, noise_multiplier=sigma,
                              expected_batch_size=expected, mask=MASK)

  for c, sigma, expected in ((0.5, 1.0, 4.0), (2.0, 0.0, 8.0)):
    got, aux = f(c, sigma, expected)
    want, _ = noise.private_grad(_linear_loss, LINEAR_PARAMS, LINEAR_BATCH, jax.random.key(1),
                                 l2_clip_norm=c, noise_multiplier=sigma,
                                 expected_batch_size=expected, mask=MASK)
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(aux['noise_std'], sigma * c / expected, rtol=1e-6)


def test_sharded_batch_adds_noise_once(mlp_problem, tree_allclose):
  """Batch sharded over 4 devices (SPMD jit): same result as one device, noise not per device."""
  devices = jax.devices()
  if len(devices) < 4:
    pytest.skip('needs XLA_FLAGS=--xla_force_host_platform_device_count=4')
  problem = mlp_problem
  mesh = Mesh(np.array(devices[:4]), ('data',))
  batch = jax.tree_util.tree_map(lambda x: jnp.concatenate([x, x[:2]]), problem.batch)  # B = 8.
  mask = np.array([1, 1, 0, 1, 0, 1, 1, 0], np.int32)
  shard = lambda x: jax.device_put(x, NamedSharding(mesh, PartitionSpec('data')))
  f = jax.jit(functools.partial(noise.private_grad, problem.loss_fn, l2_clip_norm=0.8,
                                noise_multiplier=1.0, expected_batch_size=EXPECTED_BATCH_SIZE))
  rng = jax.random.key(4)
  got, _ = f(problem.params, jax.tree_util.tree_map(shard, batch), rng, mask=shard(mask))
  want, _ = f(problem.params, batch, rng, mask=mask)
  # Scale: |value| + the noise std. A coordinate whose noisy value happens to cancel near zero keeps
  # the float32 summation error of its terms; noise drawn per device would be off by ~2x the std.
  noise_std = 1.0 * 0.8 / EXPECTED_BATCH_SIZE
  tree_allclose(got, want, rtol=1e-5, scale=jax.tree_util.tree_map(lambda w: np.abs(w) + noise_std, want))


@pytest.mark.parametrize('kwargs, match', [
    (dict(noise_multiplier=-1.0), 'noise_multiplier'),
    (dict(expected_batch_size=0.0), 'expected_batch_size'),
    (dict(l2_clip_norm=0.0), 'l2_clip_norm'),
])
def test_errors(kwargs, match):
  args = dict(l2_clip_norm=1.0, noise_multiplier=1.0, expected_batch_size=4.0)
  args.update(kwargs)
  loss_fn = lambda w, ex, _: jnp.sum((w * ex)**2)
  with pytest.raises(ValueError, match=match):
    noise.private_grad(loss_fn, jnp.ones(3), jnp.ones((4, 3)), jax.random.key(0), **args)
