"""Downstream utility studies end to end on tiny phantoms ("real" = private, "synthetic" = public)."""

import math

import jax
import numpy as np
import pytest
from scipy import stats

from jaxldm.data import phantoms
from jaxldm.data.defaults import SIZES
from jaxldm.eval import utility as ut
from jaxldm.privacy.ledger import FIXED_SEED, OS_ENTROPY

SHAPE, SPACING = SIZES["tiny"]
SMALL = {"channels": (4, 8), "num_res_blocks": 1, "kernel": (1, 3, 3), "stride": (1, 2, 2), "dtype": "float32"}


def _normalise(v):
  """Per-volume percentile scaling to [-1, 1], as the data preprocessing does."""
  lo, hi = np.percentile(v, [0.5, 99.5], axis=(1, 2, 3), keepdims=True)
  return np.clip(2 * (v - lo) / (hi - lo) - 1, -1, 1).astype(np.float32)


@pytest.fixture(scope="module")
def data():
  real, real_attrs = phantoms.generate(14, shape=SHAPE, spacing=SPACING, seed=0)
  syn, syn_attrs = phantoms.generate(8, domain="public", shape=SHAPE, spacing=SPACING, seed=0)
  split = lambda d, s: {k: v[s] for k, v in d.items()}
  return {"syn": (_normalise(syn), syn_attrs),
          "train": (_normalise(real[:8]), split(real_attrs, slice(0, 8))),
          "test": (_normalise(real[8:]), split(real_attrs, slice(8, None)))}


def _finite_summary(s):
  assert set(s) == {"mean", "std", "ci", "n", "n_nan", "values"}
  assert math.isfinite(s["mean"]) and all(math.isfinite(c) for c in s["ci"])
  assert s["ci"][0] <= s["mean"] <= s["ci"][1]


def test_train_on_synthetic_test_on_real_runs_end_to_end(data):
  (sv, sa), (rv, ra), (tv, ta) = data["syn"], data["train"], data["test"]
  out = ut.train_on_synthetic_test_on_real(sv, sa, tv, ta, real_volumes=rv, real_attributes=ra,
                                           attributes=("lv_volume_ml", "myo_thickness_mm", "phase"),
                                           categorical=("phase",), model=SMALL, steps=2, batch_size=4,
                                           seeds=(0, 1), progress=False)
  assert (out["n_synthetic"], out["n_real"], out["n_test"]) == (8, 8, 6)
  for src in ("train_on_synthetic", "train_on_real"):
    assert set(out[src]) == {"lv_volume_ml", "myo_thickness_mm", "phase"}
    for name in ("lv_volume_ml", "myo_thickness_mm"):
      assert set(out[src][name]) == {"pearson_r", "mae"}
      _finite_summary(out[src][name]["mae"])
      assert len(out[src][name]["pearson_r"]["values"]) == 2
    _finite_summary(out[src]["phase"]["accuracy"])
    assert set(out[src]["phase"]) == {"accuracy", "auroc"}


def test_dp_pretraining_utility_runs_end_to_end(data):
  (sv, sa), (rv, ra), (tv, ta) = data["syn"], data["train"], data["test"]
  assert 0 < ta["phase"].sum() < len(ta["phase"])  # both classes in the test set: AUROC defined
  out = ut.dp_pretraining_utility(sv, sa["phase"], rv, ra["phase"], tv, ta["phase"], epsilon=10.0, steps=3,
                                  sampling_rate=0.5, pretrain_steps=2, batch_size=4, microbatch_size=4,
                                  model=SMALL, seeds=(0, 1), progress=False)
  assert 0 < out["noise_multiplier"] and out["epsilon"] <= 10.0
  assert out["noise_seed"] == OS_ENTROPY  # The default: secret sampling and noise seeds.
  assert out["epsilon"] < out["epsilon_all_runs"] and out["data_owner_only"] == ["n_train", "n_test"]
  for arm in ("dp_only", "pretrained_dp", "pretrained_only"):
    assert set(out[arm]) == {"auroc", "accuracy"}
    for s in out[arm].values():
      _finite_summary(s)
      assert all(0 <= v <= 1 for v in s["values"])
  assert len(out["auroc_gain"]["values"]) == 2
  with pytest.raises(ValueError, match="0 or 1"):
    ut.dp_pretraining_utility(sv, sa["lv_edv_ml"], rv, ra["phase"], tv, ta["phase"], epsilon=1.0, steps=1,
                              pretrain_steps=1, model=SMALL, seeds=(0,), progress=False)


def test_dp_pretraining_noise_is_secret_unless_fixed(data, monkeypatch):
  """Same public seeds: default runs get fresh OS-entropy noise (results differ, flagged os-entropy);
  a fixed noise seed reproduces every DP run exactly and is flagged NOT SECURE."""
  (sv, sa), (rv, ra), (tv, ta) = data["syn"], data["train"], data["test"]
  fitted, original = [], ut.Fitter.fit_private

  def spy(self, *args, **kwargs):  # Records every DP run's final parameters and seed provenance.
    params = original(self, *args, **kwargs)
    fitted.append((np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(params)]),
                   self.last_private_fit["noise_seed"]))
    return params

  monkeypatch.setattr(ut.Fitter, "fit_private", spy)
  run = lambda **kw: ut.dp_pretraining_utility(sv, sa["phase"], rv, ra["phase"], tv, ta["phase"], epsilon=10.0,
                                               steps=2, sampling_rate=0.5, pretrain_steps=1, batch_size=4,
                                               model=SMALL, seeds=(0,), progress=False, **kw)
  first, second = run(), run()
  assert first["noise_seed"] == second["noise_seed"] == OS_ENTROPY
  (a_dp, a_flag), (a_pre, _), (b_dp, _), (b_pre, _) = fitted
  assert a_flag == OS_ENTROPY
  assert not np.array_equal(a_dp, b_dp) and not np.array_equal(a_pre, b_pre)  # Fresh noise per call.
  assert not np.array_equal(a_dp, a_pre)
  fitted.clear()
  fixed, again = run(noise_seed=7), run(noise_seed=7)
  assert fixed["noise_seed"] == again["noise_seed"] == FIXED_SEED and "NOT SECURE" in FIXED_SEED
  assert fixed == again
  (c_dp, c_flag), (c_pre, _), (d_dp, _), (d_pre, _) = fitted
  assert c_flag == FIXED_SEED
  np.testing.assert_array_equal(c_dp, d_dp)
  np.testing.assert_array_equal(c_pre, d_pre)
  other = run(noise_seed=8)
  assert other["noise_seed"] == FIXED_SEED and not np.array_equal(fitted[-2][0], c_dp)


def test_denoiser_improves_psnr_over_the_noisy_input(data):
  (sv, _), (rv, _), (tv, _) = data["syn"], data["train"], data["test"]
  out = ut.denoising_utility(sv, rv, tv[:4], noise_std=0.2, steps=25, batch_size=4, features=8, layers=3,
                             seeds=(0, 1), progress=False)
  noisy = out["noisy_input"]["psnr"]
  assert noisy == pytest.approx(10 * np.log10(4 / 0.04), abs=0.5)  # 20 dB at sigma 0.2, range 2
  for src in ("train_on_synthetic", "train_on_real"):
    _finite_summary(out[src]["psnr"])
    _finite_summary(out[src]["ssim"])
    # A real effect: both denoisers beat the noisy input by > 1 dB (measured ~2.5 dB at 40 steps).
    assert out[src]["psnr"]["mean"] > noisy + 1.0, out[src]
    assert out[src]["ssim"]["mean"] > out["noisy_input"]["ssim"]
  for m in ("psnr", "ssim"):
    w = out["wilcoxon"][m]
    assert w["n"] == 4 and 0 <= w["p_value"] <= 1


def test_a_repeated_denoising_utility_builds_no_program(data, programs_built):
  """Its optimizer, training step and apply are kept per settings: a second evaluation (another run of
  an ablation, another seed set) traces and compiles nothing."""
  (sv, _), (rv, _), (tv, _) = data["syn"], data["train"], data["test"]
  run = lambda: ut.denoising_utility(sv, rv, tv[:2], noise_std=0.2, steps=1, batch_size=4, features=8, layers=3,
                                     seeds=(0,), progress=False)
  run()
  with programs_built() as built:
    run()
  assert built == []


def test_metrics_and_seed_summary():
  rng = np.random.default_rng(0)
  x = rng.uniform(-1, 1, size=(2, 3, 16, 16))
  assert np.allclose(ut.ssim(x, x, 2.0), 1.0)
  assert ut.ssim(x, x + 0.3 * rng.normal(size=x.shape), 2.0).max() < 0.9
  np.testing.assert_allclose(ut.psnr(x, x + 0.1, 2.0), 10 * np.log10(4 / 0.01))
  s = ut.seed_summary([1.0, 2.0, 4.0, float("nan")])
  lo, hi = stats.t.interval(0.95, 2, loc=7 / 3, scale=stats.sem([1.0, 2.0, 4.0]))
  assert s["n"] == 3 and s["n_nan"] == 1 and s["mean"] == pytest.approx(7 / 3)
  np.testing.assert_allclose(s["ci"], [lo, hi])
  assert all(math.isnan(c) for c in ut.seed_summary([1.0])["ci"])
  assert ut.seed_summary([0.9, 0.99], bounds=(-1.0, 1.0))["ci"][1] == 1.0  # t(1 dof) = 12.7 overshoots
  labels, thr = ut.binarize([1.0, 5.0, 3.0])
  assert thr == 3.0 and labels.tolist() == [0.0, 1.0, 0.0]
