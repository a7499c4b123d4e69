"""Multi-host DP-SGD: 2 CPU processes (jax.distributed, local coordinator) == 1 process.

Each process is a fresh interpreter started by this test (this file run as a script, with its own
XLA_FLAGS and JAX_PLATFORMS), holding 2 CPU devices of a 4-device global mesh. They take two DP-SGD
steps of the LDM trainer's private step (per-example clipping, noise, SGD update) on the same global
batches with the same keys as a 1-device run in the test process, and must agree with it: the
cross-host sum is right and the noise is drawn once globally, not per process or per device.
"""

from __future__ import annotations

import functools
import os
import pathlib
import socket
import subprocess
import sys

import numpy as np

HERE = pathlib.Path(__file__).resolve()
ROOT = HERE.parents[2]
LATENT = (2, 4, 4, 2)
NUM_ATTRIBUTES = 2
BATCH = 8  # Padded global batch: a multiple of microbatch (2) x global devices (4).
REAL = 6  # Real examples; the last 2 rows are padding (mask 0): 3 microbatches computed.
SIGMA, EXPECTED_BATCH = 1.0, 5.0


def _private_steps(num_devices: int = 0, steps: int = 2) -> np.ndarray:
  """Parameters (flat, host) after `steps` DP-SGD steps of the LDM trainer on fixed batches."""
  import jax
  import jax.numpy as jnp

  from jaxldm.diffusion import make_schedule
  from jaxldm.privacy.ledger import key_from_seed
  from jaxldm.train import common, ldm
  from jaxldm.train.ldm_config import ldm_config

  config = ldm_config("tiny", private=True)
  config.model.base_channels = 8
  config.model.context_dim = 8
  config.optim.optimizer = "sgd"  # Updates linear in the gradient: float differences stay float-sized.
  config.optim.learning_rate = 1.0
  config.optim.b1 = 0.0
  config.dp.microbatch_size = 2
  config.dp.l2_clip_norm = 0.5
  unet = ldm.build_unet(config.model, NUM_ATTRIBUTES, LATENT[-1])
  params = unet.init(jax.random.PRNGKey(0), jnp.zeros((1,) + LATENT), jnp.zeros((1,), jnp.int32),
                     jnp.zeros((1, NUM_ATTRIBUTES)), jnp.ones((1, NUM_ATTRIBUTES)))
  schedule = make_schedule("linear", 150, 1e-4, 7e-2)
  tx = common.make_optimizer(config.optim, steps, private=True)
  state = common.TrainState(step=jnp.array(0, jnp.int32), params=params, opt_state=tx.init(params),
                            ema_params=params)
  mesh = common.make_mesh(num_devices)
  state = common.replicate(state, mesh)
  _, private_step = ldm.make_steps(unet, tx, schedule, config, "all")
  step_fn = jax.jit(functools.partial(private_step, noise_multiplier=SIGMA, expected_batch_size=EXPECTED_BATCH))
  noise_key = key_from_seed(2**62 + 12345)  # All 64 bits, as in a real run.
  mask = (np.arange(BATCH) < REAL).astype(np.float32)
  for step in range(steps):
    rng = np.random.default_rng(step)  # The same global batch on every process.
    batch = {"latent": rng.normal(size=(BATCH,) + LATENT).astype(np.float32),
             "attributes": rng.normal(size=(BATCH, NUM_ATTRIBUTES)).astype(np.float32),
             "attribute_mask": np.ones((BATCH, NUM_ATTRIBUTES), np.float32)}
    batch, sharded_mask = common.shard_batch((batch, mask), mesh)
    state, metrics = step_fn(state, batch, sharded_mask, jnp.asarray(REAL // 2),
                             jax.random.fold_in(noise_key, step))
  assert np.isfinite(float(metrics["loss"]))
  return np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(common.fetch(state.params))])


def _worker(process_id: int, num_processes: int, port: int, out: str) -> None:
  import jax

  from jaxldm.train import distributed

  assert distributed.initialize(f"localhost:{port}", num_processes, process_id)
  assert jax.process_count() == num_processes and len(jax.devices()) == 2 * num_processes
  np.save(out, _private_steps())


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def test_two_processes_match_one(tmp_path):
  port = _free_port()
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
         "PYTHONPATH": str(ROOT)}
  for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
    env.pop(name, None)
  procs = [subprocess.Popen([sys.executable, str(HERE), str(i), "2", str(port), str(tmp_path / f"p{i}.npy")],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(2)]
  reference = _private_steps(num_devices=1)  # Meanwhile, in this process, on one device.
  for i, p in enumerate(procs):
    try:
      output, _ = p.communicate(timeout=240)
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      raise
    assert p.returncode == 0, f"process {i} failed:\n{output[-3000:]}"
  p0, p1 = np.load(tmp_path / "p0.npy"), np.load(tmp_path / "p1.npy")
  np.testing.assert_array_equal(p0, p1)  # Every process holds the same replicated parameters.
  np.testing.assert_allclose(p0, reference, rtol=1e-5, atol=1e-5)
  # The noise is really there (std sigma C / B = 0.1 per coordinate and step, far above what the
  # clipped gradients move), so agreeing to 1e-5 means the same noise was drawn, once.
  assert np.std(p0 - _initial_params()) > 0.05


def _initial_params() -> np.ndarray:
  import jax
  import jax.numpy as jnp

  from jaxldm.train import ldm
  from jaxldm.train.ldm_config import ldm_config

  config = ldm_config("tiny", private=True)
  config.model.base_channels = 8
  config.model.context_dim = 8
  unet = ldm.build_unet(config.model, NUM_ATTRIBUTES, LATENT[-1])
  params = unet.init(jax.random.PRNGKey(0), jnp.zeros((1,) + LATENT), jnp.zeros((1,), jnp.int32),
                     jnp.zeros((1, NUM_ATTRIBUTES)), jnp.ones((1, NUM_ATTRIBUTES)))
  return np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(params)])


if __name__ == "__main__":
  _worker(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
