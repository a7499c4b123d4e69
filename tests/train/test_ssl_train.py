"""The contrastive 3D encoder: augmentations, NT-Xent, the trainer end to end, what training buys."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxldm import cli
from jaxldm import fitting
from jaxldm.config import ConfigError, load_config
from jaxldm.data.defaults import build_dataset
from jaxldm.eval.memorization import pearson_matrix
from jaxldm.infer.ssl import build_model, params_version
from jaxldm.models import layers
from jaxldm.models.ssl_encoder import SSLEncoder
from jaxldm.train import common, ssl

SHAPE = (4, 16, 16)


def _overrides(data_dir, **extra):
  base = {"data.root": str(data_dir), "data.shape": SHAPE, "data.spacing": (20.0, 4.0, 4.0),
          "train.batch_size": 8, "train.log_every": 1, "train.checkpoint_every": 2, "train.steps": 3}
  base.update(extra)
  return base


def _config(data_dir, **extra):
  return load_config("ssl:tiny", _overrides(data_dir, **extra))


def test_augment_is_keyed_and_its_ranges_are_respected():
  vol = jnp.asarray(np.random.default_rng(0).normal(size=SHAPE).astype(np.float32))
  still = ssl.Augment(rotation_deg=0, scale=0, shift=0, flip_axes=(), gamma=0, contrast=0, brightness=0,
                      noise_std=0)
  np.testing.assert_allclose(ssl.augment(vol, jax.random.PRNGKey(0), still), vol, atol=1e-5)
  default = ssl.Augment()
  a = ssl.augment(vol, jax.random.PRNGKey(1), default)
  np.testing.assert_array_equal(a, ssl.augment(vol, jax.random.PRNGKey(1), default))
  assert not np.allclose(a, ssl.augment(vol, jax.random.PRNGKey(2), default))
  assert a.shape == SHAPE and np.all(np.isfinite(a))
  # A flip-only augmentation is an exact flip (or none) of the in-plane axes, never of the slices.
  flips = still._replace(flip_axes=(2,))
  outs = [np.asarray(ssl.augment(vol, jax.random.PRNGKey(k), flips)) for k in range(8)]
  for out in outs:
    assert np.allclose(out, vol, atol=1e-5) or np.allclose(out, np.flip(vol, 2), atol=1e-5)
  assert any(np.allclose(out, np.flip(vol, 2), atol=1e-5) for out in outs)
  with pytest.raises(ConfigError, match="augment.flip_axes"):
    ssl.Augment.from_config(dict(default._asdict(), flip_axes=(3,)))


def test_retrieval_accuracy_keys_each_copy_by_seed_and_builds_nothing_the_second_time(tiny_nifti_dir, programs_built):
  config = _config(tiny_nifti_dir)
  volumes = build_dataset(config.data).arrays()[0]
  aug = ssl.Augment.from_config(config.augment)
  want = jax.vmap(lambda v, i: ssl.augment(v, jax.random.fold_in(jax.random.PRNGKey(5), i), aug))(
      jnp.asarray(volumes), jnp.arange(len(volumes)))
  np.testing.assert_allclose(ssl._jitted_copies(aug)(jnp.asarray(volumes), jax.random.PRNGKey(5)), want, atol=1e-6)
  model = build_model(config.model)
  params = layers.init_params(model, jax.random.PRNGKey(0), jnp.zeros((1, *SHAPE, 1)))
  first = ssl.retrieval_accuracy(model, params, volumes, config, seed=5)
  with programs_built() as built:
    again = ssl.retrieval_accuracy(model, params, volumes, config, seed=5)
  assert again == first and 0.0 <= first <= 1.0
  assert ssl.retrieval_accuracy(model, params, volumes, config, seed=2**40 + 5) >= 0.0  # A 64-bit seed.
  assert built == [], built  # The copies' program (and the embedding's) are kept per settings.


def test_nt_xent_prefers_aligned_pairs():
  z = jax.random.normal(jax.random.PRNGKey(0), (6, 8))
  aligned, acc = ssl.nt_xent(z, z, 0.1)
  shuffled, _ = ssl.nt_xent(z, z[::-1], 0.1)
  assert float(acc) == 1.0
  assert float(aligned) < float(shuffled)
  assert float(aligned) >= 0.0


def test_cli_trains_checkpoints_and_versions_the_encoder(tiny_nifti_dir, tmp_path):
  overrides = [f"--config.{k}={','.join(map(str, v)) if isinstance(v, tuple) else v}"
               for k, v in _overrides(tiny_nifti_dir).items()]
  workdir = tmp_path / "ssl"
  assert cli.main(["train", "--config", "ssl:tiny", "--workdir", str(workdir),
                   *overrides]) == 0
  lines = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [l["step"] for l in lines] == [1, 2, 3]
  assert all(np.isfinite(l["loss"]) for l in lines)
  info = json.loads((workdir / "encoder.json").read_text())
  assert info["steps"] == 3 and info["data_shape"] == list(SHAPE) and info["embedding_dim"] == 16
  # The version names exactly the weights in the last checkpoint.
  ckpt = common.Checkpointer(workdir / "checkpoints")
  assert ckpt.latest_step() == 3
  saved_ema, _ = ckpt.restore_tree("ema_params")
  ckpt.close()
  model = build_model(info["model"])
  target = layers.init_params(model, jax.random.PRNGKey(0), jnp.zeros((1, *SHAPE, 1)))
  ema = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(target), jax.tree_util.tree_leaves(saved_ema))
  assert info["version"] == f"ssl3d-{params_version(ema)}"
  assert info["version"] != f"ssl3d-{params_version(target)}"


def test_only_the_primary_process_writes_the_run_files(tiny_nifti_dir, tmp_path, monkeypatch):
  from jaxldm.train import distributed

  monkeypatch.setattr(distributed, "is_primary", lambda: False)  # As process 1 of a multi-host run.
  info = ssl.train_and_evaluate(_config(tiny_nifti_dir, **{"train.steps": 1}), tmp_path)
  assert info["steps"] == 1
  # No config.json, parameters.txt, metrics.jsonl or encoder.json; checkpoints: all processes (orbax).
  assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoints", "samples"]


def test_training_separates_augmented_copies_from_other_volumes(tiny_nifti_dir):
  """30 steps on a fixed set of 8 volumes: the loss falls, and in embedding space (Pearson) each
  volume's augmented copy is closer to it than the other volumes are, on average, by more than at
  initialisation. Measured: loss 2.71 -> ~1.0; positive r 0.93 vs mean negative r 0.72 (init
  0.82 vs 0.66)."""
  config = _config(tiny_nifti_dir, **{"train.steps": 30})
  volumes = build_dataset(config.data).arrays()[0]
  assert volumes.shape == (8, *SHAPE)
  model = build_model(config.model)
  params = layers.init_params(model, jax.random.PRNGKey(0), jnp.zeros((1, *SHAPE, 1)))
  tx = fitting.make_optimizer(config.optim, 30)
  state = fitting.TrainState(step=jnp.array(0, jnp.int32), params=params, opt_state=tx.init(params),
                            ema_params=params)
  step = jax.jit(ssl.make_train_step(model, tx, config))
  losses = []
  for s in range(30):
    state, metrics = step(state, jnp.asarray(volumes), fitting.step_key(0, s))
    losses.append(float(metrics["loss"]))
  assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5]), losses

  aug = ssl.Augment.from_config(config.augment)
  keys = jax.random.split(jax.random.PRNGKey(123), len(volumes))
  copies = jax.vmap(lambda v, k: ssl.augment(v, k, aug))(jnp.asarray(volumes), keys)
  embed = jax.jit(lambda p, x: model.apply(p, x[..., None], method=SSLEncoder.embed))

  def margins(p):
    r = pearson_matrix(np.asarray(embed(p, copies)), np.asarray(embed(p, jnp.asarray(volumes))))
    off = ~np.eye(len(r), dtype=bool)
    negatives = np.where(off, r, 0).sum(1) / off.sum(1)
    return np.diag(r) - negatives

  before, after = margins(params), margins(state.params)
  assert np.all(after > 0), after
  assert after.mean() > before.mean() and after.mean() > 0.1, (before, after)


def test_runs_of_the_same_settings_share_one_jitted_step(tiny_nifti_dir, tmp_path):
  """Seeds and data are arguments, not part of the step: runs of the same settings get one jitted step
  (each run jitted its own before, and traced the encoder's step again)."""
  settings = {"train.steps": 1, "augment.shift": 0.07}  # A setting no other test uses.
  first = ssl.jitted_step(_config(tiny_nifti_dir, **settings))
  assert ssl.jitted_step(_config(tiny_nifti_dir, **settings, seed=5)) is first
  assert ssl.jitted_step(_config(tiny_nifti_dir, **{**settings, "augment.shift": 0.06})) is not first
  assert first._cache_size() == 0
  ssl.train_and_evaluate(_config(tiny_nifti_dir, **settings, seed=5), tmp_path)
  assert first._cache_size() == 1  # The run trained with the shared step.
