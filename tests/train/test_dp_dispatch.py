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


# ---------------------------------------------------------------------------------------------
# dp.microbatch_loop "accumulate": one program per microbatch, sums added on the device, one noise draw
# ---------------------------------------------------------------------------------------------
def _aux_loss(w, example, rng):
  loss = jnp.sum((w * example["x"] + 0.3 * jax.random.normal(rng, (3,))) ** 2)  # Keys steer the gradient.
  return loss, {"first": example["x"][0]}


MECHANISM = (1.0, 8.0, 0.5)  # sigma, expected batch size, C (PrivateRun.mechanism of a run with a ledger).


def _sgd_step(mode: str, *, stats_weight=0.1, vmapped=False):
  cfg = dp.dp_config(private=True, tiny=True)
  cfg.microbatch_size, cfg.l2_clip_norm, cfg.stats_weight, cfg.microbatch_loop = 4, 0.5, stats_weight, mode
  loss_of = lambda state: (state["w"], _aux_loss)
  finish = lambda state, grads, metrics: ({"w": state["w"] - 0.1 * grads, "step": state["step"] + 1}, metrics)
  return dp.private_step(loss_of, finish, cfg, has_aux=True, vmapped=vmapped), cfg


def _steps(step_fn, run, examples, mesh, steps):
  state, out = common.replicate({"w": jnp.array([1.0, -2.0, 0.5]), "step": jnp.int32(0)}, mesh), []  # As trainers.
  for s in steps:
    state, metrics = step_fn(state, *run.step_inputs(examples, s, mesh), *MECHANISM)
    out.append((np.asarray(state["w"]), {k: float(v) for k, v in metrics.items()}))
  return out


@pytest.mark.parametrize("devices", [1, 2])
def test_accumulated_step_equals_the_one_program_steps_and_compiles_once(devices):
  if len(jax.devices()) < devices:
    pytest.skip("needs XLA_FLAGS=--xla_force_host_platform_device_count=2")
  examples = {"x": np.random.default_rng(0).normal(size=(40, 3)).astype(np.float32)}
  mesh = common.make_mesh(devices)
  run = _run(True, m=4 * devices)  # Rows: a multiple of microbatch x devices.
  sizes = {run.rows_needed(s) for s in range(6)}
  assert len(sizes) > 1  # Several Poisson sizes: the accumulated step must not compile one program each.
  acc, _ = _sgd_step("accumulate")
  # The traced loop counts microbatches of m rows; this batcher's count is of m x devices rows.
  others = ("host", "traced") if devices == 1 else ("host",)
  results = {mode: _steps(_sgd_step(mode)[0], run, examples, mesh, range(6)) for mode in others}
  results["accumulate"] = _steps(acc, run, examples, mesh, range(6))
  for mode in others:
    for (w, metrics), (w_ref, metrics_ref) in zip(results["accumulate"], results[mode]):
      np.testing.assert_allclose(w, w_ref, rtol=1e-5, atol=1e-6)
      assert metrics.keys() == metrics_ref.keys() == {"grad_norm", "loss", "clipped_fraction", "first"}
      for k in metrics:  # The released statistics too: same mechanism, same noise.
        np.testing.assert_allclose(metrics[k], metrics_ref[k], rtol=1e-5, atol=1e-6)
  assert acc._add._cache_size() == 1 and acc._release._cache_size() == 1  # Every size: the same two programs.


def test_accumulated_step_draws_the_noise_once_and_keeps_every_rows_key(monkeypatch):
  # A broken variant must show: noise per chunk, or a chunk summed with another chunk's keys.
  examples = {"x": np.random.default_rng(1).normal(size=(40, 3)).astype(np.float32)}
  mesh, run = common.make_mesh(1), _run(True)
  s = next(s for s in range(50) if run.rows_needed(s) >= 12)  # Three chunks or more.
  ref = _steps(_sgd_step("host")[0], run, examples, mesh, [s])[0][0]
  np.testing.assert_allclose(_steps(_sgd_step("accumulate")[0], run, examples, mesh, [s])[0][0], ref, rtol=1e-5)
  real_sums = dp.chunk_sums
  monkeypatch.setattr(dp, "chunk_sums", lambda *a, **kw: real_sums(*a[:4], 0, *a[5:], **kw))  # Offsets lost.
  assert not np.allclose(_steps(_sgd_step("accumulate")[0], run, examples, mesh, [s])[0][0], ref, rtol=1e-3)
  monkeypatch.setattr(dp, "chunk_sums", real_sums)
  real_release = dp.release_sums
  calls = []
  monkeypatch.setattr(dp, "release_sums", lambda *a, **kw: calls.append(1) or real_release(*a, **kw))
  _steps(_sgd_step("accumulate")[0], run, examples, mesh, [s])
  assert len(calls) == 1  # Traced once, into the one release program: noise once per logical batch.


def test_vmapped_accumulated_step_is_each_seeds_own_step():
  examples = {"x": np.random.default_rng(2).normal(size=(40, 3)).astype(np.float32)}
  mesh, runs = common.make_mesh(1), [_run(True), _run(True)]
  runs[1].noise_key = jax.random.PRNGKey(7)
  step = _sgd_step("accumulate", vmapped=True)[0]
  state = {"w": jnp.stack([jnp.array([1.0, -2.0, 0.5])] * 2), "step": jnp.zeros(2, jnp.int32)}
  s = 3
  rows = max(r.rows_needed(s) for r in runs)
  inputs = [r.step_inputs(examples, s, mesh, rows) for r in runs]
  stacked = [jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *[inp[k] for inp in inputs]) for k in range(4)]
  state, _ = step(state, *stacked, *MECHANISM)
  for i, r in enumerate(runs):
    alone = _steps(_sgd_step("host")[0], r, examples, mesh, [s])[0][0]
    np.testing.assert_allclose(np.asarray(state["w"][i]), alone, rtol=1e-5, atol=1e-6)



def test_a_new_poisson_size_builds_one_slice_per_input_not_one_per_chunk(programs_built):
  """A step of a Poisson size not seen before reuses the two programs; cutting its chunks builds one slice
  per batch input (an offset operand), not one per (chunk, input): a size of many chunks mid-run compiled
  a slice for every offset before."""
  examples = {"x": np.random.default_rng(0).normal(size=(40, 3)).astype(np.float32)}
  mesh = common.make_mesh(1)
  run = _run(True, q=0.5)  # Batches of ~20 rows: sizes of 3 to 7 chunks of 4.
  acc, _ = _sgd_step("accumulate")
  _steps(acc, run, examples, mesh, [0])
  seen = {run.rows_needed(0)}
  checked = 0
  for s in range(1, 12):
    rows = run.rows_needed(s)
    with programs_built() as built:
      _steps(acc, run, examples, mesh, [s])
    if rows in seen:
      assert built == [], (s, built)
    else:
      assert len(built) <= 2, (rows, built)  # The examples' one input and the mask.
      checked += rows // 4 > 1  # Sizes of several chunks are what the offsets would have multiplied.
    seen.add(rows)
  assert checked >= 2
