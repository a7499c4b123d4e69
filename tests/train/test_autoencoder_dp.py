"""The autoencoder trained with DP-SGD (configs/autoencoder_dp.py) at tiny size: ledger, resume, refusals."""

import json
import pathlib

import jax
import numpy as np
import pytest

from jaxldm.config import ConfigError, load_config
from jaxldm.privacy import accounting
from jaxldm.train import autoencoder, common

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _config(data_dir, **overrides):
  base = {"data.root": str(data_dir), "data.attributes": (), "data.shape": (4, 16, 16),
          "data.spacing": (20.0, 4.0, 4.0), "model.channels": (4, 8), "train.log_every": 1,
          "train.checkpoint_every": 1, "dp.expected_batch_size": 2, "dp.microbatch_size": 2,
          "dp.delta": 1e-3, "dp.noise_multiplier": 1.0, "dp.noise_seed": 99, "train.steps": 2}
  base.update(overrides)
  return load_config(str(ROOT / "configs/autoencoder_dp.py:tiny"), base)


def _params(workdir):
  ckpt = common.Checkpointer(pathlib.Path(workdir) / "checkpoints")
  restored, _ = ckpt.restore_untyped()
  ckpt.close()
  return jax.tree_util.tree_leaves(restored["params"])


def test_dp_autoencoder_ledger_and_resume(tiny_nifti_dir, tmp_path):
  # "Killed" after 2 steps (checkpoint and ledger on disk), then resumed to 3.
  first = autoencoder.train_and_evaluate(_config(tiny_nifti_dir), tmp_path)
  assert first["steps"] == 2
  assert json.loads((tmp_path / "privacy_ledger.json").read_text())["steps"] == 2
  info = autoencoder.train_and_evaluate(_config(tiny_nifti_dir, **{"train.steps": 3}), tmp_path)
  ledger = json.loads((tmp_path / "privacy_ledger.json").read_text())
  expected = accounting.epsilon(noise_multiplier=1.0, sampling_rate=2 / 8, steps=3, delta=1e-3, accountant="rdp")
  assert info["steps"] == ledger["steps"] == 3
  assert info["privacy"]["epsilon"] == pytest.approx(expected, rel=1e-9)
  assert ledger["epsilon_so_far"] == pytest.approx(expected, rel=1e-9)
  assert info["privacy"]["noise_seed"].startswith("fixed") and info["privacy"]["per_layer"] is False
  assert info["private"] is True and info["scale_factor"] == 1.0  # Fixed: no statistic of private latents.
  assert info["latent_shape"] == [4, 8, 8, 2]
  assert json.loads((tmp_path / "autoencoder.json").read_text())["privacy"] == info["privacy"]
  lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [l["step"] for l in lines] == [1, 2, 3]
  assert lines[-1]["epsilon"] == pytest.approx(expected, rel=1e-9)
  for line in lines:  # Aggregates only: no per-example arrays in the logs.
    assert all(not isinstance(v, list) for v in line.values())
    assert {"loss", "l1", "kl", "clipped_fraction"} <= set(line)
  assert not list((tmp_path / "samples").iterdir())  # No reconstructions of private volumes.


def test_dp_autoencoder_stops_before_the_budget(tiny_nifti_dir, tmp_path):
  target = accounting.epsilon(noise_multiplier=1.0, sampling_rate=2 / 8, steps=1, delta=1e-3, accountant="rdp") * 1.0001
  info = autoencoder.train_and_evaluate(_config(tiny_nifti_dir, **{"train.steps": 5, "dp.target_epsilon": target}),
                                        tmp_path)
  assert info["privacy"]["stopped_for_budget"] is True
  assert info["steps"] == 1 and info["privacy"]["epsilon"] <= target


def test_per_layer_clipping_reaches_the_engine(tiny_nifti_dir, tmp_path):
  # Same keys, same batches, same noise: only the clipping differs (a small C clips every example).
  # SGD: the update is linear in the gradient (Adam's first step is sign(g), mostly the noise's sign).
  small_c = {"dp.l2_clip_norm": 1e-3, "train.steps": 1, "optim.optimizer": "sgd", "optim.learning_rate": 1.0}
  flat = autoencoder.train_and_evaluate(_config(tiny_nifti_dir, **small_c), tmp_path / "flat")
  layer = autoencoder.train_and_evaluate(_config(tiny_nifti_dir, **small_c, **{"dp.per_layer": True}), tmp_path / "layer")
  assert flat["privacy"]["per_layer"] is False and layer["privacy"]["per_layer"] is True
  assert layer["privacy"]["epsilon"] == flat["privacy"]["epsilon"]  # Same sensitivity C: same accounting.
  for name in ("flat", "layer"):  # Every real example was clipped (flat: norm > C; per layer: a leaf).
    assert json.loads((tmp_path / name / "metrics.jsonl").read_text().splitlines()[-1])["clipped_fraction"] == 1.0
  diffs = [np.abs(np.asarray(a) - np.asarray(b)).max() for a, b in zip(_params(tmp_path / "flat"), _params(tmp_path / "layer"))]
  assert max(diffs) > 0


@pytest.mark.parametrize("key, value", [("loss.adversarial_weight", 0.1), ("train.sample_every", 1), ("scale_factor", 0.0)])
def test_dp_refuses_what_would_leak_private_data(tiny_nifti_dir, tmp_path, key, value):
  with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
    autoencoder.train_and_evaluate(_config(tiny_nifti_dir, **{key: value}), tmp_path)
  assert not (tmp_path / "privacy_ledger.json").exists()  # Refused before any step or ledger.
