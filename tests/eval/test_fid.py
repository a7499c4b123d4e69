"""FID/KID/precision-recall/MS-SSIM against closed forms, scipy and brute-force loops."""

import os

import numpy as np
import pytest
import scipy.linalg

from jaxldm.eval import fid


def _random_spd(rng, d, rank=None):
  a = rng.normal(size=(d, rank or d))
  return a @ a.T / d + (0.0 if rank else 0.1 * np.eye(d))


# --------------------------------------------------------------------------------------------------
# Frechet distance.
# --------------------------------------------------------------------------------------------------


def test_frechet_1d_closed_form():
  # 1D: W2^2 between N(m1, s1^2) and N(m2, s2^2) is (m1 - m2)^2 + (s1 - s2)^2.
  m1, s1, m2, s2 = 1.3, 2.0, -0.2, 0.5
  got = fid.frechet_distance([m1], [[s1**2]], [m2], [[s2**2]])
  assert got == pytest.approx((m1 - m2)**2 + (s1 - s2)**2, rel=1e-12)


def test_frechet_diagonal_closed_form():
  rng = np.random.default_rng(0)
  d = 7
  m1, m2 = rng.normal(size=d), rng.normal(size=d)
  v1, v2 = rng.uniform(0.1, 3.0, size=d), rng.uniform(0.1, 3.0, size=d)
  expected = np.sum((m1 - m2)**2) + np.sum((np.sqrt(v1) - np.sqrt(v2))**2)
  got = fid.frechet_distance(m1, np.diag(v1), m2, np.diag(v2))
  assert got == pytest.approx(expected, rel=1e-10)


def test_frechet_identical_is_zero():
  rng = np.random.default_rng(1)
  s = _random_spd(rng, 30)
  mu = rng.normal(size=30)
  assert abs(fid.frechet_distance(mu, s, mu, s)) < 1e-9 * np.trace(s)


def test_frechet_matches_scipy_sqrtm_reference():
  rng = np.random.default_rng(2)
  for d in (3, 16, 40):
    s1, s2 = _random_spd(rng, d), _random_spd(rng, d)
    m1, m2 = rng.normal(size=d), rng.normal(size=d)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    expected = np.sum((m1 - m2)**2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)
    assert fid.frechet_distance(m1, s1, m2, s2) == pytest.approx(expected, rel=1e-9)


def test_frechet_singular_covariances():
  # Fewer samples than dimensions: rank-deficient covariances, where sqrtm(S1 S2) is fragile.
  # Reference: Tr((S1 S2)^{1/2}) as the sum of square roots of the (real, >= 0) eigenvalues of
  # the non-symmetric product S1 S2.
  rng = np.random.default_rng(3)
  d = 30
  s1, s2 = _random_spd(rng, d, rank=8), _random_spd(rng, d, rank=10)
  m1, m2 = rng.normal(size=d), rng.normal(size=d)
  eig = np.clip(np.linalg.eigvals(s1 @ s2).real, 0, None)
  expected = np.sum((m1 - m2)**2) + np.trace(s1) + np.trace(s2) - 2 * np.sum(np.sqrt(eig))
  got = fid.frechet_distance(m1, s1, m2, s2)
  assert np.isfinite(got) and got >= 0
  assert got == pytest.approx(expected, rel=1e-7)


def test_fid_on_features_matches_statistics_and_is_symmetric():
  rng = np.random.default_rng(4)
  a = rng.normal(size=(50, 6))
  b = rng.normal(loc=0.3, scale=1.5, size=(40, 6))
  mu_a, sigma_a = fid.feature_statistics(a)
  np.testing.assert_allclose(mu_a, a.mean(0), rtol=1e-13)
  np.testing.assert_allclose(sigma_a, np.cov(a.T), rtol=1e-13)
  expected = fid.frechet_distance(a.mean(0), np.cov(a.T), b.mean(0), np.cov(b.T))
  assert fid.fid(a, b) == pytest.approx(expected, rel=1e-12)
  assert fid.fid(a, b) == pytest.approx(fid.fid(b, a), rel=1e-9)


def test_fid_recovers_gaussian_distance_with_many_samples():
  rng = np.random.default_rng(5)
  a = rng.normal(size=(20000, 3)) * [1.0, 2.0, 0.5]
  b = rng.normal(size=(20000, 3)) * [1.5, 2.0, 0.5] + [1.0, 0.0, 0.0]
  expected = 1.0 + (1.5 - 1.0)**2
  assert fid.fid(a, b) == pytest.approx(expected, abs=0.05)


def test_fid_errors():
  rng = np.random.default_rng(6)
  with pytest.raises(ValueError, match="at least 2"):
    fid.fid(rng.normal(size=(1, 4)), rng.normal(size=(5, 4)))
  with pytest.raises(ValueError, match="feature dimensions"):
    fid.fid(rng.normal(size=(5, 4)), rng.normal(size=(5, 3)))
  with pytest.raises(ValueError, match="2D"):
    fid.feature_statistics(rng.normal(size=(5,)))
  with pytest.raises(ValueError, match="shapes"):
    fid.frechet_distance(np.zeros(3), np.eye(3), np.zeros(2), np.eye(2))


# --------------------------------------------------------------------------------------------------
# KID.
# --------------------------------------------------------------------------------------------------


def _brute_mmd2(x, y, degree=3):
  d = x.shape[1]
  k = lambda a, b: (float(np.dot(a, b)) / d + 1.0)**degree
  m, n = len(x), len(y)
  sxx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
  syy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
  sxy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
  return sxx + syy - 2 * sxy


def test_kid_subset_matches_brute_force():
  rng = np.random.default_rng(7)
  x = rng.normal(size=(12, 5))
  y = rng.normal(loc=0.4, size=(15, 5))
  assert fid.polynomial_mmd2_unbiased(x, y) == pytest.approx(_brute_mmd2(x, y), rel=1e-10)
  assert fid.polynomial_mmd2_unbiased(x, y, degree=2) == pytest.approx(_brute_mmd2(x, y, 2),
                                                                       rel=1e-10)
  # One subset of the capped size min(12, 15) = 12 uses all of x (MMD is permutation invariant)
  # and 12 of y's rows; with equal set sizes it is the full-set value.
  mean, std = fid.kid(x, y[:12], num_subsets=1, subset_size=1000)
  assert mean == pytest.approx(_brute_mmd2(x, y[:12]), rel=1e-10)
  assert std == 0.0


def test_kid_is_unbiased_and_detects_shift():
  rng = np.random.default_rng(8)
  # Unbiasedness: the average over many independent small-sample estimates is ~0 when both sets
  # come from the same distribution; the biased V-statistic (diagonals kept) is clearly positive.
  reps, m, d = 400, 8, 4
  u, v = np.empty(reps), np.empty(reps)
  for r in range(reps):
    x, y = rng.normal(size=(m, d)), rng.normal(size=(m, d))
    u[r] = fid.polynomial_mmd2_unbiased(x, y)
    k = lambda a, b: (a @ b.T / d + 1.0)**3
    v[r] = k(x, x).mean() + k(y, y).mean() - 2 * k(x, y).mean()
  se = u.std() / np.sqrt(reps)
  assert abs(u.mean()) < 4 * se
  assert v.mean() > 10 * v.std() / np.sqrt(reps)

  a, b = rng.normal(size=(300, 8)), rng.normal(size=(300, 8))
  mean, std = fid.kid(a, b, num_subsets=30, subset_size=100)
  assert abs(mean) < 3 * std
  mean_s, std_s = fid.kid(a, b + 0.5, num_subsets=30, subset_size=100)
  assert mean_s > 5 * std_s and mean_s > 10 * abs(mean)


def test_kid_deterministic_in_seed():
  rng = np.random.default_rng(9)
  a, b = rng.normal(size=(40, 3)), rng.normal(size=(50, 3))
  assert fid.kid(a, b, num_subsets=5, subset_size=10, seed=3) == fid.kid(
      a, b, num_subsets=5, subset_size=10, seed=3)
  assert fid.kid(a, b, num_subsets=5, subset_size=10, seed=3) != fid.kid(
      a, b, num_subsets=5, subset_size=10, seed=4)


# --------------------------------------------------------------------------------------------------
# Precision and recall.
# --------------------------------------------------------------------------------------------------


def _brute_precision_recall(real, fake, k):
  def radii(x):
    return np.array([sorted(np.linalg.norm(x - p, axis=1))[k] for p in x])

  def coverage(queries, support, r):
    return np.mean([any(np.linalg.norm(q - s) <= rs for s, rs in zip(support, r)) for q in queries])

  return coverage(fake, real, radii(real)), coverage(real, fake, radii(fake))


def test_precision_recall_identical_and_disjoint():
  rng = np.random.default_rng(10)
  x = rng.normal(size=(60, 4))
  assert fid.precision_recall(x, x.copy(), k=3) == (1.0, 1.0)
  assert fid.precision_recall(x, x + 100.0, k=3) == (0.0, 0.0)


def test_precision_recall_half_the_modes():
  rng = np.random.default_rng(11)
  mode_a = rng.normal(size=(300, 2)) + [20.0, 0.0]
  mode_b = rng.normal(size=(300, 2)) - [20.0, 0.0]
  real = np.concatenate([mode_a, mode_b])
  fake = rng.normal(size=(300, 2)) + [20.0, 0.0]  # Only mode A: faithful but not diverse.
  precision, recall = fid.precision_recall(real, fake, k=3)
  assert precision > 0.95
  assert recall == pytest.approx(0.5, abs=0.03)


def test_precision_recall_matches_brute_force_and_blocking(monkeypatch):
  rng = np.random.default_rng(12)
  real = rng.normal(size=(25, 3))
  fake = rng.normal(loc=0.5, scale=1.3, size=(20, 3))
  expected = _brute_precision_recall(real, fake, k=2)
  assert fid.precision_recall(real, fake, k=2) == pytest.approx(expected, abs=1e-12)
  monkeypatch.setattr(fid, "_BLOCK_ELEMENTS", 7)  # Forces many small row blocks.
  assert fid.precision_recall(real, fake, k=2) == pytest.approx(expected, abs=1e-12)


def test_precision_recall_k_range():
  x = np.random.default_rng(13).normal(size=(5, 2))
  with pytest.raises(ValueError, match="k must be"):
    fid.precision_recall(x, x, k=5)


# --------------------------------------------------------------------------------------------------
# MS-SSIM.
# --------------------------------------------------------------------------------------------------


def _brute_ssim_terms(x, y, win, c1, c2):
  t = np.arange(win) - (win - 1) / 2
  g = np.exp(-t**2 / (2 * 1.5**2))
  w = np.outer(g, g) / np.outer(g, g).sum()
  ssims, css = [], []
  for i in range(x.shape[0] - win + 1):
    for j in range(x.shape[1] - win + 1):
      px, py = x[i:i + win, j:j + win], y[i:i + win, j:j + win]
      mx, my = np.sum(w * px), np.sum(w * py)
      vx, vy = np.sum(w * (px - mx)**2), np.sum(w * (py - my)**2)
      cxy = np.sum(w * (px - mx) * (py - my))
      cs = (2 * cxy + c2) / (vx + vy + c2)
      css.append(cs)
      ssims.append((2 * mx * my + c1) / (mx**2 + my**2 + c1) * cs)
  return np.mean(ssims), np.mean(css)


def test_ms_ssim_matches_brute_force():
  rng = np.random.default_rng(14)
  c1, c2 = 0.01**2, 0.03**2
  # 11x11: one scale, one window position.
  x = rng.uniform(size=(11, 11))
  y = 0.7 * x + 0.3 * rng.uniform(size=(11, 11))
  assert fid.ms_ssim(x, y, data_range=1.0) == pytest.approx(
      _brute_ssim_terms(x, y, 11, c1, c2)[0], rel=1e-10)
  # 23x23: two scales (23 -> 11 after 2x2 pooling with the odd row/column dropped).
  x = rng.uniform(size=(23, 23))
  y = 0.8 * x + 0.2 * rng.uniform(size=(23, 23))
  _, cs1 = _brute_ssim_terms(x, y, 11, c1, c2)
  pool = lambda a: a[:22, :22].reshape(11, 2, 11, 2).mean(axis=(1, 3))
  ssim2, _ = _brute_ssim_terms(pool(x), pool(y), 11, c1, c2)
  w = np.array([0.0448, 0.2856]) / (0.0448 + 0.2856)
  assert fid.ms_ssim(x, y, data_range=1.0) == pytest.approx(cs1**w[0] * ssim2**w[1], rel=1e-10)
  # 9x9: window shrinks to 9.
  x, y = rng.uniform(size=(9, 9)), rng.uniform(size=(9, 9))
  expected = max(_brute_ssim_terms(x, y, 9, c1, c2)[0], 0.0)
  assert fid.ms_ssim(x, y, data_range=1.0) == pytest.approx(expected, rel=1e-10)


def test_ms_ssim_scales_adapt_to_size():
  assert fid.ms_ssim_scales(256, 256) == (5, 11)
  assert fid.ms_ssim_scales(96, 96) == (4, 11)  # 96 -> 48 -> 24 -> 12.
  assert fid.ms_ssim_scales(96, 20) == (1, 11)
  assert fid.ms_ssim_scales(8, 8) == (1, 7)
  with pytest.raises(ValueError, match="3x3"):
    fid.ms_ssim_scales(2, 10)


def test_ms_ssim_identity_noise_and_ordering():
  rng = np.random.default_rng(15)
  x = rng.uniform(size=(3, 48, 48))
  np.testing.assert_allclose(fid.ms_ssim(x, x, data_range=1.0), 1.0, rtol=1e-12)
  small = fid.ms_ssim(x, x + 0.02 * rng.normal(size=x.shape), data_range=1.0).mean()
  large = fid.ms_ssim(x, x + 0.3 * rng.normal(size=x.shape), data_range=1.0).mean()
  independent = fid.ms_ssim(x, rng.uniform(size=x.shape), data_range=1.0).mean()
  assert 1.0 > small > large > independent
  assert independent < 0.1


def test_ms_ssim_diversity():
  rng = np.random.default_rng(16)
  base = rng.uniform(size=(1, 4, 32, 32))
  assert fid.ms_ssim_diversity(np.repeat(base, 5, axis=0)) == pytest.approx(1.0, rel=1e-12)
  noise = rng.uniform(size=(6, 4, 32, 32, 1))
  assert fid.ms_ssim_diversity(noise, data_range=1.0) < 0.1
  # pairs >= N(N-1)/2: every unordered pair exactly once.
  v = noise[..., 0]
  expected = np.mean([fid.ms_ssim(v[i], v[j], data_range=1.0).mean()
                      for i in range(6) for j in range(i + 1, 6)])
  got = fid.ms_ssim_diversity(noise, pairs=15, data_range=1.0)
  assert got == pytest.approx(expected, rel=1e-12)
  # A collapsed set (small perturbations of one volume) scores as less diverse.
  collapsed = base + 0.05 * rng.normal(size=(6, 4, 32, 32))
  assert fid.ms_ssim_diversity(collapsed, pairs=10, data_range=1.0) > 0.9
  with pytest.raises(ValueError, match="constant"):
    fid.ms_ssim_diversity(np.zeros((3, 2, 16, 16)))
  with pytest.raises(ValueError, match="N, D, H, W"):
    fid.ms_ssim_diversity(np.zeros((3, 16, 16)))


# --------------------------------------------------------------------------------------------------
# Reference-statistics cache.
# --------------------------------------------------------------------------------------------------


def test_reference_stats_roundtrip_and_staleness(tmp_path):
  rng = np.random.default_rng(17)
  feats = rng.normal(size=(30, 5))
  path = tmp_path / "ref" / "stats.npz"
  saved = fid.save_reference_stats(path, feats, extractor="medicalnet3d", extractor_version="1.2")
  mu, sigma, n = fid.load_reference_stats(path, extractor="medicalnet3d", extractor_version="1.2")
  np.testing.assert_array_equal(mu, feats.mean(0))
  np.testing.assert_allclose(sigma, np.cov(feats.T), rtol=1e-13)
  assert n == 30 and saved.n == 30
  assert os.listdir(path.parent) == ["stats.npz"]  # No temporary file left behind.
  with pytest.raises(ValueError, match="stale"):
    fid.load_reference_stats(path, extractor="inception", extractor_version="1.2")
  with pytest.raises(ValueError, match="stale"):
    fid.load_reference_stats(path, extractor="medicalnet3d", extractor_version="1.3")
  with pytest.raises(FileNotFoundError):
    fid.load_reference_stats(tmp_path / "missing.npz", extractor="a", extractor_version="1")
  (tmp_path / "junk.npz").write_bytes(b"not a zip")
  with pytest.raises(ValueError, match="not a valid"):
    fid.load_reference_stats(tmp_path / "junk.npz", extractor="a", extractor_version="1")


def test_reference_stats_write_is_atomic(tmp_path, monkeypatch):
  rng = np.random.default_rng(18)
  path = tmp_path / "stats.npz"
  fid.save_reference_stats(path, rng.normal(size=(10, 3)), extractor="e", extractor_version="1")
  before = path.read_bytes()

  def crash(*args, **kwargs):
    raise KeyboardInterrupt("killed mid-write")

  monkeypatch.setattr(fid.np, "savez", crash)
  with pytest.raises(KeyboardInterrupt):
    fid.save_reference_stats(path, rng.normal(size=(10, 3)), extractor="e", extractor_version="2")
  assert path.read_bytes() == before  # The old cache survives intact...
  assert os.listdir(tmp_path) == ["stats.npz"]  # ...and no temporary file is left.
  monkeypatch.undo()
  fid.load_reference_stats(path, extractor="e", extractor_version="1")
