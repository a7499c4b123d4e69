"""Per-example clipping against brute force, norm bounds, masking, microbatching, errors."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxldm.privacy import clipping

MASK = np.array([1, 1, 0, 1, 0, 1], np.int32)


@pytest.mark.parametrize('per_layer', [False, True])
@pytest.mark.parametrize('microbatch_size', [None, 2])
def test_matches_brute_force(mlp_problem, brute_force, tree_allclose, jit, per_layer,
                             microbatch_size):
  """The Conv3d net is covered through private_grad in test_noise (compiles are costly)."""
  problem = mlp_problem
  rng = jax.random.key(7)
  f = jit(clipping.clipped_grad_sum, problem.loss_fn, l2_clip_norm=1.5,
          microbatch_size=microbatch_size, per_layer=per_layer)
  for mask in (np.ones(6, np.int32), MASK):
    got, aux = f(problem.params, problem.batch, rng, mask=mask)
    want = brute_force(problem.loss_fn, problem.params, problem.batch, rng, l2_clip_norm=1.5,
                       mask=mask, per_layer=per_layer)
    tree_allclose(got, want.grad_sum, rtol=1e-5, scale=want.abs_sum)
    np.testing.assert_allclose(aux['loss'], want.loss, rtol=1e-5)
    np.testing.assert_allclose(aux['grad_norm'], want.grad_norm, rtol=1e-5)
    real = mask.astype(bool)
    if not per_layer:
      np.testing.assert_allclose(aux['clipped_fraction'], np.mean(want.grad_norm[real] > 1.5),
                                 rtol=1e-6)
    assert 0 < float(aux['clipped_fraction']) < 1  # The problem mixes clipped and unclipped.


def test_no_mask_means_all_real(mlp_problem, brute_force, tree_allclose, jit):
  problem = mlp_problem
  rng = jax.random.key(7)
  f = jit(clipping.clipped_grad_sum, problem.loss_fn, l2_clip_norm=1.5)
  without, _ = f(problem.params, problem.batch, rng)
  ones, _ = f(problem.params, problem.batch, rng, mask=np.ones(6))
  scale = brute_force(problem.loss_fn, problem.params, problem.batch, rng,
                      l2_clip_norm=1.5).abs_sum
  tree_allclose(without, ones, rtol=1e-6, scale=scale)


def test_microbatching_is_identical(problem, brute_force, tree_allclose, jit):
  rng = jax.random.key(3)
  kwargs = dict(l2_clip_norm=0.3, has_aux=True)
  full, full_aux = jit(clipping.clipped_grad_sum, problem.aux_loss_fn, **kwargs)(
      problem.params, problem.batch, rng, mask=MASK)
  scale = brute_force(problem.aux_loss_fn, problem.params, problem.batch, rng, l2_clip_norm=0.3,
                      mask=MASK, has_aux=True).abs_sum
  for m in (1, 3):
    mb, mb_aux = jit(clipping.clipped_grad_sum, problem.aux_loss_fn, microbatch_size=m, **kwargs)(
        problem.params, problem.batch, rng, mask=MASK)
    tree_allclose(mb, full, rtol=1e-6, scale=scale)
    np.testing.assert_allclose(mb_aux['clipped_fraction'], full_aux['clipped_fraction'])
    # Per-example values are computed in vmaps of different sizes: float32 rounding differs.
    for key in ('loss', 'grad_norm'):
      np.testing.assert_allclose(mb_aux[key], full_aux[key], rtol=1e-5)
    tree_allclose(mb_aux['aux'], full_aux['aux'], rtol=1e-5)
  # aux comes back per example, and padding rows read as zero everywhere.
  assert full_aux['aux']['pred'].shape == (6,)
  assert full_aux['aux']['sq'].shape == (6, 2)
  np.testing.assert_allclose(full_aux['aux']['sq'][:, 0], full_aux['loss'], rtol=1e-6)
  for x in (full_aux['loss'], full_aux['grad_norm'], full_aux['aux']['pred'],
            full_aux['aux']['sq']):
    assert np.all(np.asarray(x)[MASK == 0] == 0)


def test_example_rng_is_fold_in_of_global_index():
  """rng_i = fold_in(rng, i): the loss sees exactly that key, microbatched or not."""

  def loss_fn(p, example, rng):
    return jnp.sum(p * jax.random.normal(rng, (2,))) + 0 * example

  rng = jax.random.key(11)
  p = jnp.ones(2)
  want = np.stack([jax.random.normal(jax.random.fold_in(rng, i), (2,)) for i in range(4)])
  for m in (None, 2):
    g, aux = clipping.clipped_grad_sum(loss_fn, p, jnp.zeros(4), rng, l2_clip_norm=1e9,
                                       microbatch_size=m)
    np.testing.assert_allclose(aux['grad_norm'], np.linalg.norm(want, axis=1), rtol=1e-6)
    np.testing.assert_allclose(g, want.sum(0), rtol=1e-5)


@pytest.mark.parametrize('per_layer', [False, True])
def test_clipped_norm_bound_property(per_layer):
  """||clip(g)|| <= C (1 + 1e-6) for random gradients over 12 orders of magnitude and many C."""
  rs = np.random.default_rng(0)
  clip = jax.jit(jax.vmap(
      lambda g, c: clipping.clip_gradient(g, l2_clip_norm=c, per_layer=per_layer),
      in_axes=(0, None)))
  for c in (1e-4, 1e-2, 0.3, 1.0, 7.0, 1e3, 1e5):
    scales = 10.0**rs.uniform(-6, 10, size=(64, 1))
    scales[:4] = 0.0  # Zero gradients are fine too.
    grads = {
        'a': jnp.asarray(rs.normal(size=(64, 5, 3)) * scales[:, :, None], jnp.float32),
        'b': jnp.asarray(rs.standard_cauchy(size=(64, 7)) * scales, jnp.float32),
    }
    clipped, norms, was_clipped = clip(grads, c)
    a = np.asarray(clipped['a'], np.float64).reshape(64, -1)
    b = np.asarray(clipped['b'], np.float64)
    total = np.sqrt(np.sum(a**2, 1) + np.sum(b**2, 1))
    assert np.all(total <= c * (1 + 1e-6)), (c, total.max())
    orig = np.sqrt(np.sum(np.asarray(grads['a'], np.float64).reshape(64, -1)**2, 1) +
                   np.sum(np.asarray(grads['b'], np.float64)**2, 1))
    np.testing.assert_allclose(norms, orig, rtol=1e-5)
    if per_layer:
      leaf_c = c / math.sqrt(2)
      assert np.all(np.linalg.norm(a, axis=1) <= leaf_c * (1 + 1e-6))
      assert np.all(np.linalg.norm(b, axis=1) <= leaf_c * (1 + 1e-6))
    else:
      small = orig <= c * (1 - 1e-5)
      np.testing.assert_array_equal(np.asarray(was_clipped)[small], False)
      # Unclipped gradients pass through exactly; clipped ones land on the sphere of radius C.
      np.testing.assert_array_equal(a[small], np.asarray(grads['a']).reshape(64, -1)[small])
      big = orig > c * (1 + 1e-5)
      np.testing.assert_allclose(total[big], c, rtol=1e-5)


def test_huge_gradient_examples_are_bounded():
  """Examples with huge losses are still bounded by C through the full clipped_grad_sum."""

  def loss_fn(w, example, _):
    return jnp.sum((w * example['x'] - example['y'])**2)

  rs = np.random.default_rng(1)
  x = rs.normal(size=(8, 5)) * 10.0**rs.uniform(-3, 8, size=(8, 1))
  batch = {'x': jnp.asarray(x, jnp.float32), 'y': jnp.asarray(rs.normal(size=(8, 5)), jnp.float32)}
  w = jnp.ones(5)
  for c in (1e-3, 1.0, 1e3):
    for i in range(8):
      one = jax.tree_util.tree_map(lambda a: a[i:i + 1], batch)
      g, _ = clipping.clipped_grad_sum(loss_fn, w, one, jax.random.key(0), l2_clip_norm=c)
      assert np.linalg.norm(np.asarray(g, np.float64)) <= c * (1 + 1e-6)


def test_padding_contributes_exactly_zero(problem, brute_force, tree_allclose, jit):
  """Garbage in masked slots (NaN, inf, 1e30) changes nothing, not even the last bit."""
  rng = jax.random.key(5)
  batch = problem.batch
  garbage = jax.tree_util.tree_map(lambda x: x.at[2].set(jnp.nan).at[4].set(1e30), batch)
  garbage['y'] = garbage['y'].at[4].set(jnp.inf)
  benign = jax.tree_util.tree_map(lambda x: x.at[2].set(0.0).at[4].set(0.0), batch)
  for m in (None, 2):
    f = jit(clipping.clipped_grad_sum, problem.loss_fn, l2_clip_norm=1.5, microbatch_size=m)
    g_garbage, aux = f(problem.params, garbage, rng, mask=MASK)
    g_benign, _ = f(problem.params, benign, rng, mask=MASK)
    for a, b in zip(jax.tree_util.tree_leaves(g_garbage), jax.tree_util.tree_leaves(g_benign)):
      np.testing.assert_array_equal(a, b)
      assert np.all(np.isfinite(a))
    assert np.all(np.isfinite(aux['loss'])) and np.isfinite(aux['clipped_fraction'])
  # And equals the reference sum over the real examples only (brute force skips padding).
  want = brute_force(problem.loss_fn, problem.params, batch, rng, l2_clip_norm=1.5, mask=MASK)
  tree_allclose(g_garbage, want.grad_sum, rtol=1e-5, scale=want.abs_sum)


def test_real_nan_example_fails_loudly():
  """A non-finite gradient in a REAL example must not be silently dropped."""
  loss_fn = lambda w, ex, _: jnp.sum(w * ex)
  g, _ = clipping.clipped_grad_sum(loss_fn, jnp.ones(2), jnp.array([[1.0, 1.0], [jnp.nan, 1.0]]),
                                   jax.random.key(0), l2_clip_norm=1.0)
  assert np.all(np.isnan(g))


def test_dynamic_num_microbatches_compiles_once(problem, brute_force, tree_allclose):
  """A variable count of microbatches (Poisson batches) runs under ONE compilation."""
  traces = []

  def step(params, batch, rng, mask, count):
    traces.append(1)
    return clipping.clipped_grad_sum(problem.loss_fn, params, batch, rng, l2_clip_norm=0.5,
                                     mask=mask, microbatch_size=2, num_microbatches=count)

  step = jax.jit(step)
  rng = jax.random.key(2)
  for mask in ([1, 1, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1], [0] * 6):
    mask = np.array(mask, np.int32)
    count = math.ceil(mask.sum() / 2)
    got, aux = step(problem.params, problem.batch, rng, mask, count)
    want = brute_force(problem.loss_fn, problem.params, problem.batch, rng, l2_clip_norm=0.5,
                       mask=mask)
    tree_allclose(got, want.grad_sum, rtol=1e-5, scale=want.abs_sum)
    np.testing.assert_allclose(aux['grad_norm'], want.grad_norm, rtol=1e-5)
  assert len(traces) == 1


def test_dynamic_count_too_small_poisons_instead_of_dropping():
  loss_fn = lambda w, ex, _: jnp.sum((w * ex)**2)
  g, _ = clipping.clipped_grad_sum(loss_fn, jnp.ones(3), jnp.ones((6, 3)), jax.random.key(0),
                                   l2_clip_norm=1.0, mask=MASK, microbatch_size=2,
                                   num_microbatches=2)
  assert all(np.all(np.isnan(x)) for x in jax.tree_util.tree_leaves(g))


def test_traced_clip_norm_under_jit(problem, brute_force, tree_allclose):
  f = jax.jit(lambda c: clipping.clipped_grad_sum(problem.loss_fn, problem.params, problem.batch,
                                                  jax.random.key(1), l2_clip_norm=c)[0])
  for c in (0.1, 2.0):
    want = brute_force(problem.loss_fn, problem.params, problem.batch, jax.random.key(1),
                       l2_clip_norm=c)
    tree_allclose(f(c), want.grad_sum, rtol=1e-5, scale=want.abs_sum)


def test_flax_variables_dict_without_batch_stats_is_accepted():
  model = nn.Dense(2)
  variables = model.init(jax.random.key(0), jnp.ones((1, 3)))
  loss_fn = lambda v, ex, _: jnp.sum(model.apply(v, ex[None])**2)
  g, _ = clipping.clipped_grad_sum(loss_fn, variables, jnp.ones((4, 3)), jax.random.key(0),
                                   l2_clip_norm=1.0)
  assert jax.tree_util.tree_structure(g) == jax.tree_util.tree_structure(variables)


def test_sensitivity_is_clip_norm():
  assert clipping.sensitivity(1.5) == 1.5
  assert clipping.sensitivity(1.5, per_layer=True, num_leaves=7) == 1.5
  with pytest.raises(ValueError, match='num_leaves'):
    clipping.sensitivity(1.0, per_layer=True, num_leaves=0)


# ------------------------------------------------------------------------------------------------
# Errors a user can cause.
# ------------------------------------------------------------------------------------------------
def _mlp_args():
  loss_fn = lambda w, ex, _: jnp.sum((w * ex) ** 2)
  return loss_fn, jnp.ones(3), jnp.ones((4, 3)), jax.random.key(0)


@pytest.mark.parametrize('c', [0.0, -1.0, float('nan'), float('inf')])
def test_bad_clip_norm_raises(c):
  loss_fn, w, batch, rng = _mlp_args()
  with pytest.raises(ValueError, match='l2_clip_norm'):
    clipping.clipped_grad_sum(loss_fn, w, batch, rng, l2_clip_norm=c)


def test_non_scalar_loss_raises_at_trace_time():
  _, w, batch, rng = _mlp_args()
  batched_loss = lambda w, ex, _: (w * ex) ** 2  # Forgot the reduction.
  with pytest.raises(ValueError, match='scalar loss of ONE example'):
    clipping.clipped_grad_sum(batched_loss, w, batch, rng, l2_clip_norm=1.0)
  with pytest.raises(ValueError, match='scalar loss of ONE example'):
    jax.jit(lambda w: clipping.clipped_grad_sum(batched_loss, w, batch, rng, l2_clip_norm=1.0))(w)


def test_has_aux_without_pair_raises():
  loss_fn, w, batch, rng = _mlp_args()
  with pytest.raises(TypeError, match='has_aux'):
    clipping.clipped_grad_sum(loss_fn, w, batch, rng, l2_clip_norm=1.0, has_aux=True)


def test_batchnorm_variables_are_refused():

  class WithBatchNorm(nn.Module):

    @nn.compact
    def __call__(self, x):
      return nn.BatchNorm(use_running_average=False)(nn.Dense(2)(x)).sum()

  model = WithBatchNorm()
  variables = model.init(jax.random.key(0), jnp.ones((2, 3)))
  assert 'batch_stats' in variables
  loss_fn = lambda v, ex, _: model.apply(v, ex[None], mutable=['batch_stats'])[0]
  with pytest.raises(ValueError, match='batch_stats.*GroupNorm'):
    clipping.clipped_grad_sum(loss_fn, variables, jnp.ones((4, 3)), jax.random.key(0),
                              l2_clip_norm=1.0)
  with pytest.raises(ValueError, match='BatchNorm'):
    clipping.check_no_batch_stats({'params': {}, 'batch_stats': {}})
  clipping.check_no_batch_stats({'params': {'dense': {'kernel': jnp.ones(2)}}})


def test_shape_errors():
  loss_fn, w, batch, rng = _mlp_args()
  with pytest.raises(ValueError, match='not divisible by microbatch_size 3'):
    clipping.clipped_grad_sum(loss_fn, w, batch, rng, l2_clip_norm=1.0, microbatch_size=3)
  with pytest.raises(ValueError, match='mask must have shape'):
    clipping.clipped_grad_sum(loss_fn, w, batch, rng, l2_clip_norm=1.0, mask=jnp.ones(3))
  with pytest.raises(ValueError, match='num_microbatches requires microbatch_size'):
    clipping.clipped_grad_sum(loss_fn, w, batch, rng, l2_clip_norm=1.0, num_microbatches=1)
  with pytest.raises(ValueError, match='same leading batch axis'):
    clipping.clipped_grad_sum(loss_fn, w, {'a': jnp.ones((4, 3)), 'b': jnp.ones((5,))}, rng,
                              l2_clip_norm=1.0)
