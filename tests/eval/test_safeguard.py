"""The release safeguard (Shi et al. 2023) against brute-force distances."""

import numpy as np
import pytest

from jaxldm.eval import safeguard as sg


def _brute_rmse(c, t):
  return np.array([[np.sqrt(np.mean((a.astype(np.float64) - b)**2)) for b in t] for a in c])


def test_rmse_distances_match_brute_force(monkeypatch):
  rng = np.random.default_rng(0)
  train = rng.normal(size=(7, 3, 6, 5, 1)).astype(np.float32)
  cand = rng.normal(size=(4, 3, 6, 5, 1)).astype(np.float32)
  expected = _brute_rmse(cand, train)
  np.testing.assert_allclose(sg.distances(cand, train), expected, rtol=1e-10)
  monkeypatch.setattr(sg, "_BLOCK_ELEMENTS", 200)  # Tiles of 1-2 rows.
  np.testing.assert_allclose(sg.distances(cand, train), expected, rtol=1e-10)


def test_rmse_is_accurate_for_near_copies_with_a_large_offset():
  # Intensities around 1000 with differences of 1e-4: the training-mean shift keeps the
  # ||a||^2 + ||b||^2 - 2ab expansion from cancelling away the difference.
  rng = np.random.default_rng(1)
  train = 1000.0 + rng.normal(size=(3, 4, 16, 16))
  delta = 1e-4 * rng.normal(size=(4, 16, 16))
  cand = train[1:2] + delta
  got = sg.distances(cand, train)[0, 1]
  assert got == pytest.approx(np.sqrt(np.mean(delta**2)), rel=1e-4)


def test_embedding_and_euclidean_distances():
  rng = np.random.default_rng(2)
  c, t = rng.normal(size=(5, 9)), rng.normal(size=(6, 9))
  corr = np.array([[np.corrcoef(a, b)[0, 1] for b in t] for a in c])
  np.testing.assert_allclose(sg.distances(c, t, metric="embedding"), 1.0 - corr, atol=1e-12)
  eucl = np.array([[np.linalg.norm(a - b) for b in t] for a in c])
  np.testing.assert_allclose(sg.distances(c, t, metric="euclidean"), eucl, rtol=1e-10)


def _candidate_set(rng, train):
  """Exact copies, near copies, far samples and samples straddling a 0.1 RMSE threshold."""
  shape = train.shape[1:]
  exact = train[[0, 4]]
  near = train[[1, 2, 3]] + 0.01 * rng.normal(size=(3,) + shape)
  far = rng.normal(size=(3,) + shape)
  straddle = train[rng.integers(0, len(train), 12)] + rng.uniform(
      0.05, 0.15, size=(12, 1, 1, 1)) * rng.normal(size=(12,) + shape)
  return np.concatenate([exact, near, far, straddle])


@pytest.mark.parametrize("metric", ["rmse", "euclidean"])
def test_no_released_sample_within_threshold(metric):
  rng = np.random.default_rng(3)
  train = rng.normal(size=(10, 4, 8, 8))
  cand = _candidate_set(rng, train)
  brute = _brute_rmse(cand, train)
  if metric == "euclidean":
    brute = brute * np.sqrt(train[0].size)
  threshold = 0.1 * (np.sqrt(train[0].size) if metric == "euclidean" else 1.0)
  res = sg.apply_safeguard(cand, train, threshold, metric=metric)

  # Distances come from |a|^2 + |b|^2 - 2ab (BLAS, whose rounding can vary with threading): an exact
  # copy may sit at ~1e-8 instead of 0, so the comparison has an absolute floor far below the threshold.
  np.testing.assert_allclose(res.min_distances, brute.min(1), rtol=1e-9, atol=1e-6 * threshold / 0.1)
  # Released exactly when every training item is farther than the threshold.
  np.testing.assert_array_equal(res.released_indices, np.flatnonzero(brute.min(1) > threshold))
  assert np.all(brute[res.released_indices] > threshold)
  np.testing.assert_array_equal(np.sort(np.concatenate([res.released_indices,
                                                        res.rejected_indices])), np.arange(20))
  assert {0, 1, 2, 3, 4} <= set(res.rejected_indices.tolist())  # Exact and near copies.
  assert {5, 6, 7} <= set(res.released_indices.tolist())  # Independent samples.
  # The straddling group really straddles, so the test exercises the boundary.
  straddle_min = brute.min(1)[8:]
  assert np.any(straddle_min > threshold) and np.any(straddle_min <= threshold)


def test_embedding_safeguard_rejects_copies():
  rng = np.random.default_rng(4)
  train = rng.normal(size=(30, 64))
  cand = np.concatenate([3.0 * train[[2, 5]] + 1.0, rng.normal(size=(4, 64))])
  res = sg.apply_safeguard(cand, train, threshold=0.5, metric="embedding")
  np.testing.assert_array_equal(res.rejected_indices, [0, 1])
  np.testing.assert_array_equal(res.released_indices, [2, 3, 4, 5])


def test_nan_candidate_is_rejected():
  rng = np.random.default_rng(5)
  train = rng.normal(size=(3, 2, 4, 4))
  cand = rng.normal(size=(2, 2, 4, 4)) + 10.0
  cand[1, 0, 0, 0] = np.nan
  res = sg.apply_safeguard(cand, train, 0.1)
  np.testing.assert_array_equal(res.released_indices, [0])
  np.testing.assert_array_equal(res.rejected_indices, [1])


def test_errors():
  x = np.zeros((2, 3, 4, 4))
  for bad in (0.0, -1.0, np.nan, np.inf):
    with pytest.raises(ValueError, match="threshold"):
      sg.apply_safeguard(x, x, bad)
  with pytest.raises(ValueError, match="unknown metric"):
    sg.apply_safeguard(x, x, 1.0, metric="ssim")
  with pytest.raises(ValueError, match="differ in size"):
    sg.distances(x, np.zeros((2, 3, 4, 5)))
