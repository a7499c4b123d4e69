"""Controllability on real phantoms (the perfect-generator upper bound) and on shuffled conditions."""

import math

import numpy as np
import pytest
from scipy import stats

from jaxldm.data import phantoms
from jaxldm.data.defaults import SIZES
from jaxldm.eval import controllability as ctl

SHAPE, SPACING = SIZES["tiny"]


@pytest.fixture(scope="module")
def real_phantoms():
  volumes, attrs = phantoms.generate(40, shape=SHAPE, spacing=SPACING, seed=3)
  measured = ctl.measure_volumes(volumes, SPACING)
  return volumes, attrs, measured


def _conditioning(attrs):
  """What an LDM is conditioned on: per-subject ED/ES values and the phase, not lv_volume_ml."""
  from jaxldm.data.defaults import PHANTOM_CONDITIONING
  return {k: attrs[k] for k in PHANTOM_CONDITIONING}


def test_real_phantoms_against_their_own_attributes_are_near_perfect(real_phantoms):
  volumes, attrs, measured = real_phantoms
  out = ctl.controllability(volumes, SPACING, _conditioning(attrs), measured=measured, n_boot=200)
  assert out["n"] == 40
  lv = out["attributes"]["lv_volume_ml"]
  # Paired through the phase: ES volumes against the conditioned ESV, ED against the EDV.
  assert lv["conditioned_on"] == "lv_edv_ml if phase == 0 else lv_esv_ml"
  for key in ("lv_volume_ml", "rv_volume_ml", "myo_thickness_mm"):
    a = out["attributes"][key]
    assert a["pearson_r"] >= 0.95, (key, a)
    assert a["pearson_r_ci"][0] <= a["pearson_r"] <= a["pearson_r_ci"][1]
    assert a["n"] + a["n_nan_predicted"] + a["n_missing_target"] == 40
  assert lv["mae"] < 0.08 * lv["mean_target"]  # measure is ~5% low at the tiny 3.6 mm resolution
  # Position was not conditioned: not scored.
  assert "center_y_mm" not in out["attributes"]
  assert out["phase_method"] == "lv_volume_rule"
  assert out["categorical"]["phase"]["accuracy"] >= 0.95


def test_shuffled_conditions_give_r_near_zero(real_phantoms):
  volumes, attrs, measured = real_phantoms
  perm = np.random.default_rng(0).permutation(40)
  shuffled = {k: v[perm] for k, v in _conditioning(attrs).items()}
  out = ctl.controllability(volumes, SPACING, shuffled, measured=measured, n_boot=500)
  lv = out["attributes"]["lv_volume_ml"]
  # Real hearts against someone else's conditioning: the CI covers 0 and the error is large.
  assert lv["pearson_r_ci"][0] < 0 < lv["pearson_r_ci"][1]
  assert abs(lv["pearson_r"]) < 0.35
  assert lv["mae"] > 0.2 * lv["mean_target"]  # the unshuffled MAE is < 8% of the mean
  assert out["categorical"]["phase"]["accuracy"] < 0.8


def test_nan_measurements_and_missing_conditions_are_excluded_and_counted(real_phantoms):
  volumes, attrs, measured = real_phantoms
  cond = {k: v.copy() for k, v in _conditioning(attrs).items()}
  cond["phase"][:3] = np.nan                       # unknown phase: no target for 3 volumes
  meas = {k: v.copy() for k, v in measured.items()}
  meas["lv_volume_ml"][10:12] = np.nan             # 2 failed measurements
  out = ctl.controllability(volumes, SPACING, cond, measured=meas, n_boot=50)
  lv = out["attributes"]["lv_volume_ml"]
  assert (lv["n"], lv["n_nan_predicted"], lv["n_missing_target"]) == (35, 2, 3)
  assert math.isfinite(lv["pearson_r"]) and lv["pearson_r"] > 0.95
  ph = out["categorical"]["phase"]
  assert (ph["n"], ph["n_nan_predicted"], ph["n_missing_target"]) == (35, 2, 3)


def test_a_flat_volume_is_a_counted_failure_not_a_crash():
  vols = np.zeros((3,) + SHAPE, np.float32)
  measured = ctl.measure_volumes(vols, SPACING)
  assert all(np.isnan(v).all() for v in measured.values())
  cond = {"lv_volume_ml": np.array([100.0, 120.0, 140.0])}
  out = ctl.controllability(vols, SPACING, cond, measured=measured, n_boot=10)
  a = out["attributes"]["lv_volume_ml"]
  assert a["n"] == 0 and a["n_nan_predicted"] == 3 and math.isnan(a["pearson_r"])


def test_statistics_match_scipy_and_are_deterministic():
  rng = np.random.default_rng(1)
  x = rng.normal(size=50)
  y = 0.7 * x + rng.normal(size=50)
  a = ctl.continuous_agreement(x, y, n_boot=300, seed=4)
  assert a["pearson_r"] == pytest.approx(stats.pearsonr(x, y)[0], abs=1e-12)
  assert a["mae"] == pytest.approx(np.abs(x - y).mean())
  assert a == ctl.continuous_agreement(x, y, n_boot=300, seed=4)
  # The bootstrap interval roughly matches the Fisher-z interval.
  z, se = np.arctanh(a["pearson_r"]), 1 / np.sqrt(47)
  fisher = np.tanh([z - 1.96 * se, z + 1.96 * se])
  np.testing.assert_allclose(a["pearson_r_ci"], fisher, atol=0.08)


def test_auroc_rank_based_with_ties():
  assert ctl.auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)
  assert ctl.auroc([0.5, 0.5, 0.5, 0.5], [0, 1, 0, 1]) == pytest.approx(0.5)
  assert ctl.auroc([3, 2, 1], [1, 1, 0]) == 1.0
  assert math.isnan(ctl.auroc([1, 2], [1, 1]))
  rng = np.random.default_rng(0)
  s, y = rng.normal(size=200), rng.integers(0, 2, 200)
  s[:20] = s[20]  # some ties
  pos, neg = s[y == 1], s[y == 0]
  brute = ((pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])).mean()
  assert ctl.auroc(s, y) == pytest.approx(brute, abs=1e-12)


def test_compare_predictions_layout():
  y = np.arange(10, dtype=float)
  pred = {"age": y + 1.0, "sex": np.array([0, 1] * 5, float)}
  cond = {"age": y, "sex": np.array([0, 1] * 4 + [1, 0], float), "bmi": y}
  out = ctl.compare_predictions(pred, cond, categorical=("sex",), scores={"sex": pred["sex"]},
                                n_boot=20)
  assert set(out["attributes"]) == {"age"} and set(out["categorical"]) == {"sex"}
  assert out["attributes"]["age"]["mae"] == pytest.approx(1.0)
  assert out["attributes"]["age"]["pearson_r"] == pytest.approx(1.0)
  assert out["categorical"]["sex"]["accuracy"] == pytest.approx(0.8)
  assert out["categorical"]["sex"]["auroc"] == pytest.approx(0.8)


def test_phase_classifier_replaces_the_volume_rule(real_phantoms):
  volumes, attrs, measured = real_phantoms
  truth = attrs["phase"]
  # An oracle classifier (P(ES) = the true phase) and its inverse: accuracy and AUROC 1 and 0.
  oracle = ctl.controllability(volumes, SPACING, _conditioning(attrs), measured=measured, n_boot=20,
                               phase_classifier=lambda v: truth)
  assert oracle["phase_method"] == "classifier"
  assert oracle["categorical"]["phase"]["accuracy"] == 1.0 and oracle["categorical"]["phase"]["auroc"] == 1.0
  wrong = ctl.controllability(volumes, SPACING, _conditioning(attrs), measured=measured, n_boot=20,
                              phase_classifier=lambda v: 1.0 - truth)
  assert wrong["categorical"]["phase"]["accuracy"] == 0.0 and wrong["categorical"]["phase"]["auroc"] == 0.0
