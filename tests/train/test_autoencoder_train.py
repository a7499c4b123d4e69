"""The autoencoder trainer end to end at tiny size: resume is exact, NaN stops the run."""

import json
import pathlib

import jax
import numpy as np
import pytest

from jaxldm import fitting
from jaxldm.config import load_config
from jaxldm.train import autoencoder, common



def _config(data_dir, **overrides):
  base = {"data.root": str(data_dir), "data.attributes": (), "data.shape": (4, 16, 16),
          "data.spacing": (20.0, 4.0, 4.0), "train.batch_size": 4, "train.log_every": 1,
          "train.sample_every": 0, "train.checkpoint_every": 2, "train.steps": 4}
  base.update(overrides)
  return load_config("autoencoder:tiny", base)


def _final_tree(workdir, key):
  ckpt = common.Checkpointer(pathlib.Path(workdir) / "checkpoints")
  tree, _ = ckpt.restore_tree(key)
  ckpt.close()
  return tree


def _final_params(workdir):
  ckpt = common.Checkpointer(pathlib.Path(workdir) / "checkpoints")
  step = ckpt.latest_step()
  restored, _ = ckpt.restore_untyped(step)
  ckpt.close()
  return step, restored


def test_resume_is_bitwise_identical(tiny_nifti_dir, tmp_path):
  autoencoder.train_and_evaluate(_config(tiny_nifti_dir), tmp_path / "straight")
  # Interrupted after step 2 (its checkpoint), then resumed to step 4.
  autoencoder.train_and_evaluate(_config(tiny_nifti_dir, **{"train.steps": 2}), tmp_path / "resumed")
  autoencoder.train_and_evaluate(_config(tiny_nifti_dir), tmp_path / "resumed")
  step_a, a = _final_params(tmp_path / "straight")
  step_b, b = _final_params(tmp_path / "resumed")
  assert step_a == step_b == 4
  leaves_a, leaves_b = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
  assert len(leaves_a) == len(leaves_b) > 0
  for x, y in zip(leaves_a, leaves_b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  lines = [json.loads(l) for l in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
  assert [l["step"] for l in lines] == [1, 2, 3, 4]
  info = json.loads((tmp_path / "straight" / "autoencoder.json").read_text())
  assert info["latent_shape"] == [4, 8, 8, 2] and info["scale_factor"] > 0


def test_nan_stops_the_run_and_keeps_the_last_good_checkpoint(tiny_nifti_dir, tmp_path):
  autoencoder.train_and_evaluate(_config(tiny_nifti_dir, **{"train.steps": 2}), tmp_path)
  exploding = _config(tiny_nifti_dir, **{"optim.learning_rate": 1e30, "train.steps": 12})
  with pytest.raises(fitting.TrainingError, match=r"became (nan|inf) at step ([3-9]|1[0-2])"):
    autoencoder.train_and_evaluate(exploding, tmp_path)
  ckpt = common.Checkpointer(tmp_path / "checkpoints")
  step = ckpt.latest_step()
  params = jax.tree_util.tree_leaves(ckpt.restore_tree("params", step)[0])
  ckpt.close()
  assert step == 2  # The last good checkpoint stays ...
  assert params and all(np.isfinite(p).all() for p in params)  # ... and nothing non-finite was saved.


def test_adversarial_critic_switches_on_at_its_start_step(tiny_nifti_dir, tmp_path):
  config = _config(tiny_nifti_dir, **{"loss.adversarial_weight": 0.1, "loss.adversarial_start": 2,
                                      "disc.channels": (4, 8), "train.steps": 3})
  autoencoder.train_and_evaluate(config, tmp_path)
  lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert all(np.isfinite(l["disc_loss"]) for l in lines)
  assert lines[0]["adv"] != 0.0  # The critic's score is computed (weight 0 before the start step).


def test_one_and_four_devices_agree(tiny_nifti_dir, tmp_path):
  assert len(jax.devices()) >= 4, "the test session forces 4 CPU devices (tests/conftest.py)"
  for devices in (1, 4):
    # SGD: updates are linear in the gradient, so float-level differences stay float-level
    # (Adam turns a ~0 gradient's rounding noise into a full +-lr step).
    config = _config(tiny_nifti_dir, **{"train.num_devices": devices, "train.steps": 2, "optim.optimizer": "sgd",
                                        "optim.learning_rate": 0.1})
    autoencoder.train_and_evaluate(config, tmp_path / str(devices))
  one, four = (_final_tree(tmp_path / str(devices), "params") for devices in (1, 4))
  for x, y in zip(jax.tree_util.tree_leaves(one), jax.tree_util.tree_leaves(four)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-5)
