"""Copy detection (Dar et al. 2023) against brute-force loops and constructed copies."""

import os

import numpy as np
import pytest

from jaxldm.eval import memorization as mem


def _brute_pearson(a, b):
  return np.array([[np.corrcoef(x, y)[0, 1] for y in b] for x in a])


def test_pearson_matrix_matches_corrcoef():
  rng = np.random.default_rng(0)
  a, b = rng.normal(size=(7, 16)), rng.normal(size=(5, 16))
  b[0] = 2 * a[3] + 0.1 * rng.normal(size=16)
  np.testing.assert_allclose(mem.pearson_matrix(a, b), _brute_pearson(a, b), atol=1e-12)
  np.testing.assert_allclose(np.diag(mem.pearson_matrix(a, a)), 1.0, atol=1e-12)


def test_pearson_invariant_to_affine_rescaling_of_rows():
  rng = np.random.default_rng(1)
  a, b = rng.normal(size=(6, 10)), rng.normal(size=(4, 10))
  scale = rng.uniform(0.1, 10.0, size=(6, 1))
  shift = rng.normal(scale=100.0, size=(6, 1))
  r = mem.pearson_matrix(a, b)
  np.testing.assert_allclose(mem.pearson_matrix(scale * a + shift, b), r, atol=1e-12)
  np.testing.assert_allclose(mem.pearson_matrix(-a, b), -r, atol=1e-12)


def test_pearson_rejects_constant_rows_and_mismatched_dims():
  rng = np.random.default_rng(2)
  a = rng.normal(size=(3, 5))
  a[1] = 4.0
  with pytest.raises(ValueError, match=r"rows \[1\] are constant"):
    mem.pearson_matrix(a, rng.normal(size=(2, 5)))
  with pytest.raises(ValueError, match="embedding dimensions"):
    mem.pearson_matrix(rng.normal(size=(2, 5)), rng.normal(size=(2, 6)))


def test_nearest_neighbours_matches_brute_force(monkeypatch):
  rng = np.random.default_rng(3)
  q, r = rng.normal(size=(20, 8)), rng.normal(size=(30, 8))
  brute = _brute_pearson(q, r)
  idx, corr = mem.nearest_neighbours(q, r)
  np.testing.assert_array_equal(idx, brute.argmax(1))
  np.testing.assert_allclose(corr, brute.max(1), atol=1e-12)
  monkeypatch.setattr(mem, "_BLOCK_ELEMENTS", 50)  # Query blocks of one row.
  idx_b, corr_b = mem.nearest_neighbours(q, r)
  np.testing.assert_array_equal(idx_b, idx)
  np.testing.assert_allclose(corr_b, corr, atol=1e-15)


def test_copy_threshold_is_the_percentile_of_nearest_validation_correlations():
  rng = np.random.default_rng(4)
  train, val = rng.normal(size=(40, 12)), rng.normal(size=(25, 12))
  nn_corr = [max(np.corrcoef(t, v)[0, 1] for v in val) for t in train]
  for p in (95.0, 50.0, 100.0):
    assert mem.copy_threshold(train, val, p) == pytest.approx(np.percentile(nn_corr, p), abs=1e-12)
  with pytest.raises(ValueError, match="percentile"):
    mem.copy_threshold(train, val, 101.0)


def _orthogonal_to(rows, n, rng):
  """n random rows whose Pearson correlation with every row of `rows` is exactly 0."""
  d = rows.shape[1]
  centred = rows - rows.mean(1, keepdims=True)
  basis, _ = np.linalg.qr(np.concatenate([centred.T, np.ones((d, 1))], axis=1))
  x = rng.normal(size=(n, d))
  return x - (x @ basis) @ basis.T


def test_copy_rates_exactly_as_constructed():
  rng = np.random.default_rng(5)
  d = 128
  train = rng.normal(size=(40, d))
  val = rng.normal(size=(30, d))
  tau = mem.copy_threshold(train, val)
  assert 0.0 < tau < 0.6  # Distinct random embeddings are weakly correlated by chance.

  copies = np.stack([
      train[3],                                  # exact copy
      train[3],                                  # the same training sample copied twice
      2.5 * train[7] - 1.0,                      # affine rescaling: same correlation 1
      train[11] + 0.05 * rng.normal(size=d),     # near copy
  ])
  independent = _orthogonal_to(train, 6, rng)   # correlation 0 to every training row
  synthetic = np.concatenate([independent[:3], copies, independent[3:]])
  out = mem.copy_rates(synthetic, train, tau)
  assert out["synthetic_copy_rate"] == 4 / 10
  assert out["train_copied_rate"] == 3 / 40  # Samples 3, 7, 11.
  np.testing.assert_array_equal(out["is_copy"], [0, 0, 0, 1, 1, 1, 1, 0, 0, 0])
  np.testing.assert_array_equal(out["nn_indices"][3:7], [3, 3, 7, 11])
  np.testing.assert_allclose(out["nn_correlations"][3:6], 1.0, atol=1e-12)
  np.testing.assert_allclose(out["nn_correlations"][[0, 1, 2, 7, 8, 9]], 0.0, atol=1e-12)


def test_copy_rates_threshold_is_strict():
  rng = np.random.default_rng(6)
  train = rng.normal(size=(5, 8))
  out = mem.copy_rates(train[:2], train, tau=1.0)  # Correlation exactly 1 is not > 1.
  assert out["synthetic_copy_rate"] == 0.0 and out["train_copied_rate"] == 0.0


def test_save_closest_pairs(tmp_path):
  rng = np.random.default_rng(7)
  train = rng.uniform(size=(6, 5, 12, 12, 1))
  synthetic = rng.uniform(size=(4, 5, 12, 12, 1))
  idx, corr = mem.nearest_neighbours(synthetic.reshape(4, -1), train.reshape(6, -1))
  path = tmp_path / "figs" / "closest.png"
  mem.save_closest_pairs(synthetic, train, idx, corr, path, top=3)
  assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert os.listdir(path.parent) == ["closest.png"]  # Written atomically: no temporary left.
  import matplotlib.image
  img = matplotlib.image.imread(path)
  assert img.shape[0] == 600 and img.shape[1] == 400  # 3 rows of 2 inches, 2 columns, 100 dpi.
  with pytest.raises(ValueError, match="one entry per synthetic"):
    mem.save_closest_pairs(synthetic, train, idx[:2], corr, path)
