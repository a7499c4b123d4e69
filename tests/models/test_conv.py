"""The per-tap kernel gradient equals XLA's convolution gradient (batched and per example)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxldm.models import conv


@pytest.mark.parametrize("shape, kernel, strides", [
    ((2, 5, 9, 7), (1, 3, 3), (1, 1, 1)),   # In-plane kernel, odd sizes.
    ((2, 6, 8, 8), (1, 4, 4), (1, 2, 2)),   # Even kernel, strided (the critic).
    ((1, 4, 6, 6), (3, 3, 3), (2, 2, 2)),   # Isotropic, strided in every axis.
    ((3, 3, 5, 5), (1, 1, 1), (1, 1, 1)),   # 1x1x1 skip projection.
])
def test_taps_gradient_matches_native(shape, kernel, strides):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal(shape + (3,)), jnp.float32)
  w = jnp.asarray(rng.standard_normal(kernel + (3, 4)), jnp.float32)

  def loss(impl):
    def f(w, x):
      with conv.weight_grad(impl):
        return jnp.sum(jnp.sin(conv.conv_general_dilated(x, w, strides, "SAME")))
    return f

  native = jax.grad(loss("native"), argnums=(0, 1))(w, x)
  taps = jax.grad(loss("taps"), argnums=(0, 1))(w, x)
  for a, b in zip(taps, native):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
  per_example = lambda impl: jax.vmap(jax.grad(loss(impl)), in_axes=(None, 0))(w, x[:, None])
  np.testing.assert_allclose(per_example("taps"), per_example("native"), rtol=1e-4, atol=1e-4)
  # The per-example gradients sum to the batch gradient (nothing is mixed across examples).
  np.testing.assert_allclose(per_example("taps").sum(0), native[0], rtol=1e-4, atol=1e-4)


def test_conv_module_is_nn_conv():
  """Same parameter names, shapes and initial values as nn.Conv: checkpoints do not care."""
  x = jnp.ones((1, 2, 6, 6, 3))
  ours = conv.Conv(5, (1, 3, 3), strides=(1, 2, 2), padding="SAME")
  theirs = nn.Conv(5, (1, 3, 3), strides=(1, 2, 2), padding="SAME")
  p1, p2 = ours.init(jax.random.PRNGKey(0), x), theirs.init(jax.random.PRNGKey(0), x)
  assert jax.tree_util.tree_structure(p1) == jax.tree_util.tree_structure(p2)
  jax.tree_util.tree_map(np.testing.assert_array_equal, p1, p2)
  with conv.weight_grad("taps"):
    np.testing.assert_allclose(ours.apply(p1, x), theirs.apply(p2, x), rtol=1e-6)


def test_weight_grad_setting_is_validated_and_restored():
  before = conv.resolved_weight_grad()
  with conv.weight_grad("native"):
    assert conv.resolved_weight_grad() == "native"
  assert conv.resolved_weight_grad() == before
  with pytest.raises(ValueError, match="choose one of"):
    conv.set_weight_grad("fast")
