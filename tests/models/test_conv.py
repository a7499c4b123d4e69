"""The CPU convolution routes (2D forward and input gradient; 2D or per-tap kernel gradient) equal XLA's.

On the `slices` and `taps` routes a 5-D convolution runs forward and input gradient as 2D
convolutions over the (example, slice) pairs, and its kernel gradient as the 2D convolution's own
(`slices`: one per example under `jax.vmap`) or as one GEMM per tap (`taps`); everything must equal
`lax.conv_general_dilated` and its gradients, batched and per example under `jax.vmap` (DP-SGD).
"""

import contextlib
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from jaxldm.models import (AutoencoderKL, LatentUNet, PatchDiscriminator3D, autoencoder, conv, layers,
                           regressor, resnet3d, ssl_encoder, unet)

TOL = dict(rtol=1e-4, atol=1e-4)
CASES = [
    # (input spatial shape, kernel, strides, padding, kernel dilation)
    ((2, 5, 9, 7), (1, 3, 3), (1, 1, 1), "SAME", (1, 1, 1)),     # In-plane kernel, odd sizes.
    ((2, 6, 8, 8), (1, 3, 3), (1, 2, 2), "SAME", (1, 1, 1)),     # Thick-slice down-sampling.
    ((2, 6, 8, 8), (1, 4, 4), (1, 2, 2), "SAME", (1, 1, 1)),     # Even kernel, strided (the critic).
    ((3, 3, 5, 5), (1, 1, 1), (1, 1, 1), "SAME", (1, 1, 1)),     # 1x1x1 skip projection.
    ((2, 5, 6, 7), (3, 3, 3), (1, 1, 1), "SAME", (1, 1, 1)),     # Isotropic.
    ((2, 4, 6, 6), (3, 3, 3), (2, 2, 2), "SAME", (1, 1, 1)),     # Isotropic, strided in every axis.
    ((2, 5, 8, 8), (3, 3, 3), (1, 2, 2), "SAME", (1, 1, 1)),     # Isotropic kernel, in-plane stride.
    ((2, 6, 8, 8), (1, 3, 3), (2, 2, 2), "SAME", (1, 1, 1)),     # Depth-1 kernel, depth stride 2.
    ((2, 7, 9, 9), (3, 3, 3), (1, 1, 1), ((2, 0), (1, 1), (0, 2)), (1, 1, 1)),  # Explicit, uneven.
    ((2, 6, 7, 7), (1, 3, 3), (1, 2, 2), ((0, 0), (1, 1), (1, 1)), (1, 1, 1)),  # Explicit, strided.
    ((2, 8, 11, 11), (3, 3, 3), (1, 1, 1), ((2, 2),) * 3, (2, 2, 2)),           # Dilated (MedicalNet).
    ((1, 5, 6, 6), (5, 5, 5), (2, 2, 2), ((2, 2),) * 3, (1, 1, 1)),              # Large strided stem.
]
IDS = [f"{k}-s{s}-{'same' if isinstance(p, str) else 'explicit'}-d{d[0]}" for _, k, s, p, d in CASES]


def _inputs(shape, kernel, cin=3, cout=4):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal(shape + (cin,)), jnp.float32)
  w = jnp.asarray(rng.standard_normal(kernel + (cin, cout)), jnp.float32) / np.sqrt(np.prod(kernel) * cin)
  return x, w


def _native(x, w, strides, padding, dilation):
  return lax.conv_general_dilated(x, w, strides, padding, rhs_dilation=dilation,
                                  dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))


def _ours(x, w, strides, padding, dilation, route="slices"):
  with conv.weight_grad(route):
    return conv.conv_general_dilated(x, w, strides, padding, rhs_dilation=dilation)


ROUTES = ("slices", "taps")


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("shape, kernel, strides, padding, dilation", CASES, ids=IDS)
def test_cpu_routes_match_native(shape, kernel, strides, padding, dilation, route):
  x, w = _inputs(shape, kernel)
  native = lambda w, x: _native(x, w, strides, padding, dilation)
  ours = lambda w, x: _ours(x, w, strides, padding, dilation, route)
  np.testing.assert_allclose(ours(w, x), native(w, x), **TOL)  # Op by op (eager).
  loss = lambda f: lambda w, x: jnp.sum(jnp.sin(f(w, x)))  # A nonlinear loss: the cotangent is not all ones.

  @jax.jit  # One program for both sides (op by op, each op was compiled apart: ~2,300 programs in this file).
  def gradients(w, x):
    return {side: (jax.grad(loss(f), argnums=(0, 1))(w, x),
                   # Per example (vmap over a batch of one, as DP-SGD does): kernel and input gradients.
                   jax.vmap(jax.grad(loss(f), argnums=(0, 1)), in_axes=(None, 0))(w, x[:, None]))
            for side, f in (("ours", ours), ("native", native))}

  grads = gradients(w, x)
  (got, got_per), (want, want_per) = grads["ours"], grads["native"]
  for a, b in zip(got + got_per, want + want_per):
    np.testing.assert_allclose(a, b, **TOL)
  # The per-example kernel gradients sum to the batch gradient (nothing is mixed across examples).
  np.testing.assert_allclose(got_per[0].sum(0), want[0], **TOL)


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("shape, kernel, strides, padding, dilation", CASES[:8:2], ids=IDS[:8:2])
def test_cpu_routes_under_jit_and_second_order(shape, kernel, strides, padding, dilation, route):
  x, w = _inputs(shape, kernel)
  ours = jax.jit(lambda w, x: _ours(x, w, strides, padding, dilation, route))
  np.testing.assert_allclose(ours(w, x), _native(x, w, strides, padding, dilation), **TOL)
  # Second order (e.g. a gradient penalty) through the custom VJP stays correct.
  g = lambda f: jax.grad(lambda x: jnp.sum(f(x) ** 2))
  gg = lambda f: jax.grad(lambda x: jnp.sum(g(f)(x) ** 2))
  np.testing.assert_allclose(gg(lambda x: _ours(x, w, strides, padding, dilation, route))(x),
                             gg(lambda x: _native(x, w, strides, padding, dilation))(x), rtol=1e-3, atol=1e-3)


_LOSS = lambda route, strides: lambda w, x: jnp.sum(jnp.sin(_ours(x, w, strides, "SAME", (1, 1, 1), route)))


@pytest.mark.parametrize("unroll", [16, 1, "in_traced_loop"])
def test_slices_per_example_gradients_nested_vmap_and_fallback(unroll, monkeypatch):
  """Per-example kernel gradients on the slices route: one 2D gradient per example (unrolled) or,
  above MAX_UNROLL examples or within `in_traced_loop()`, the per-tap GEMMs; under two nested vmaps
  (stacked seeds x examples, each seed its own kernel and inputs) all equal XLA's."""
  if unroll == "in_traced_loop":
    context = conv.in_traced_loop()
  else:
    monkeypatch.setattr(conv, "MAX_UNROLL", unroll)
    context = contextlib.nullcontext()
  conv._kernel_grads.cache_clear()
  strides = (1, 2, 2)
  x, w = _inputs((3, 4, 8, 8), (3, 3, 3))
  seeds_x = jnp.stack([x, 2 * x[::-1]])[:, :, None]  # (seeds, examples, 1, ...)
  seeds_w = jnp.stack([w, -w])
  native = lambda w, x: jnp.sum(jnp.sin(_native(x, w, strides, "SAME", (1, 1, 1))))
  per_seed = lambda loss: jax.vmap(jax.vmap(jax.grad(loss), in_axes=(None, 0)))
  with context:
    got = jax.jit(per_seed(_LOSS("slices", strides)))(seeds_w, seeds_x)
  want = per_seed(native)(seeds_w, seeds_x)
  assert got.shape == (2, 3) + w.shape
  np.testing.assert_allclose(got, want, **TOL)
  conv._kernel_grads.cache_clear()


@pytest.mark.parametrize("kernel, strides", [((1, 3, 3), (1, 1, 1)), ((3, 3, 3), (1, 2, 2))])
def test_small_layers_pair_examples_in_their_kernel_gradients(kernel, strides, monkeypatch):
  """Per-example kernel gradients of small layers run two examples per convolution (channels
  concatenated, the diagonal blocks kept): still each example's own gradient, an odd example alone."""
  conv._kernel_grads.cache_clear()
  x, w = _inputs((3, 4, 8, 8), kernel, cin=8, cout=8)
  x = x[:, None]  # 3 examples of one volume each.
  c = kernel[0] * 8  # The route's 2D channels: depth taps stacked.
  per_example = jax.jit(jax.vmap(jax.grad(_LOSS("slices", strides)), in_axes=(None, 0)))
  native = jax.vmap(jax.grad(lambda w, x: jnp.sum(jnp.sin(_native(x, w, strides, "SAME", (1, 1, 1))))),
                    in_axes=(None, 0))
  want = native(w, x)
  paired = per_example.lower(w, x).as_text()
  got = per_example(w, x)
  assert got.shape == (3,) + w.shape
  np.testing.assert_allclose(got, want, **TOL)
  # One 2D kernel-gradient convolution of a pair (2C -> 2O: (kh, kw, 2C, 16)) and one of the third example.
  assert f"tensor<3x3x{2 * c}x16xf32>" in paired and f"tensor<3x3x{c}x8xf32>" in paired
  conv._kernel_grads.cache_clear()
  monkeypatch.setattr(conv, "PAIR_MAX_FLOPS", 0)  # Pairing off: one convolution per example.
  alone = jax.jit(jax.vmap(jax.grad(_LOSS("slices", strides)), in_axes=(None, 0))).lower(w, x).as_text()
  assert f"tensor<3x3x{2 * c}x16xf32>" not in alone
  conv._kernel_grads.cache_clear()


@pytest.mark.parametrize("route", ROUTES)
def test_examples_merged_gives_the_same_batch_gradient_and_refuses_per_example(route):
  """examples_merged(): grad of a vmapped per-example loss runs the conv on the merged batch (same
  gradient); a per-example gradient (vmap of grad, DP-SGD) traced inside it fails loudly."""
  x, w = _inputs((4, 3, 8, 8), (1, 3, 3))
  loss = _LOSS(route, (1, 1, 1))
  batch_grad = jax.grad(lambda w: jax.vmap(lambda xi: loss(w, xi[None]))(x).sum())
  want = jax.grad(lambda w: jnp.sum(jnp.sin(_native(x, w, (1, 1, 1), "SAME", (1, 1, 1)))))(w)
  with conv.examples_merged():
    merged = jax.jit(batch_grad).lower(w).as_text()
    got = jax.jit(batch_grad)(w)
  np.testing.assert_allclose(got, want, **TOL)
  # Outside (a new function: jit caches traces): per example, summed.
  np.testing.assert_allclose(jax.jit(lambda w: batch_grad(w))(w), want, **TOL)
  # Merged: every convolution has the whole batch (4 examples x 3 slices = 12 images) on its batch axis.
  assert "tensor<12x8x8x" in merged and "tensor<3x8x8x" not in merged
  per_example = jax.vmap(jax.grad(loss), in_axes=(None, 0))
  with conv.examples_merged(), pytest.raises(ValueError, match="Linearization failed"):
    per_example(w, x[:, None])
  merged_grads = conv.merging_examples(per_example)
  with pytest.raises(ValueError, match="Linearization failed"):
    merged_grads(w, x[:, None])


@pytest.mark.parametrize("route", ROUTES)
def test_cpu_routes_compile_to_2d_convolutions_only(route):
  """Forward, input and kernel gradient of a 5-D conv leave no 3D convolution for XLA:CPU to run."""
  for kernel, strides in (((1, 3, 3), (1, 1, 1)), ((3, 3, 3), (1, 2, 2)), ((3, 3, 3), (2, 2, 2))):
    x, w = _inputs((2, 4, 8, 8), kernel)
    f = lambda w, x: jnp.sum(_ours(x, w, strides, "SAME", (1, 1, 1), route) ** 2)
    hlo = jax.jit(jax.grad(f, argnums=(0, 1))).lower(w, x).as_text()
    convolutions = [line for line in hlo.splitlines() if "stablehlo.convolution" in line]
    assert convolutions
    for line in convolutions:
      result_type = line.rsplit("->", 1)[1]
      assert re.search(r"tensor<\d+x\d+x\d+x\d+xf32>", result_type), line  # 4-D: a 2D convolution.


def test_conv_module_is_nn_conv():
  """Same parameter names, shapes and initial values as nn.Conv: checkpoints do not care."""
  x = jnp.ones((1, 2, 6, 6, 3))
  ours = conv.Conv(5, (1, 3, 3), strides=(1, 2, 2), padding="SAME")
  theirs = nn.Conv(5, (1, 3, 3), strides=(1, 2, 2), padding="SAME")
  p1, p2 = ours.init(jax.random.PRNGKey(0), x), theirs.init(jax.random.PRNGKey(0), x)
  assert jax.tree_util.tree_structure(p1) == jax.tree_util.tree_structure(p2)
  jax.tree_util.tree_map(np.testing.assert_array_equal, p1, p2)
  with conv.weight_grad("taps"):
    np.testing.assert_allclose(ours.apply(p1, x), theirs.apply(p2, x), rtol=1e-5, atol=1e-5)
  with conv.weight_grad("slices"):
    np.testing.assert_allclose(ours.apply(p1, x), theirs.apply(p2, x), rtol=1e-5, atol=1e-5)


UPSAMPLE_CASES = [((1, 2, 2), (1, 3, 3)),   # Thick-slice decoders: in-plane upsampling.
                  ((2, 2, 2), (3, 3, 3)),   # Isotropic.
                  ((1, 2, 2), (3, 4, 4)),   # Even kernel (SAME pads it unevenly).
                  ((3, 1, 2), (1, 3, 1))]   # Stride 3, a stride-1 axis, a kernel of one tap.


def _upsample_then_conv(x, w, strides):
  for axis, s in zip((1, 2, 3), strides):
    x = jnp.repeat(x, s, axis=axis)
  return lax.conv_general_dilated(x, w, (1, 1, 1), "SAME", dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))


@pytest.mark.parametrize("strides, kernel", UPSAMPLE_CASES)
def test_upsampled_conv_is_upsampling_then_conv(strides, kernel):
  """The phase decomposition equals nearest upsampling followed by XLA's SAME convolution: values, and
  gradients batched and per example (DP-SGD), for the kernel and the input."""
  x, w = _inputs((2, 3, 4, 5), kernel, cin=3, cout=4)
  loss = lambda f: lambda w, x: jnp.sum(jnp.sin(f(x, w, strides)))

  @jax.jit
  def gradients(w, x):
    return {side: (f(x, w, strides), jax.grad(loss(f), argnums=(0, 1))(w, x),
                   jax.vmap(jax.grad(loss(f), argnums=(0, 1)), in_axes=(None, 0))(w, x[:, None]))
            for side, f in (("ours", conv.upsampled_conv), ("plain", _upsample_then_conv))}

  out = gradients(w, x)
  assert out["ours"][0].shape == (2, 3 * strides[0], 4 * strides[1], 5 * strides[2], 4)
  for a, b in zip(jax.tree_util.tree_leaves(out["ours"]), jax.tree_util.tree_leaves(out["plain"])):
    np.testing.assert_allclose(a, b, **TOL)


def test_upsample_module_keeps_nn_conv_parameters():
  """On the CPU route `Upsample` computes phase by phase; its parameters (names, shapes, initial values)
  are those of the nn.Conv it replaced, and it gives the same output as the written-out form."""
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 3, 4, 4, 5))
  module = layers.Upsample(6, (1, 2, 2), (1, 3, 3))
  with conv.weight_grad("native"):  # Upsampling then a convolution, as written.
    plain = module.init(jax.random.PRNGKey(0), x)
    want = jax.jit(module.apply)(plain, x)
    upsampled_copy = "f32[2,3,8,8,5]"
    assert upsampled_copy in str(jax.make_jaxpr(module.apply)(plain, x))
  with conv.weight_grad("slices"):
    ours = module.init(jax.random.PRNGKey(0), x)
    got = jax.jit(module.apply)(ours, x)
    jaxpr = str(jax.make_jaxpr(module.apply)(ours, x))
  assert jax.tree_util.tree_structure(ours) == jax.tree_util.tree_structure(plain)
  jax.tree_util.tree_map(np.testing.assert_array_equal, ours, plain)
  np.testing.assert_allclose(got, want, **TOL)
  assert upsampled_copy not in jaxpr  # The upsampled input is never written.


def test_weight_grad_setting_is_validated_and_restored():
  before = conv.resolved_weight_grad()
  with conv.weight_grad("native"):
    assert conv.resolved_weight_grad() == "native"
  assert conv.resolved_weight_grad() == before
  with pytest.raises(ValueError, match="choose one of"):
    conv.set_weight_grad("fast")


# Every model at its tiny configuration (configs/*.py:tiny) and the two feature ResNets.
X, Z = jnp.zeros((1, 6, 32, 32, 1)), jnp.zeros((1, 6, 16, 16, 2))
MODELS = {
    "autoencoder": (lambda: AutoencoderKL(channels=(8, 16), num_res_blocks=1, latent_channels=2,
                                          kernel=(1, 3, 3), stride=(1, 2, 2), attention=False), (X,)),
    "autoencoder_isotropic": (lambda: AutoencoderKL(channels=(8, 16), num_res_blocks=1, latent_channels=2,
                                                    kernel=(3, 3, 3), stride=(2, 2, 2), attention=True),
                              (X[:, :4],)),
    "discriminator": (lambda: PatchDiscriminator3D(channels=(32, 64, 128), kernel=(1, 4, 4),
                                                   stride=(1, 2, 2)), (X,)),
    "unet": (lambda: LatentUNet(out_channels=2, base_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                                attention_levels=(1,), heads=2, kernel=(1, 3, 3), stride=(1, 2, 2),
                                num_attributes=3, context_dim=16),
             (Z, jnp.zeros((1,)), jnp.zeros((1, 3)), jnp.ones((1, 3)))),
    "unet_isotropic": (lambda: LatentUNet(out_channels=2, base_channels=8, channel_mult=(1, 2),
                                          num_res_blocks=1, attention_levels=(), heads=2,
                                          kernel=(3, 3, 3), stride=(1, 2, 2), num_attributes=3,
                                          context_dim=8),
                       (Z[:, :2, :8, :8], jnp.zeros((1,)), jnp.zeros((1, 3)), jnp.ones((1, 3)))),
    "ssl": (lambda: ssl_encoder.SSLEncoder(channels=(8, 16), num_res_blocks=1), (X,)),
    "regressor": (lambda: regressor.AttributeRegressor(channels=(8, 16), num_outputs=2), (X,)),
    "medicalnet10": (lambda: resnet3d.medicalnet_resnet(10), (jnp.zeros((1, 8, 16, 16, 1)),)),
    "torchvision18": (lambda: resnet3d.torchvision_resnet(18), (jnp.zeros((1, 16, 16, 3)),)),
}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_model_parameters_do_not_depend_on_the_routing(name, monkeypatch):
  """Every model's parameter tree (names, shapes, dtypes) is the one plain nn.Conv layers give.

  (Initial values follow: same modules, names and keys; `test_conv_module_is_nn_conv` checks them.)
  """
  build, args = MODELS[name]
  tree = lambda: jax.eval_shape(lambda: build().init(jax.random.PRNGKey(0), *args))
  flat = lambda t: {jax.tree_util.keystr(p): (v.shape, v.dtype)
                    for p, v in jax.tree_util.tree_leaves_with_path(t)}
  routed = flat(tree())
  patched = 0
  for module in (autoencoder, layers, unet, ssl_encoder, regressor, resnet3d):
    if getattr(module, "Conv", None) is conv.Conv:
      monkeypatch.setattr(module, "Conv", nn.Conv)
      patched += 1
  assert patched == 6  # Every model module builds its convolutions with conv.Conv.
  plain = flat(tree())
  assert routed == plain


@pytest.mark.parametrize("name", ["autoencoder", "autoencoder_isotropic", "medicalnet10"])
def test_model_outputs_and_gradients_match_native(name):
  build, args = MODELS[name]
  args = (args[0][:, :, :16, :16],) + args[1:]  # Small: XLA's own 3D gradients are slow on CPU.
  model = build()
  params = layers.init_params(model, jax.random.PRNGKey(0), *args)
  params = jax.tree_util.tree_map(lambda p: p + 0.05, params)  # Leave the zero-initialised identity.
  rng = np.random.default_rng(1)
  args = (jnp.asarray(rng.standard_normal(args[0].shape), jnp.float32),) + args[1:]
  if name == "medicalnet10":  # Frozen feature extractor: the forward pass is what matters.
    with conv.weight_grad("taps"):
      ours = jax.jit(lambda p, x: model.apply(p, x))(params, args[0])  # A new function per route.
    with conv.weight_grad("native"):
      theirs = jax.jit(lambda p, x: model.apply(p, x))(params, args[0])
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4 * float(jnp.max(jnp.abs(theirs))))
    return
  if name.startswith("autoencoder"):
    loss = lambda p, x: jnp.sum(model.apply(p, x)[0] ** 2)
  else:
    loss = lambda p, x: jnp.sum(model.apply(p, x, *args[1:]) ** 2)
  results = {}
  for impl in ("slices", "taps", "native"):
    with conv.weight_grad(impl):
      results[impl] = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(params, args[0])
  scale = lambda t: max(float(jnp.max(jnp.abs(a))) for a in jax.tree_util.tree_leaves(t))
  close = lambda got, want: jax.tree_util.tree_map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4 * scale(want)), got, want)
  v2, (gp2, gx2) = results["native"]
  for impl in ("slices", "taps"):
    v1, (gp1, gx1) = results[impl]
    np.testing.assert_allclose(v1, v2, rtol=1e-4)
    close(gp1, gp2)
    np.testing.assert_allclose(gx1, gx2, rtol=1e-3, atol=1e-4 * scale(gx2))
  if name != "autoencoder":  # (3D kernels per example: the CASES above.)
    return
  # The whole model per example (DP-SGD: vmap of grad) and merged (a non-private step: grad of vmap).
  xs = jnp.concatenate([args[0], -0.5 * args[0]])[:, None]
  # (New jitted functions per setting: the route is read when tracing, and jit caches traces.)
  per_example = lambda: jax.jit(jax.vmap(jax.grad(loss), in_axes=(None, 0)))(params, xs)
  batch = lambda: jax.jit(jax.grad(lambda p, xs: jax.vmap(lambda x: loss(p, x))(xs).sum()))(params, xs)
  with conv.weight_grad("native"):
    want_pe, want_b = per_example(), batch()
  with conv.weight_grad("slices"):
    close(per_example(), want_pe)
    with conv.examples_merged():
      close(batch(), want_b)


def test_cached_per_route_builds_once_per_arguments_and_route():
  """The shared cache of jitted builders: the convolution route in force is part of the key (it is read
  when tracing), and unhashable arguments are built every time rather than refused."""
  builds = []

  @conv.cached_per_route()
  def build(*args):
    builds.append(args)
    return object()

  with conv.weight_grad("taps"):
    first = build(1, (2, 3))
    assert build(1, (2, 3)) is first and len(builds) == 1
    assert build(2, (2, 3)) is not first
  with conv.weight_grad("native"):
    assert build(1, (2, 3)) is not first and len(builds) == 3
  assert build(1, [2, 3]) is not build(1, [2, 3]) and len(builds) == 5
  build.cache_clear()
  with conv.weight_grad("taps"):
    assert build(1, (2, 3)) is not first
