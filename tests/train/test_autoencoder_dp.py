"""The autoencoder trained with DP-SGD (preset autoencoder_dp) at tiny size: ledger, resume, refusals."""

import json
import pathlib

import jax
import numpy as np
import pytest

from jaxldm.config import ConfigError, load_config
from jaxldm.privacy import accounting
from jaxldm.train import autoencoder, common



def _config(data_dir, **overrides):
  base = {"data.root": str(data_dir), "data.attributes": (), "data.shape": (4, 16, 16),
          "data.spacing": (20.0, 4.0, 4.0), "model.channels": (4, 8), "train.log_every": 1,
          "train.checkpoint_every": 1, "dp.expected_batch_size": 2, "dp.microbatch_size": 2,
          "dp.delta": 1e-3, "dp.noise_multiplier": 1.0, "dp.noise_seed": 99, "train.steps": 2}
  base.update(overrides)
  return load_config("autoencoder_dp:tiny", base)


def _params(workdir):
  ckpt = common.Checkpointer(pathlib.Path(workdir) / "checkpoints")
  params, _ = ckpt.restore_tree("params")
  ckpt.close()
  return jax.tree_util.tree_leaves(params)


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
  small_c = {"dp.l2_clip_norm": 1e-3, "train.steps": 1, "optim.optimizer": "sgd", "optim.learning_rate": 1.0,
             "dp.noise_multiplier": 1e-4, "dp.target_epsilon": 1e9}
  flat = autoencoder.train_and_evaluate(_config(tiny_nifti_dir, **small_c), tmp_path / "flat")
  layer = autoencoder.train_and_evaluate(_config(tiny_nifti_dir, **small_c, **{"dp.per_layer": True}), tmp_path / "layer")
  assert flat["privacy"]["per_layer"] is False and layer["privacy"]["per_layer"] is True
  assert layer["privacy"]["epsilon"] == flat["privacy"]["epsilon"]  # Same sensitivity C: same accounting.
  for name in ("flat", "layer"):  # Every real example was clipped (flat: norm > C; per layer: a leaf).
    # The logged fraction is the noisy clipped count over the EXPECTED batch size (2); at sigma ~0
    # it is (number of sampled examples) / 2, with every sampled example clipped.
    count = json.loads((tmp_path / name / "metrics.jsonl").read_text().splitlines()[-1])["clipped_fraction"] * 2
    assert round(count) >= 1 and abs(count - round(count)) < 0.02  # Noise std 1e-3.
  diffs = [np.abs(np.asarray(a) - np.asarray(b)).max() for a, b in zip(_params(tmp_path / "flat"), _params(tmp_path / "layer"))]
  assert max(diffs) > 0


def test_runs_share_one_compiled_step_and_its_traced_clip_norm_applies(tiny_nifti_dir, tmp_path, monkeypatch):
  """Runs differing in sigma, C, length and seeds reuse one jitted step; C still reaches it."""
  from jaxldm.train import dp

  traces = []
  real = dp.chunk_sums  # The CPU trainers' path (dp.microbatch_loop "accumulate"): the model's gradient.
  monkeypatch.setattr(common, "_JITTED", {})
  monkeypatch.setattr(dp, "chunk_sums", lambda *a, **k: traces.append(1) or real(*a, **k))
  tiny_noise = {"dp.target_epsilon": 1e9, "optim.optimizer": "sgd", "optim.learning_rate": 1.0}  # As the per-layer test: its program.
  runs = {"loose": {"dp.l2_clip_norm": 1e3, "dp.noise_multiplier": 1e-4, "dp.noise_seed": 7, "train.steps": 2},
          "tight": {"dp.l2_clip_norm": 1e-3, "dp.noise_multiplier": 2e-4, "dp.noise_seed": 99, "train.steps": 1}}
  for name, overrides in runs.items():
    info = autoencoder.train_and_evaluate(_config(tiny_nifti_dir, **tiny_noise, **overrides), tmp_path / name)
    assert info["privacy"]["l2_clip_norm"] == overrides["dp.l2_clip_norm"]
  assert len(common._JITTED) == 1 and len(traces) == 1  # One program, traced once.
  clipped = {name: json.loads((tmp_path / name / "metrics.jsonl").read_text().splitlines()[-1])["clipped_fraction"] * 2
             for name in runs}  # Noisy clipped count (noise std ~1e-4 here).
  assert abs(clipped["loose"]) < 0.02  # C = 1000: nothing clipped.
  assert round(clipped["tight"]) >= 1 and abs(clipped["tight"] - round(clipped["tight"])) < 0.02  # C = 0.001: all.


@pytest.mark.parametrize("key, value", [("loss.adversarial_weight", 0.1), ("train.sample_every", 1), ("scale_factor", 0.0)])
def test_dp_refuses_what_would_leak_private_data(tiny_nifti_dir, tmp_path, key, value):
  with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
    autoencoder.train_and_evaluate(_config(tiny_nifti_dir, **{key: value}), tmp_path)
  assert not (tmp_path / "privacy_ledger.json").exists()  # Refused before any step or ledger.


# ---------------------------------------------------------------------------------------------
# What a DP run releases (docs/privacy.md): the canary experiment at the trainer level
# ---------------------------------------------------------------------------------------------
def _neighbour_dir(data_dir, tmp_path):
  """A copy of data_dir whose last volume is replaced by another one (same shape, same name)."""
  import shutil

  import nibabel as nib

  other = tmp_path / "neighbour"
  shutil.copytree(data_dir, other)
  last = sorted(other.glob("*.nii.gz"))[-1]
  img = nib.load(last)
  # Another "patient": white noise, which the autoencoder reconstructs far worse than the smooth volumes.
  replaced = np.random.default_rng(7).normal(size=img.shape).astype(np.float32)
  nib.save(nib.Nifti1Image(replaced, img.affine), last)
  return other


def _logged(workdir):
  return [json.loads(l) for l in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()]


def canary_deltas(run, a_dir, b_dir, tmp_path) -> dict[str, float]:
  """Largest relative difference of every logged field between runs on neighbouring datasets."""
  run(a_dir, tmp_path / "a")
  run(b_dir, tmp_path / "b")
  deltas = {}
  for la, lb in zip(_logged(tmp_path / "a"), _logged(tmp_path / "b")):
    for key in la:
      if key != "step":
        rel = abs(la[key] - lb[key]) / max(abs(la[key]), abs(lb[key]), 1e-30)
        deltas[key] = max(deltas.get(key, 0.0), rel)
  return deltas


# sigma 1e6: the released gradient and statistics are pure noise (the same noise in both runs, fixed
# seed), q = 1 (every example in every batch), a learning rate that leaves the model where it was.
CANARY = {"dp.noise_multiplier": 1e6, "dp.expected_batch_size": 8, "dp.microbatch_size": 4,
          "optim.learning_rate": 1e-12, "train.steps": 2}


def test_logs_of_a_dp_run_carry_no_unnoised_signal(tiny_nifti_dir, tmp_path):
  run = lambda d, w: autoencoder.train_and_evaluate(_config(d, **CANARY), w)
  deltas = canary_deltas(run, tiny_nifti_dir, _neighbour_dir(tiny_nifti_dir, tmp_path), tmp_path)
  assert {"loss", "l1", "kl", "clipped_fraction", "grad_norm", "epsilon"} <= set(deltas)
  assert max(deltas.values()) < 1e-3, deltas


@pytest.mark.parametrize("loop", ["accumulate", "host"])
def test_the_canary_experiment_catches_an_unnoised_log(tiny_nifti_dir, tmp_path, monkeypatch, loop):
  """A deliberately broken trainer that logs the plain mean loss of the private batch is caught,
  on either CPU path (dp.microbatch_loop): the host-accumulated step leaks its un-noised loss sum."""
  from jaxldm.train import dp

  if loop == "host":
    real = dp.private_gradient

    def leaky(loss_fn, params, batch, mask, *args, **kwargs):
      grads, metrics = real(loss_fn, params, batch, mask, *args, **kwargs)
      losses = jax.vmap(lambda ex: loss_fn(params, ex, jax.random.PRNGKey(0))[0])(batch)
      return grads, {**metrics, "plain_loss": (losses * mask).sum() / mask.sum()}
    monkeypatch.setattr(dp, "private_gradient", leaky)
  else:
    real = dp.release_sums

    def leaky(sums, rng, **kwargs):
      grads, metrics = real(sums, rng, **kwargs)
      return grads, {**metrics, "plain_loss": sums[1]["loss"] / kwargs["expected_batch_size"]}
    monkeypatch.setattr(dp, "release_sums", leaky)

  monkeypatch.setattr(common, "_JITTED", {})  # A fresh step cache: the leaky step must be traced (and dropped after).
  run = lambda d, w: autoencoder.train_and_evaluate(_config(d, **CANARY, **{"dp.microbatch_loop": loop}), w)
  deltas = canary_deltas(run, tiny_nifti_dir, _neighbour_dir(tiny_nifti_dir, tmp_path), tmp_path)
  assert deltas["plain_loss"] > 1e-3 and max(v for k, v in deltas.items() if k != "plain_loss") < 1e-3


# ---------------------------------------------------------------------------------------------
# Resumes never under-count; the ledger pins the data and the settings
# ---------------------------------------------------------------------------------------------
def test_resume_without_the_secrets_is_refused(tiny_nifti_dir, tmp_path):
  autoencoder.train_and_evaluate(_config(tiny_nifti_dir, **{"train.steps": 2}), tmp_path)
  (tmp_path / "dp_secrets.json").unlink()
  with pytest.raises(ConfigError, match="dp_secrets.json is missing"):
    autoencoder.train_and_evaluate(_config(tiny_nifti_dir, **{"train.steps": 3}), tmp_path)
  assert json.loads((tmp_path / "privacy_ledger.json").read_text())["steps"] == 2


def test_retaken_steps_draw_fresh_noise_and_are_counted(tiny_nifti_dir, tmp_path):
  import shutil

  autoencoder.train_and_evaluate(_config(tiny_nifti_dir, **{"train.steps": 3}), tmp_path)
  first = _params(tmp_path)
  shutil.rmtree(tmp_path / "checkpoints" / "3")  # The last checkpoint is lost; the ledger counted step 3.
  info = autoencoder.train_and_evaluate(_config(tiny_nifti_dir, **{"train.steps": 3}), tmp_path)
  ledger = json.loads((tmp_path / "privacy_ledger.json").read_text())
  assert ledger["steps"] == 4  # Step 3 ran twice: two releases, both counted.
  expected = accounting.epsilon(noise_multiplier=1.0, sampling_rate=2 / 8, steps=4, delta=1e-3, accountant="rdp")
  assert info["privacy"]["epsilon"] == pytest.approx(expected, rel=1e-9)
  assert json.loads((tmp_path / "dp_secrets.json").read_text())["attempt"] == 1
  retaken = _params(tmp_path)
  assert max(float(np.abs(np.asarray(a) - np.asarray(b)).max()) for a, b in zip(first, retaken)) > 0


def test_resume_on_other_data_is_refused_and_leaves_the_config(tiny_nifti_dir, tmp_path):
  workdir = tmp_path / "run"
  autoencoder.train_and_evaluate(_config(tiny_nifti_dir, **{"train.steps": 1}), workdir)
  recorded = (workdir / "config.json").read_text()
  other = _neighbour_dir(tiny_nifti_dir, tmp_path)
  with pytest.raises(ConfigError, match=r"data\.root"):
    autoencoder.train_and_evaluate(_config(other, **{"train.steps": 2}), workdir)
  with pytest.raises(ConfigError, match=r"dp\.per_layer"):
    autoencoder.train_and_evaluate(_config(tiny_nifti_dir, **{"train.steps": 2, "dp.per_layer": True}), workdir)
  assert (workdir / "config.json").read_text() == recorded  # Refused resumes rewrite nothing.
  info = autoencoder.train_and_evaluate(_config(tiny_nifti_dir, **{"train.steps": 2}), workdir)
  assert info["steps"] == 2 and json.loads((workdir / "privacy_ledger.json").read_text())["steps"] == 2


# ---------------------------------------------------------------------------------------------
# What a persistent XLA cache would hold (last in this file: the scan clears JAX's caches)
# ---------------------------------------------------------------------------------------------
def test_dp_programs_hold_no_private_volumes(tiny_nifti_dir, tmp_path, program_scan):
  """The DP autoencoder's programs, like the DP LDM's (test_ldm_train.py), take the private volumes as
  arguments: no cached program holds their bytes; one that closes over two volumes is caught."""
  from jaxldm.data.defaults import build_dataset

  config = _config(tiny_nifti_dir, **{"train.steps": 1})
  volumes, _, _ = build_dataset(config.data).arrays()  # The private examples as trained on.
  with program_scan.recording() as run_keys:
    autoencoder.train_and_evaluate(config, tmp_path / "run")
  names = {k.split("-")[0] for k in run_keys}
  assert "jit_release_fn" in names and len(run_keys) >= 5, sorted(names)
  assert program_scan.holding(volumes, run_keys) == []
  assert len(program_scan.closure_control(volumes)) == 1
