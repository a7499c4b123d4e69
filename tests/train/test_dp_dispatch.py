"""Host dispatch of Poisson microbatches (dp.microbatch_loop): only padding is cut, and the private
gradient equals the traced loop's."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxldm.privacy import sampling
from jaxldm.train import common, dp


def _run(host: bool, n=40, q=0.2, m=4):
  batcher = sampling.PoissonBatcher(n, q, seed=3, microbatch_size=m, max_size=sampling.max_batch_size(n, q, m))
  return dp.PrivateRun(ledger=None, batcher=batcher, noise_key=jax.random.PRNGKey(1), noise_multiplier=1.0,
                       allowed_steps=10, per_layer=False, host_dispatch=host, row_multiple=m)


def _loss(w, example, rng):
  return jnp.sum((w * example["x"]) ** 2) + 0.0 * jax.random.normal(rng)


@pytest.mark.parametrize("step", range(6))
def test_host_dispatch_cuts_padding_only_and_gives_the_loops_gradient(step):
  examples = {"x": np.random.default_rng(0).normal(size=(40, 3)).astype(np.float32)}
  mesh = common.make_mesh(1)
  host, traced = _run(True), _run(False)
  hb, hm, _, hrng = host.step_inputs(examples, step, mesh)
  tb, tm, tn, trng = traced.step_inputs(examples, step, mesh)
  real = int(np.asarray(tm).sum())
  assert int(np.asarray(hm).sum()) == real  # Every sampled example kept.
  assert hm.shape[0] == host.rows_needed(step) == max(1, -(-real // 4)) * 4 < tm.shape[0] + 1
  assert (hrng == trng).all()
  cfg = dp.dp_config(private=True, tiny=True)
  cfg.microbatch_size, cfg.l2_clip_norm = 4, 0.5
  w = jnp.array([1.0, -2.0, 0.5])
  grads = {}
  for mode, (b, m, nmb, rng) in {"host": (hb, hm, None, hrng), "traced": (tb, tm, tn, trng)}.items():
    cfg.microbatch_loop = mode
    grads[mode], _ = dp.private_gradient(_loss, w, b, m, nmb, rng, dp=cfg, noise_multiplier=1.0,
                                         expected_batch_size=8.0)
  np.testing.assert_allclose(grads["host"], grads["traced"], rtol=1e-5, atol=1e-6)


def test_unknown_microbatch_loop_names_the_key():
  cfg = dp.dp_config(private=True, tiny=True)
  cfg.microbatch_loop = "sometimes"
  with pytest.raises(Exception, match=r"dp\.microbatch_loop"):
    dp.host_dispatch(cfg)
