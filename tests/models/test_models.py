"""Shapes, per-example independence and masking of the Flax models, at tiny widths."""

import contextlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxldm.models import AutoencoderKL, LatentUNet, PatchDiscriminator3D, kl_divergence, layers
from jaxldm.models.layers import ResBlock3D
from jaxldm.models.unet import AttributeEncoder

AE = AutoencoderKL(channels=(8, 16), num_res_blocks=1, latent_channels=2, kernel=(1, 3, 3),
                   stride=(1, 2, 2), attention=True)
UNET = LatentUNet(out_channels=2, base_channels=8, channel_mult=(1, 2), num_res_blocks=1,
                  attention_levels=(1,), heads=2, kernel=(1, 3, 3), stride=(1, 2, 2),
                  num_attributes=3, context_dim=8, attribute_embedding=True)
UNET_DUMMY = (jnp.zeros((1, 4, 8, 8, 2)), jnp.zeros((1,)), jnp.zeros((1, 3)), jnp.ones((1, 3)))


@pytest.fixture(scope="module")
def ae_params():
  return layers.init_params(AE, jax.random.PRNGKey(0), jnp.zeros((1, 4, 16, 16, 1)))


@pytest.fixture(scope="module")
def unet_params():
  return layers.init_params(UNET, jax.random.PRNGKey(0), *UNET_DUMMY)


# Jitted applies: op-by-op (eager) dispatch of a UNet costs a small compile per distinct op.
ae_apply, unet_apply = jax.jit(AE.apply), jax.jit(UNET.apply)


class _Initializers(nn.Module):
  """One of each kind of initialiser the models use: convolution and dense kernels (variance scaling),
  normal(1) and normal(0.02) embeddings, attention projections, zeros, GroupNorm/LayerNorm scales."""

  @nn.compact
  def __call__(self, x, emb, values, mask):
    tokens, _ = AttributeEncoder(3, context_dim=4, token_dim=4, heads=1)(values, mask)
    return ResBlock3D(4, kernel=(1, 3, 3))(x, emb), tokens


def test_init_compiler_options_keep_the_parameters_bitwise():
  """Inits are compiled at a lower LLVM level for compile speed (layers.INIT_COMPILER_OPTIONS); they
  give bitwise the parameters of the default level, so a seed gives the same model either way."""
  module, key = _Initializers(), jax.random.PRNGKey(0)
  args = (jnp.zeros((1, 2, 4, 4, 4)), jnp.zeros((1, 8)), jnp.zeros((1, 3)), jnp.ones((1, 3)))
  ours = layers.init_params(module, key, *args)
  default = jax.jit(module.init)(key, *args)
  assert jax.tree_util.tree_structure(default) == jax.tree_util.tree_structure(ours)
  assert len(jax.tree_util.tree_leaves(ours)) >= 15
  jax.tree_util.tree_map(np.testing.assert_array_equal, ours, default)
  other = layers.init_params(module, jax.random.PRNGKey(1), *args)  # The check can fail: keys matter.
  assert not np.array_equal(other["params"]["ResBlock3D_0"]["conv1"]["kernel"],
                            ours["params"]["ResBlock3D_0"]["conv1"]["kernel"])


def test_autoencoder_shapes_and_kl(ae_params):
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 4, 16, 16, 1))
  recon, post = ae_apply(ae_params, x, jax.random.PRNGKey(2))
  assert recon.shape == x.shape
  assert post.mean.shape == (2, 4, 8, 8, 2)  # In-plane 2x, slices kept.
  assert AE.downsampling == (1, 2, 2)
  kl = kl_divergence(post)
  assert kl.shape == (2,) and bool(jnp.all(kl >= 0))
  assert "batch_stats" not in ae_params


def test_examples_do_not_interact(ae_params, unet_params):
  """Invariant 1: an example's output never depends on the other examples of its batch."""
  key = jax.random.PRNGKey(3)
  x = jax.random.normal(key, (3, 4, 16, 16, 1))
  x2 = x.at[1:].set(100.0 * jax.random.normal(jax.random.PRNGKey(4), (2, 4, 16, 16, 1)))
  np.testing.assert_allclose(ae_apply(ae_params, x)[0][0], ae_apply(ae_params, x2)[0][0], rtol=1e-5, atol=1e-5)
  z = jax.random.normal(key, (3, 4, 8, 8, 2))
  z2 = z.at[1:].set(50.0)
  t = jnp.array([5, 10, 20])
  a = jnp.ones((3, 3))
  out1 = unet_apply(unet_params, z, t, a, jnp.ones((3, 3)))
  out2 = unet_apply(unet_params, z2, t, a * 7, jnp.ones((3, 3)))
  np.testing.assert_allclose(out1[0], out2[0], rtol=1e-5, atol=1e-5)


def test_unet_shapes_and_masked_attributes(unet_params):
  params = jax.tree_util.tree_map(lambda p: p + 0.05, unet_params)  # Leave the zero-init identity.
  z = jax.random.normal(jax.random.PRNGKey(5), (2, 4, 8, 8, 2))
  t = jnp.array([1, 100])
  attrs = jnp.array([[1.0, -2.0, 0.5], [1.0, -2.0, 0.5]])
  mask = jnp.array([[1.0, 1.0, 1.0], [1.0, 0.0, 1.0]])
  out = unet_apply(params, z, t, attrs, mask)
  assert out.shape == z.shape and bool(jnp.all(jnp.isfinite(out)))
  # A masked attribute's value is ignored; a visible one is not.
  changed = attrs.at[:, 1].set(9.0)
  out2 = unet_apply(params, z, t, changed, mask)
  np.testing.assert_allclose(out[1], out2[1], rtol=1e-5, atol=1e-5)
  assert float(jnp.abs(out[0] - out2[0]).max()) > 1e-4
  # All attributes missing (the unconditional branch) is finite and differs from conditional.
  uncond = unet_apply(params, z, t, attrs, jnp.zeros_like(mask))
  assert bool(jnp.all(jnp.isfinite(uncond)))
  assert float(jnp.abs(uncond - out).max()) > 1e-4


def _no_attention_unet(attribute_embedding):
  """Without attention blocks the attribute embedding is the only way attributes reach the output."""
  return LatentUNet(out_channels=2, base_channels=8, channel_mult=(1, 2), num_res_blocks=1,
                    attention_levels=(), mid_attention=False, heads=2, kernel=(1, 3, 3), stride=(1, 2, 2),
                    num_attributes=3, context_dim=8, attribute_embedding=attribute_embedding)


def test_attribute_embedding_conditions_every_block():
  z = jax.random.normal(jax.random.PRNGKey(6), (2, 4, 8, 8, 2))
  t = jnp.array([3, 90])
  attrs, mask = jnp.array([[1.0, -2.0, 0.5], [1.0, -2.0, 0.5]]), jnp.array([[1.0, 1.0, 1.0], [1.0, 0.0, 1.0]])
  changed = attrs.at[:, 1].set(9.0)
  outputs = {}
  for flag in (False, True):
    unet = _no_attention_unet(flag)
    params = layers.init_params(unet, jax.random.PRNGKey(0), z, t, attrs, mask)
    apply = jax.jit(unet.apply)
    if flag:
      emb = params["params"]["attribute_embedding"]
      assert emb["hidden"]["kernel"].shape == (6, 32)  # Values next to mask -> the timestep embedding's width.
      assert not np.any(emb["out"]["kernel"])
      # Zero-initialised output layer: at initialisation the attributes change nothing.
      np.testing.assert_array_equal(apply(params, z, t, attrs, mask), apply(params, z, t, changed, mask))
    params = jax.tree_util.tree_map(lambda p: p + 0.05, params)
    outputs[flag] = (apply(params, z, t, attrs, mask), apply(params, z, t, changed, mask),
                     apply(params, z, t, attrs, jnp.zeros_like(mask)))
  out, out_changed, uncond = outputs[False]
  np.testing.assert_array_equal(out, out_changed)  # No attention, no embedding: attributes unused.
  np.testing.assert_array_equal(out, uncond)
  out, out_changed, uncond = outputs[True]
  assert float(jnp.abs(out[0] - out_changed[0]).max()) > 1e-4  # A visible attribute moves the output,
  np.testing.assert_allclose(out[1], out_changed[1], rtol=1e-6, atol=1e-6)  # a masked one does not,
  assert float(jnp.abs(uncond - out).max()) > 1e-4  # and "all missing" is its own condition.


def test_dp_ldm_subset_trains_the_attribute_embedding(unet_params):
  from jaxldm.train import partition

  trainable, frozen = partition.split(unet_params, "attention+conditioning")
  assert any(k.startswith("params/attribute_embedding/") for k in trainable)
  assert any(k.startswith("params/attributes/") for k in trainable)
  assert not any("attribute_embedding" in k or k.startswith("params/attributes/") for k in frozen)
  assert any("ResBlock3D" in k for k in frozen) and not any("ResBlock3D" in k for k in trainable)


def test_discriminator_patch_logits():
  d = PatchDiscriminator3D(channels=(4, 8))
  x = jnp.zeros((2, 4, 16, 16, 1))
  params = layers.init_params(d, jax.random.PRNGKey(0), x)
  assert jax.jit(d.apply)(params, x).shape == (2, 4, 4, 4, 1)


class _ListWidth(nn.Module):
  features: list  # Unhashable on purpose.

  @nn.compact
  def __call__(self, x):
    return nn.Dense(self.features[0])(x)


def test_abstract_params_are_the_inits_shapes_traced_once_per_model():
  x = jnp.zeros((1, 4, 16, 16, 1))
  first = layers.abstract_params(AE, x)
  want = jax.eval_shape(AE.init, jax.random.PRNGKey(0), x)
  assert jax.tree_util.tree_structure(first) == jax.tree_util.tree_structure(want)
  assert jax.tree_util.tree_leaves(first) == jax.tree_util.tree_leaves(want)  # Shapes and dtypes.
  assert layers.abstract_params(AE, jnp.ones((1, 4, 16, 16, 1))) is first  # Cached: values do not matter.
  assert layers.abstract_params(AE, jnp.zeros((1, 4, 8, 8, 1))) is not first
  # An unhashable module is traced every time instead of failing.
  assert layers.abstract_params(_ListWidth([3]), jnp.zeros((1, 2)))["params"]["Dense_0"]["kernel"].shape == (2, 3)


def test_latent_encoder_and_decoder_are_jitted_once_per_model_scale_and_route(ae_params):
  from jaxldm.infer import autoencoder as ae_infer
  from jaxldm.models import conv

  decode = ae_infer.latent_decoder(AE, 2.0)
  assert ae_infer.latent_decoder(AE, 2.0) is decode and ae_infer.latent_decoder(AE, 3.0) is not decode
  with conv.weight_grad("native" if conv.resolved_weight_grad() != "native" else "taps"):
    assert ae_infer.latent_decoder(AE, 2.0) is not decode  # Traced under another route: its own function.
  volumes = np.asarray(jax.random.normal(jax.random.PRNGKey(1), (3, 4, 16, 16)))
  latents = ae_infer.encode_latents(AE, ae_params, volumes, 2.0, batch_size=2)
  encode = jax.jit(lambda p, x: AE.apply(p, x, method=AutoencoderKL.encode).mean)
  want = np.asarray(encode(ae_params, jnp.asarray(volumes)[..., None])) * 2.0
  np.testing.assert_allclose(latents, want, atol=1e-5)
  back = ae_infer.decode_latents(AE, ae_params, latents, 2.0, batch_size=2)
  np.testing.assert_allclose(back, np.asarray(decode(ae_params, jnp.asarray(latents)))[..., 0], atol=1e-5)


def test_swish_is_nn_swish_in_both_forms_and_the_merged_step_takes_the_division():
  from jaxldm.models import conv
  x = jnp.concatenate([jnp.linspace(-12.0, 12.0, 97), jnp.array([-1000.0, -80.0, 0.0, 80.0, 1000.0])])
  d1 = lambda f: jax.vmap(jax.grad(f))
  d2 = lambda f: jax.vmap(jax.grad(jax.grad(f)))
  for merged in (False, True):
    with conv.examples_merged() if merged else contextlib.nullcontext():
      ours = [layers.swish(x), d1(layers.swish)(x), d2(layers.swish)(x)]
      text = str(jax.make_jaxpr(lambda v: layers.swish(v))(x))  # A new function: no cached trace.
    ref = [nn.swish(x), d1(nn.swish)(x), d2(nn.swish)(x)]
    for a, b in zip(ours, ref):
      assert bool(jnp.all(jnp.isfinite(a)))
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # The form is the point: a division (its result materialised before the kernel gradient's
    # transpose) only where the step is non-private; nn.swish's logistic elsewhere.
    assert ("div" in text) == merged and ("logistic" in text) != merged


def test_attention_across_an_inner_token_axis_is_attention_over_the_moved_axis():
  # token_axis=-3 (the UNet's attention across slices) attends over axis -3 of (B, T, N, C) for each
  # of the N positions, as attention over the moved axis (B, N, T, C) does: same parameters, same values,
  # and the same parameter gradients (examples stay independent).
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 7, 8))
  inner, moved = layers.Attention(2, token_axis=-3), layers.Attention(2)
  params = moved.init(jax.random.PRNGKey(1), jnp.swapaxes(x, 1, 2))
  params = jax.tree.map(lambda p: p + 0.1 * jax.random.normal(jax.random.PRNGKey(2), p.shape), params)
  assert jax.tree.structure(inner.init(jax.random.PRNGKey(1), x)) == jax.tree.structure(params)
  a = inner.apply(params, x)
  b = jnp.swapaxes(moved.apply(params, jnp.swapaxes(x, 1, 2)), 1, 2)
  np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  assert float(jnp.abs(a[:, :, 0] - a[:, :, 1]).max()) > 1e-3  # Positions differ: not a broadcast.
  ga = jax.grad(lambda p: (inner.apply(p, x) ** 2).sum())(params)
  gb = jax.grad(lambda p: (jnp.swapaxes(moved.apply(p, jnp.swapaxes(x, 1, 2)), 1, 2) ** 2).sum())(params)
  jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-4, atol=1e-6), ga, gb)
  with pytest.raises(ValueError, match="token_axis"):
    inner.apply(params, x, context=x[:, :2])
