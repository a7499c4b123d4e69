"""The regressor trainer end to end on tiny phantoms, its per-example loss, and its DP-SGD step."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxldm import fitting
from jaxldm.config import ConfigError, load_config
from jaxldm.data import phantoms
from jaxldm.data.defaults import SIZES
from jaxldm.eval import controllability as ctl
from jaxldm.eval import regressor_fit
from jaxldm.eval.regressor_fit import Fitter, example_loss
from jaxldm.infer.regressor import init_params, load_regressor
from jaxldm.models.regressor import AttributeRegressor, TargetSpec, attributes_from_dict
from jaxldm.privacy.ledger import FIXED_SEED, OS_ENTROPY
from jaxldm.train import regressor

SHAPE, SPACING = SIZES["tiny"]


@pytest.fixture(scope="module")
def phantom_dir(tmp_path_factory):
  out = tmp_path_factory.mktemp("reg") / "private"
  phantoms.write_dataset(out, 12, domain="private", shape=SHAPE, spacing=SPACING, seed=1, labels=False,
                         progress=False)
  return out


def _config(data_dir, **overrides):
  base = {"data.root": str(data_dir), "model.channels": (4, 8), "train.steps": 3, "train.batch_size": 4,
          "train.log_every": 1, "train.checkpoint_every": 2, "train.bootstrap": 20,
          "targets.attributes": ("lv_edv_ml", "lv_esv_ml", "age", "sex", "phase")}
  base.update(overrides)
  return load_config("regressor:tiny", base)


def test_train_writes_run_and_resumes_and_predicts(phantom_dir, tmp_path):
  info = regressor.train_and_evaluate(_config(phantom_dir, **{"train.steps": 2}), tmp_path)
  assert info["steps"] == 2
  info = regressor.train_and_evaluate(_config(phantom_dir), tmp_path)  # resumes from step 2
  assert info["steps"] == 3 and info["n_train"] + info["n_holdout"] == 12 and info["n_holdout"] == 2
  lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [l["step"] for l in lines] == [1, 2, 3]
  assert all(math.isfinite(l["loss"]) for l in lines)
  saved = json.loads((tmp_path / "regressor.json").read_text())
  assert saved["targets"]["categorical"] == ["sex", "phase"] and saved["targets"]["num_classes"] == [2, 2]
  assert set(saved["holdout"]["attributes"]) == {"lv_edv_ml", "lv_esv_ml", "age"}
  assert set(saved["holdout"]["categorical"]) == {"sex", "phase"}
  # A finished run is a predictor, and real-data controllability has the phantom layout.
  predictor = load_regressor(tmp_path)
  vols, attrs = phantoms.generate(5, shape=SHAPE, spacing=SPACING, seed=9)
  vols = 2 * (vols - vols.min()) / (vols.max() - vols.min()) - 1
  values, probs = predictor(vols)
  assert set(values) == {"lv_edv_ml", "lv_esv_ml", "age", "sex", "phase"}
  assert probs["phase"].shape == (5, 2) and np.allclose(probs["phase"].sum(1), 1, atol=1e-5)
  out = ctl.regressor_controllability(tmp_path, vols, attrs, n_boot=10)
  assert out["source"] == "regressor" and set(out["attributes"]) == {"lv_edv_ml", "lv_esv_ml", "age"}
  assert out["attributes"]["lv_edv_ml"]["n"] == 5 and 0 <= out["categorical"]["phase"]["accuracy"] <= 1
  p_es = predictor.phase_probability(vols)
  assert p_es.shape == (5,) and np.all((p_es >= 0) & (p_es <= 1))


def test_only_the_primary_process_writes_the_run_files(phantom_dir, tmp_path, monkeypatch):
  from jaxldm.train import distributed

  monkeypatch.setattr(distributed, "is_primary", lambda: False)  # As process 1 of a multi-host run.
  info = regressor.train_and_evaluate(_config(phantom_dir, **{"train.steps": 1}), tmp_path)
  assert info["steps"] == 1
  # No config.json, parameters.txt, metrics.jsonl or regressor.json; checkpoints: all processes (orbax).
  assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoints", "samples"]


def test_unknown_target_attribute_is_a_config_error(phantom_dir, tmp_path):
  with pytest.raises(ConfigError, match="targets.attributes"):
    regressor.train_and_evaluate(_config(phantom_dir, **{"targets.attributes": ("lv_edv_ml", "heart_rate")}),
                                 tmp_path)
  with pytest.raises(ConfigError, match="targets.categorical"):
    regressor.train_and_evaluate(_config(phantom_dir, **{"targets.categorical": ("lv_edv_ml",)}), tmp_path)


def _tiny_setup():
  spec = TargetSpec(("a", "b", "phase"), ("phase",), (2,), (10.0, 0.0), (2.0, 1.0))
  model = AttributeRegressor(channels=(4,), num_outputs=spec.num_outputs)
  params = init_params(model, (2, 8, 8), 0)
  return spec, model, params


def test_loss_ignores_missing_attributes_and_targetspec_roundtrips():
  spec, model, params = _tiny_setup()
  assert spec.num_outputs == 4
  vol = jnp.asarray(np.random.default_rng(0).normal(size=(2, 8, 8)), jnp.float32)
  values, mask = attributes_from_dict({"a": [12.0], "b": [np.nan], "phase": [1.0]}, spec.names)
  enc = {k: jnp.asarray(v[0]) for k, v in spec.encode(values, mask).items()}
  assert float(enc["cont"][0]) == pytest.approx(1.0)  # (12 - 10) / 2
  loss, _ = example_loss(model, spec, params, {"volume": vol, **enc}, None)
  changed = dict(enc, cont=enc["cont"].at[1].set(1e6))  # the value of a MISSING attribute
  loss2, _ = example_loss(model, spec, params, {"volume": vol, **changed}, None)
  assert float(loss) == float(loss2)
  assert TargetSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
  with pytest.raises(ValueError, match="class indices"):
    TargetSpec.fit(("phase",), np.array([[0.5]]), np.ones((1, 1)), ("phase",))


def test_fitter_learns_and_dp_step_runs():
  spec, model, _ = _tiny_setup()
  rng = np.random.default_rng(0)
  vols = rng.normal(size=(16, 2, 8, 8)).astype(np.float32)
  a = vols.mean(axis=(1, 2, 3)) * 20 + 10  # an attribute readable from the volume
  values, mask = attributes_from_dict({"a": a, "b": rng.normal(size=16), "phase": (a > 10).astype(float)},
                                      spec.names)
  spec = TargetSpec.fit(spec.names, values, mask, ("phase",))
  enc = spec.encode(values, mask)
  optim = load_config("regressor:tiny").optim
  fitter = Fitter(model, spec, optim, steps=3, batch_size=8)
  p0 = fitter.init(vols.shape[1:], 0)
  loss = lambda p: float(jnp.mean(jax.vmap(lambda v, c, cm, l, lm: example_loss(
      model, spec, p, {"volume": v, "cont": c, "cont_mask": cm, "label": l, "label_mask": lm}, None)[0])(
          vols, *[jnp.asarray(enc[k]) for k in ("cont", "cont_mask", "label", "label_mask")])))
  fitted = fitter.fit(vols, enc, 0, progress=False)
  assert loss(fitted) < loss(p0)
  again = fitter.fit(vols, enc, 0, progress=False)
  for x, y in zip(jax.tree_util.tree_leaves(fitted), jax.tree_util.tree_leaves(again)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))  # deterministic for a seed
  dp = dict(sampling_rate=0.5, noise_multiplier=1.0, l2_clip_norm=1.0, microbatch_size=4, progress=False)
  private = fitter.fit_private(vols, enc, 0, **dp)
  assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree_util.tree_leaves(private))
  assert any(not np.array_equal(np.asarray(x), np.asarray(y))
             for x, y in zip(jax.tree_util.tree_leaves(private), jax.tree_util.tree_leaves(p0)))

  # Secret seeds: the same public seed twice gives different noise and batches, flagged os-entropy;
  # a fixed noise seed reproduces exactly and is flagged NOT SECURE.
  flat = lambda p: np.concatenate([np.ravel(np.asarray(x)) for x in jax.tree_util.tree_leaves(p)])
  assert fitter.last_private_fit["noise_seed"] == OS_ENTROPY
  assert not np.array_equal(flat(private), flat(fitter.fit_private(vols, enc, 0, **dp)))
  assert fitter.last_private_fit["noise_seed"] == OS_ENTROPY
  fixed = flat(fitter.fit_private(vols, enc, 0, noise_seed=5, **dp))
  assert fitter.last_private_fit["noise_seed"] == FIXED_SEED
  np.testing.assert_array_equal(fixed, flat(fitter.fit_private(vols, enc, 0, noise_seed=5, **dp)))
  assert not np.array_equal(fixed, flat(fitter.fit_private(vols, enc, 0, noise_seed=6, **dp)))

  # Sigma and C are traced arguments of one compiled step, and each reaches it (same seeds).
  step_fn = regressor_fit._jitted_private_step(model, spec, fitting.make_optimizer(optim, 3, private=True), 4,
                                               1.0)  # The one fit_private ran.
  for change in ({"noise_multiplier": 3.0}, {"l2_clip_norm": 1e-3}):
    assert not np.array_equal(fixed, flat(fitter.fit_private(vols, enc, 0, noise_seed=5, **{**dp, **change})))
  assert step_fn._cache_size() == 1
  # Another Fitter of the same model, targets and settings (a second seed or dataset of an evaluation)
  # runs the same jitted steps: nothing is traced again.
  other = Fitter(model, spec, optim, steps=3, batch_size=8)
  assert other._step is fitter._step
  other.fit_private(vols, enc, 1, **dp)
  assert step_fn._cache_size() == 1
  for bad in ({"noise_multiplier": -1.0}, {"l2_clip_norm": 0.0}):
    with pytest.raises(ValueError, match=next(iter(bad))):
      fitter.fit_private(vols, enc, 0, **{**dp, **bad})
