"""Multi-host DP-SGD: 2 CPU processes (jax.distributed, local coordinator) == 1 process.

Each process is a fresh interpreter started by this test (this file run as a script, with its own
XLA_FLAGS and JAX_PLATFORMS), holding 2 CPU devices of a 4-device global mesh. They run the
trainers' DP code path (`dp.setup`: ledger on process 0, secret seeds read by process 0 and
broadcast; `PrivateRun.step_inputs`: Poisson batch assembled into a global array;
`dp.private_gradient`: per-example clipping, cross-host sum, noise) for three SGD steps, and must
agree with a 1-device run in the test process that reads the same secrets: the cross-host sum is
right, every process sampled the same batches, and the noise is drawn once globally, not per
process or per device. (A small MLP stands in for the networks so the test compiles in seconds.)
"""

from __future__ import annotations

import json
import os
import pathlib
import socket
import subprocess
import sys

import numpy as np

HERE = pathlib.Path(__file__).resolve()
ROOT = HERE.parents[2]
N, FEATURES, HIDDEN = 16, 6, 8
STEPS = 3
SECRETS = {"noise_seed": 2**62 + 12345, "sampling_seed": 2**61 + 777}  # Above 2^32: all bits must travel.


def _dp_steps(workdir: str, num_devices: int = 0) -> dict:
  """Parameters and epsilon after STEPS DP-SGD steps through jaxldm.train.dp on fixed data."""
  import jax
  import jax.numpy as jnp
  from rich.console import Console

  from jaxldm.infer import checkpoints
  from jaxldm.train import common, dp

  config = dp.dp_config(private=True, tiny=True)
  config.noise_multiplier = 1.0
  config.l2_clip_norm = 0.5
  config.expected_batch_size = 6
  config.microbatch_size = 2
  config.delta = 1e-3
  rng = np.random.default_rng(0)
  examples = {"x": rng.normal(size=(N, FEATURES)).astype(np.float32),
              "y": rng.normal(size=(N,)).astype(np.float32)}
  params = {"w1": rng.normal(size=(FEATURES, HIDDEN)).astype(np.float32), "b1": np.zeros(HIDDEN, np.float32),
            "w2": rng.normal(size=(HIDDEN,)).astype(np.float32)}

  def loss_fn(p, example, key):  # ONE example; the key jitters the input (per-example keys matter).
    x = example["x"] + 0.1 * jax.random.normal(key, example["x"].shape)
    return (jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"] - example["y"]) ** 2

  mesh = common.make_mesh(num_devices)
  run = dp.setup(config, pathlib.Path(workdir), N, STEPS, Console(quiet=True), mesh.devices.size)

  @jax.jit
  def step_fn(p, batch, mask, num_microbatches, key):
    grads, metrics = dp.private_gradient(loss_fn, p, batch, mask, num_microbatches, key, dp=config,
                                         noise_multiplier=run.noise_multiplier,
                                         expected_batch_size=run.expected_batch_size)
    return jax.tree_util.tree_map(lambda a, g: a - g, p, grads), metrics

  params = common.replicate(params, mesh)
  for step in range(STEPS):
    params, metrics = step_fn(params, *run.step_inputs(examples, step, mesh))
    epsilon = run.record_steps(step + 1)
  assert np.isfinite(float(metrics["loss"]))
  flat = np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(checkpoints.fetch(params))])
  return {"params": flat.tolist(), "epsilon": epsilon, "padded": run.batcher.max_size}


def _worker(process_id: int, num_processes: int, port: int, workdir: str, out: str) -> None:
  import jax

  from jaxldm.train import distributed

  assert distributed.initialize(f"localhost:{port}", num_processes, process_id)
  assert jax.process_count() == num_processes and len(jax.devices()) == 2 * num_processes
  result = _dp_steps(workdir)
  pathlib.Path(out).write_text(json.dumps(result))


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _workdir(path: pathlib.Path) -> str:
  path.mkdir()
  (path / "dp_secrets.json").write_text(json.dumps(SECRETS))
  return str(path)


def test_two_processes_match_one(tmp_path):
  port = _free_port()
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
         "PYTHONPATH": str(ROOT)}
  for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
    env.pop(name, None)
  # Process 1 gets an empty workdir of its own: it must neither read the secrets (they are
  # broadcast from process 0) nor write anything (process 0 owns the ledger).
  workdirs = [_workdir(tmp_path / "p0"), str(tmp_path / "p1")]
  (tmp_path / "p1").mkdir()
  procs = [subprocess.Popen([sys.executable, str(HERE), str(i), "2", str(port), workdirs[i], str(tmp_path / f"p{i}.json")],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(2)]
  reference = _dp_steps(_workdir(tmp_path / "one"), num_devices=1)  # Meanwhile, here, on one device.
  for i, p in enumerate(procs):
    try:
      output, _ = p.communicate(timeout=300)
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      raise
    assert p.returncode == 0, f"process {i} failed:\n{output[-3000:]}"
  p0, p1 = (json.loads((tmp_path / f"p{i}.json").read_text()) for i in range(2))
  assert p0["params"] == p1["params"]  # Every process holds the same replicated parameters.
  np.testing.assert_allclose(p0["params"], reference["params"], rtol=1e-5, atol=1e-5)
  # The noise dominates the update (std sigma C / (q N) = 0.083 per coordinate and step), so
  # agreeing to 1e-5 means the same noise was drawn, once, and the same batches were sampled.
  assert p0["padded"] % 8 == 0  # A multiple of microbatch x 4 global devices.
  assert p0["epsilon"] == p1["epsilon"] == reference["epsilon"] > 0
  ledger = json.loads((tmp_path / "p0" / "privacy_ledger.json").read_text())
  assert ledger["steps"] == STEPS and ledger["epsilon_so_far"] == p0["epsilon"]
  assert not any((tmp_path / "p1").iterdir())  # Process 1 wrote nothing.


if __name__ == "__main__":
  _worker(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5])
