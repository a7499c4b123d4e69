"""Controllability: do generated volumes show the attributes they were conditioned on?

Daum et al. 2024 segment generated volumes and correlate the measured LV/RV volumes and wall
thickness with the conditioning values, and run an ES/ED classifier on them. Two measurement
instruments play the segmentation network here:

  * phantom benchmark (exact): `jaxldm.data.phantoms.measure`, a classical segmentation that needs
    no training and recovers LV/RV volume, wall thickness and LV position with r > 0.99 on real
    phantoms. `controllability(volumes, spacing, conditioned)`.
  * real data: an attribute regressor/classifier trained on the real training set
    (trained by `jaxldm.train.regressor`, loaded by `jaxldm.infer.regressor`); its predictions on
    generated volumes are compared with the conditioning. `regressor_controllability(predictor, volumes, conditioned)`.

Pairing measured with conditioned values. `measure` reports what is visible in ONE volume: the
LV/RV cavity volume and wall thickness AT THE RENDERED PHASE. The conditioning set of the LDM
(`data.defaults.PHANTOM_CONDITIONING`) names the per-subject ED and ES values plus the phase, so a
measured `lv_volume_ml` is compared with the conditioned `lv_esv_ml` where phase = 1 (ES) and with
`lv_edv_ml` where phase = 0 (ED); likewise rv_volume_ml (rv_edv_ml / rv_esv_ml) and
myo_thickness_mm (myo_thickness_ed_mm / myo_thickness_es_mm). Where the per-volume attribute itself
was conditioned (`lv_volume_ml`, ..., `center_y_mm`), it is used directly. EF, age, sex and BMI are
not visible to `measure` and are not scored on phantoms.

ES/ED accuracy. Without a classifier, the phase is read off the measured LV volume: a volume is
called ES when it is closer to the conditioned ESV than to the conditioned EDV, i.e. below their
midpoint. Justification: EDV and ESV of one subject differ by EF * EDV (EF >= 0.15 in both phantom
domains), so the midpoint sits >= 7.5% of EDV away from either value, while `measure`'s LV volume
error on phantoms is ~1-2%; on real phantoms the rule is therefore (nearly) always right, and a
generator that ignores the phase condition scores ~50%. A `phase_classifier` (volumes -> P(ES)),
e.g. the regressor's phase head, can be passed instead.

Statistics. Per attribute: Pearson r, MAE, the number of pairs used, and how many were excluded
because the measurement failed (NaN) or the condition was missing (NaN); percentile bootstrap
confidence intervals (resampling volumes with replacement, a fixed seed) for r, MAE and accuracy.

Outputs are plain nested dicts of numbers (and a few descriptive strings), ready for report.json.
Nothing here is per-example, so a DP run's report may carry them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from rich.progress import track
from scipy.stats import rankdata

from jaxldm.data import phantoms
from jaxldm.infer import regressor as regressor_lib

# measured key -> (conditioned key at ED, conditioned key at ES); used when the per-volume
# attribute itself was not conditioned.
PHASE_PAIRS: dict[str, tuple[str, str]] = {
    "lv_volume_ml": ("lv_edv_ml", "lv_esv_ml"),
    "rv_volume_ml": ("rv_edv_ml", "rv_esv_ml"),
    "myo_thickness_mm": ("myo_thickness_ed_mm", "myo_thickness_es_mm"),
}

# Bootstrap resamples are computed in blocks of at most this many (resample, example) entries.
_BLOCK_ELEMENTS = 1 << 22


# ---------------------------------------------------------------------------------------------
# statistics
# ---------------------------------------------------------------------------------------------
def _pearson_rows(x: np.ndarray, y: np.ndarray) -> np.ndarray:
  """Pearson r along the last axis; NaN where either side is constant."""
  xc = x - x.mean(axis=-1, keepdims=True)
  yc = y - y.mean(axis=-1, keepdims=True)
  den = np.sqrt((xc * xc).sum(axis=-1) * (yc * yc).sum(axis=-1))
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(den > 0, (xc * yc).sum(axis=-1) / np.where(den > 0, den, 1.0), np.nan)


def pearson_r(x, y) -> float:
  """Pearson correlation of two 1-D arrays (NaN for fewer than 3 pairs or a constant side)."""
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  if x.shape != y.shape or x.ndim != 1:
    raise ValueError(f"pearson_r needs two 1-D arrays of one length, got {x.shape} and {y.shape}")
  return float(_pearson_rows(x, y)) if len(x) >= 3 else math.nan


def bootstrap_ci(statistic: Callable[[np.ndarray], np.ndarray], n: int, *, n_boot: int = 1000,
                 confidence: float = 0.95, seed: int = 0) -> list[float]:
  """Percentile bootstrap interval of a statistic of n paired examples.

  Args:
    statistic: maps a (B, n) array of resampled indices to B values (vectorised over resamples).
    n: number of examples.
    n_boot: resamples (0 gives [nan, nan]).
    confidence: two-sided coverage, e.g. 0.95.
    seed: numpy seed: the same call gives the same interval.

  Returns:
    [low, high]; NaN resamples (e.g. a constant resample for r) are ignored.
  """
  if not 0 < confidence < 1:
    raise ValueError(f"confidence must be in (0, 1), got {confidence}")
  if n_boot <= 0 or n < 2:
    return [math.nan, math.nan]
  rng = np.random.default_rng(seed)
  rows = max(1, _BLOCK_ELEMENTS // n)
  values = []
  for start in range(0, n_boot, rows):
    idx = rng.integers(0, n, size=(min(rows, n_boot - start), n))
    values.append(np.asarray(statistic(idx), np.float64))
  values = np.concatenate(values)
  values = values[np.isfinite(values)]
  if not values.size:
    return [math.nan, math.nan]
  alpha = 100.0 * (1.0 - confidence) / 2.0
  lo, hi = np.percentile(values, [alpha, 100.0 - alpha])
  return [float(lo), float(hi)]


def continuous_agreement(predicted, target, *, n_boot: int = 1000, confidence: float = 0.95,
                         seed: int = 0) -> dict[str, Any]:
  """Pearson r and MAE between predicted/measured and target values, with bootstrap CIs.

  Pairs where either side is NaN are excluded and counted (`n_nan_predicted` for a failed
  measurement, `n_missing_target` for a missing condition; a pair missing both counts as missing).
  """
  p = np.asarray(predicted, np.float64).ravel()
  t = np.asarray(target, np.float64).ravel()
  if p.shape != t.shape:
    raise ValueError(f"predicted and target differ in length ({p.size} vs {t.size})")
  missing = ~np.isfinite(t)
  failed = ~np.isfinite(p) & ~missing
  ok = ~missing & ~failed
  p, t = p[ok], t[ok]
  n = int(ok.sum())
  out: dict[str, Any] = {"n": n, "n_nan_predicted": int(failed.sum()),
                         "n_missing_target": int(missing.sum())}
  out["pearson_r"] = pearson_r(p, t) if n else math.nan
  out["pearson_r_ci"] = (bootstrap_ci(lambda i: _pearson_rows(p[i], t[i]), n, n_boot=n_boot,
                                      confidence=confidence, seed=seed) if n >= 3 else [math.nan] * 2)
  err = np.abs(p - t)
  out["mae"] = float(err.mean()) if n else math.nan
  out["mae_ci"] = bootstrap_ci(lambda i: err[i].mean(axis=-1), n, n_boot=n_boot,
                               confidence=confidence, seed=seed + 1)
  out["mean_predicted"] = float(p.mean()) if n else math.nan
  out["mean_target"] = float(t.mean()) if n else math.nan
  return out


def auroc(scores, labels) -> float:
  """Area under the ROC curve, rank-based (Mann-Whitney U / (n_pos n_neg); ties count 1/2).

  NaN when one class is absent (the AUROC is undefined then).
  """
  s = np.asarray(scores, np.float64).ravel()
  y = np.asarray(labels).ravel().astype(bool)
  if s.shape != y.shape:
    raise ValueError(f"scores and labels differ in length ({s.size} vs {y.size})")
  if not np.all(np.isfinite(s)):
    raise ValueError("auroc: scores contain NaN or inf")
  n_pos, n_neg = int(y.sum()), int((~y).sum())
  if n_pos == 0 or n_neg == 0:
    return math.nan
  ranks = rankdata(s)  # average ranks: ties get 1/2 credit
  u = ranks[y].sum() - n_pos * (n_pos + 1) / 2.0
  return float(u / (n_pos * n_neg))


def categorical_agreement(predicted, target, *, scores=None, n_boot: int = 1000,
                          confidence: float = 0.95, seed: int = 0) -> dict[str, Any]:
  """Accuracy of predicted class indices against target ones, with a bootstrap CI.

  `scores` (N,), the predicted probability of class 1, adds the AUROC for binary targets.
  NaN predictions (no decision possible) and NaN targets (missing) are excluded and counted.
  """
  p = np.asarray(predicted, np.float64).ravel()
  t = np.asarray(target, np.float64).ravel()
  if p.shape != t.shape:
    raise ValueError(f"predicted and target differ in length ({p.size} vs {t.size})")
  missing = ~np.isfinite(t)
  failed = ~np.isfinite(p) & ~missing
  ok = ~missing & ~failed
  correct = (np.rint(p[ok]) == np.rint(t[ok])).astype(np.float64)
  n = int(ok.sum())
  out: dict[str, Any] = {"n": n, "n_nan_predicted": int(failed.sum()),
                         "n_missing_target": int(missing.sum())}
  out["accuracy"] = float(correct.mean()) if n else math.nan
  out["accuracy_ci"] = bootstrap_ci(lambda i: correct[i].mean(axis=-1), n, n_boot=n_boot,
                                    confidence=confidence, seed=seed)
  if scores is not None:
    s = np.asarray(scores, np.float64).ravel()[ok]
    labels = np.rint(t[ok])
    if n and set(np.unique(labels)) <= {0.0, 1.0} and np.all(np.isfinite(s)):
      out["auroc"] = auroc(s, labels)
  return out


# ---------------------------------------------------------------------------------------------
# phantom benchmark: measure() vs the conditioning
# ---------------------------------------------------------------------------------------------
def measure_volumes(volumes, spacing: Sequence[float], *, progress: bool = False) -> dict[str, np.ndarray]:
  """`phantoms.measure` on each (D, H, W) volume: {MEASURED key: (N,) float64, NaN = failed}."""
  volumes = np.asarray(volumes)
  if volumes.ndim != 4:
    raise ValueError(f"volumes must be (N, D, H, W), got shape {volumes.shape}")
  out = {k: np.full(len(volumes), np.nan) for k in phantoms.MEASURED}
  items = range(len(volumes))
  if progress:
    items = track(items, description="measuring volumes", transient=True)
  for i in items:
    for k, v in phantoms.measure(volumes[i], spacing).items():
      out[k][i] = v
  return out


def _column(conditioned: Mapping[str, Any], key: str, n: int) -> np.ndarray | None:
  if key not in conditioned:
    return None
  col = np.asarray(conditioned[key], np.float64).ravel()
  if col.shape != (n,):
    raise ValueError(f"conditioned[{key!r}] has {col.size} values for {n} volumes")
  return col


def paired_targets(conditioned: Mapping[str, Any], n: int) -> dict[str, tuple[np.ndarray, str]]:
  """For each MEASURED key, the conditioned value it should equal and where it came from.

  Returns:
    {measured key: (target (N,) with NaN where unknown, description)}; measured keys without any
    usable condition are left out.
  """
  phase = _column(conditioned, "phase", n)
  out = {}
  for key in phantoms.MEASURED:
    direct = _column(conditioned, key, n)
    if direct is not None:
      out[key] = (direct, key)
      continue
    if key not in PHASE_PAIRS or phase is None:
      continue
    ed_key, es_key = PHASE_PAIRS[key]
    ed, es = _column(conditioned, ed_key, n), _column(conditioned, es_key, n)
    if ed is None or es is None:
      continue
    with np.errstate(invalid="ignore"):
      target = np.where(phase == 1, es, np.where(phase == 0, ed, np.nan))
    out[key] = (target, f"{ed_key} if phase == 0 else {es_key}")
  return out


def phase_from_lv_volume(lv_volume, edv, esv) -> np.ndarray:
  """1 (ES) where the measured LV volume is below the EDV/ESV midpoint, else 0; NaN if unknown."""
  lv = np.asarray(lv_volume, np.float64)
  edv, esv = np.asarray(edv, np.float64), np.asarray(esv, np.float64)
  with np.errstate(invalid="ignore"):
    pred = (lv < 0.5 * (edv + esv)).astype(np.float64)
  pred[~(np.isfinite(lv) & np.isfinite(edv) & np.isfinite(esv))] = np.nan
  return pred


def controllability(volumes, spacing: Sequence[float], conditioned: Mapping[str, Any], *,
                    phase_classifier: Callable[[np.ndarray], np.ndarray] | None = None,
                    measured: Mapping[str, np.ndarray] | None = None, n_boot: int = 1000,
                    confidence: float = 0.95, seed: int = 0, progress: bool = False) -> dict[str, Any]:
  """Phantom-benchmark controllability: `phantoms.measure` on volumes vs their conditioning.

  Args:
    volumes: (N, D, H, W) generated volumes (any intensity scale: `measure` is invariant to a
      positive affine change).
    spacing: (dz, dy, dx) in mm of the volumes.
    conditioned: {attribute: (N,)} values the volumes were generated for, natural units, NaN =
      not conditioned (e.g. the CSV `jaxldm sample` writes).
    phase_classifier: optional volumes (N, D, H, W) -> P(ES) (N,); default: the LV-volume rule
      (see the module docstring).
    measured: precomputed `measure_volumes(volumes, spacing)` (skips measuring again).
    n_boot, confidence, seed: bootstrap settings (deterministic for a seed).
    progress: progress bar while measuring.

  Returns:
    {"n": N, "source": "phantoms.measure", "attributes": {measured key: continuous_agreement
    dict + "conditioned_on"}, "categorical": {"phase": categorical_agreement dict} (when the phase
    was conditioned and can be decided), "phase_method": "classifier" | "lv_volume_rule"}.
  """
  volumes = np.asarray(volumes)
  n = len(volumes)
  if measured is None:
    measured = measure_volumes(volumes, spacing, progress=progress)
  result: dict[str, Any] = {"n": n, "source": "phantoms.measure", "attributes": {}, "categorical": {}}
  for i, (key, (target, described)) in enumerate(paired_targets(conditioned, n).items()):
    stats = continuous_agreement(measured[key], target, n_boot=n_boot, confidence=confidence,
                                 seed=seed + 7919 * i)
    result["attributes"][key] = {"conditioned_on": described, **stats}
  phase = _column(conditioned, "phase", n)
  if phase is not None:
    scores = None
    if phase_classifier is not None:
      scores = np.asarray(phase_classifier(volumes), np.float64).ravel()
      predicted = np.where(np.isfinite(scores), (scores >= 0.5).astype(np.float64), np.nan)
      result["phase_method"] = "classifier"
    else:
      edv, esv = _column(conditioned, "lv_edv_ml", n), _column(conditioned, "lv_esv_ml", n)
      predicted = None
      if edv is not None and esv is not None:
        predicted = phase_from_lv_volume(measured["lv_volume_ml"], edv, esv)
        result["phase_method"] = "lv_volume_rule"
    if predicted is not None:
      result["categorical"]["phase"] = categorical_agreement(
          predicted, phase, scores=scores, n_boot=n_boot, confidence=confidence, seed=seed + 104729)
  return result


# ---------------------------------------------------------------------------------------------
# real data: an attribute regressor/classifier vs the conditioning
# ---------------------------------------------------------------------------------------------
def compare_predictions(predicted: Mapping[str, np.ndarray], conditioned: Mapping[str, Any], *,
                        categorical: Sequence[str] = (),
                        scores: Mapping[str, np.ndarray] | None = None, n_boot: int = 1000,
                        confidence: float = 0.95, seed: int = 0, source: str = "regressor") -> dict[str, Any]:
  """Per-attribute agreement of predictions with conditioning, in `controllability`'s layout.

  Args:
    predicted: {attribute: (N,)} predictions in natural units (class index for categorical ones).
    conditioned: {attribute: (N,)} conditioning values, NaN = missing. Only attributes present in
      both are scored.
    categorical: attribute names scored by accuracy (and AUROC where binary with `scores`).
    scores: {attribute: (N,)} predicted P(class 1) for binary categorical attributes.
    n_boot, confidence, seed: bootstrap settings.
    source: what produced the predictions (kept in the output).
  """
  scores = scores or {}
  n = len(next(iter(predicted.values()))) if predicted else 0
  result: dict[str, Any] = {"n": n, "source": source, "attributes": {}, "categorical": {}}
  for i, key in enumerate(k for k in predicted if k in conditioned):
    target = _column(conditioned, key, n)
    if key in categorical:
      result["categorical"][key] = categorical_agreement(
          predicted[key], target, scores=scores.get(key), n_boot=n_boot, confidence=confidence,
          seed=seed + 7919 * i)
    else:
      stats = continuous_agreement(predicted[key], target, n_boot=n_boot, confidence=confidence,
                                   seed=seed + 7919 * i)
      result["attributes"][key] = {"conditioned_on": key, **stats}
  return result


def regressor_controllability(predictor, volumes, conditioned: Mapping[str, Any], *,
                              n_boot: int = 1000, confidence: float = 0.95, seed: int = 0) -> dict[str, Any]:
  """Real-data controllability: a trained regressor's predictions on volumes vs their conditioning.

  Args:
    predictor: a `jaxldm.infer.regressor.Predictor` (e.g. `load_regressor(workdir)`) or a run
      directory of `jaxldm train --config regressor`.
    volumes: (N, D, H, W) generated volumes, preprocessed like the regressor's training data.
    conditioned: {attribute: (N,)} natural units, NaN = not conditioned.

  Returns:
    the layout of `controllability` with source "regressor".
  """
  if not isinstance(predictor, regressor_lib.Predictor):
    predictor = regressor_lib.load_regressor(predictor)
  values, probs = predictor(np.asarray(volumes, np.float32))
  scores = {k: p[:, 1] for k, p in probs.items() if p.shape[1] == 2}
  return compare_predictions(values, conditioned, categorical=predictor.targets.categorical,
                             scores=scores, n_boot=n_boot, confidence=confidence, seed=seed)
