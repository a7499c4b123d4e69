"""Tiny models, per-example losses and the brute-force DP-SGD reference shared by privacy tests.

The reference is deliberately naive: a Python loop over examples, one jax.grad per example,
clipping in float64 numpy. Everything the engine does fast is checked against it.
"""

from collections.abc import Callable
import dataclasses
import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest


class Mlp(nn.Module):
  """2-layer MLP: 3 -> 8 -> 1 (41 parameters)."""

  @nn.compact
  def __call__(self, x):
    return nn.Dense(1)(jnp.tanh(nn.Dense(8)(x)))


class TinyConv3d(nn.Module):
  """Conv3d with an in-plane (1,3,3) kernel, GroupNorm, pooling, linear head (53 parameters)."""

  @nn.compact
  def __call__(self, x):  # x: (N, D, H, W, C)
    h = nn.Conv(4, (1, 3, 3))(x)
    h = nn.swish(nn.GroupNorm(num_groups=2)(h))
    return nn.Dense(1)(jnp.mean(h, axis=(1, 2, 3)))


@dataclasses.dataclass
class Problem:
  """A per-example loss with its parameters and a batch."""
  name: str
  loss_fn: Callable[..., Any]  # (params, example, rng) -> scalar
  aux_loss_fn: Callable[..., Any]  # (params, example, rng) -> (scalar, aux)
  params: Any
  batch: Any  # {"x": (B, ...), "y": (B,)}


@functools.cache
def make_problem(name: str, batch_size: int = 6, seed: int = 0) -> Problem:
  """Builds the MLP or the Conv3d problem; the loss uses its rng like a diffusion loss would.

  Cached: the same loss_fn object lets jit reuse compilations across tests (CPU time is scarce).
  """
  key = jax.random.key(seed)
  k_init, k_x, k_y = jax.random.split(key, 3)
  if name == 'mlp':
    model, x_shape = Mlp(), (3,)
  elif name == 'conv':
    model, x_shape = TinyConv3d(), (2, 4, 4, 1)
  else:
    raise ValueError(name)
  x = jax.random.normal(k_x, (batch_size,) + x_shape)
  # Spread of target scales: some examples get clipped, some do not.
  y = jax.random.normal(k_y, (batch_size,)) * jnp.geomspace(0.01, 30.0, batch_size)
  params = model.init(k_init, x[:1])['params']

  def aux_loss_fn(p, example, rng):
    noisy_x = example['x'] + 0.1 * jax.random.normal(rng, example['x'].shape)
    pred = model.apply({'params': p}, noisy_x[None])[0, 0]
    loss = (pred - example['y'])**2
    return loss, {'pred': pred, 'sq': jnp.stack([loss, 2 * loss])}

  def loss_fn(p, example, rng):
    return aux_loss_fn(p, example, rng)[0]

  return Problem(name, loss_fn, aux_loss_fn, params, {'x': x, 'y': y})


@pytest.fixture(params=['mlp', 'conv'])
def problem(request) -> Problem:
  return make_problem(request.param)


@functools.cache
def _jitted_value_and_grad(loss_fn, has_aux):
  return jax.jit(jax.value_and_grad(loss_fn, has_aux=has_aux))


@dataclasses.dataclass
class Reference:
  grad_sum: Any  # like params, float64
  abs_sum: Any  # like params: sum_i |clipped g_i|, the scale float32 summation errors follow
  loss: np.ndarray  # [B], 0 for padding
  grad_norm: np.ndarray  # [B], 0 for padding


def brute_force_grad_sum(loss_fn, params, batch, example_rng, *, l2_clip_norm, mask=None,
                         per_layer=False, has_aux=False) -> Reference:
  """sum_i mask_i clip(grad_i) by a Python loop over examples, clipping in float64."""
  grad_fn = _jitted_value_and_grad(loss_fn, has_aux)
  batch_size = len(jax.tree_util.tree_leaves(batch)[0])
  mask = np.ones(batch_size) if mask is None else np.asarray(mask)
  leaves0, treedef = jax.tree_util.tree_flatten(params)
  total = [np.zeros(l.shape, np.float64) for l in leaves0]
  abs_total = [np.zeros(l.shape, np.float64) for l in leaves0]
  losses, norms = np.zeros(batch_size), np.zeros(batch_size)
  for i in range(batch_size):
    if not mask[i]:
      continue
    example = jax.tree_util.tree_map(lambda x: x[i], batch)
    value, grad = grad_fn(params, example, jax.random.fold_in(example_rng, i))
    losses[i] = value[0] if has_aux else value
    leaves = [np.asarray(g, np.float64) for g in jax.tree_util.tree_leaves(grad)]
    norm = math.sqrt(sum(float(np.sum(g * g)) for g in leaves))
    norms[i] = norm
    if per_layer:
      c = l2_clip_norm / math.sqrt(len(leaves))
      leaves = [g * min(1.0, c / max(np.linalg.norm(g), 1e-300)) for g in leaves]
    else:
      leaves = [g * min(1.0, l2_clip_norm / max(norm, 1e-300)) for g in leaves]
    total = [t + g for t, g in zip(total, leaves)]
    abs_total = [t + np.abs(g) for t, g in zip(abs_total, leaves)]
  unflatten = lambda x: jax.tree_util.tree_unflatten(treedef, x)
  return Reference(unflatten(total), unflatten(abs_total), losses, norms)


def assert_tree_allclose(actual, expected, rtol, scale=None):
  """|actual - expected| <= rtol * scale elementwise.

  `scale` defaults to |expected|; for sums pass the sum of absolute terms (Reference.abs_sum):
  float32 summation error is relative to the terms, not to a sum that may cancel.
  """
  a_leaves, a_def = jax.tree_util.tree_flatten(actual)
  e_leaves, e_def = jax.tree_util.tree_flatten(expected)
  assert a_def == e_def
  s_leaves = e_leaves if scale is None else jax.tree_util.tree_leaves(scale)
  for a, e, s in zip(a_leaves, e_leaves, s_leaves):
    a, e = np.asarray(a, np.float64), np.asarray(e, np.float64)
    assert a.shape == e.shape
    np.testing.assert_array_less(np.abs(a - e), rtol * np.abs(np.asarray(s, np.float64)) + 1e-30)


@functools.cache
def _jit_engine(fn, loss_fn, static):
  return jax.jit(functools.partial(fn, loss_fn, **dict(static)))


def jit_engine(fn, loss_fn, **static):
  """`fn` (clipped_grad_sum or private_grad) jitted with static kwargs, cached across tests."""
  return _jit_engine(fn, loss_fn, tuple(sorted(static.items())))


@pytest.fixture
def brute_force():
  return brute_force_grad_sum


@pytest.fixture
def tree_allclose():
  return assert_tree_allclose


@pytest.fixture
def jit():
  return jit_engine


@pytest.fixture
def mlp_problem() -> Problem:
  return make_problem('mlp')
