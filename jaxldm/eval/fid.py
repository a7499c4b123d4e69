"""Sample-quality metrics on features: FID, KID, precision/recall, MS-SSIM diversity.

Everything here takes features (or volumes) as numpy arrays and returns plain numbers, so it is
independent of the feature extractor: the extractor lives elsewhere and only its name and version
reach this module, through the reference-statistics cache (a cache computed with another extractor
is stale and must not be compared against).

Statistics are computed in float64: FID subtracts large, nearly equal traces, and float32 loses
several significant digits there.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import numpy as np

from jaxldm.atomic import atomic_open

# Cache format; bump when the npz layout changes so old files are refused rather than misread.
_CACHE_FORMAT = 1

# Pairwise-distance blocks hold at most this many float64 entries (128 MiB).
_BLOCK_ELEMENTS = 1 << 24


# --------------------------------------------------------------------------------------------------
# Feature validation.
# --------------------------------------------------------------------------------------------------


def _as_features(features, name: str) -> np.ndarray:
  x = np.asarray(features, dtype=np.float64)
  if x.ndim != 2:
    raise ValueError(f"{name} must be a 2D array (num_samples, feature_dim), got shape {x.shape}")
  if x.shape[0] < 2:
    raise ValueError(f"{name} needs at least 2 samples to estimate a covariance, got {x.shape[0]}")
  if not np.all(np.isfinite(x)):
    raise ValueError(f"{name} contains NaN or inf; check the feature extractor's inputs")
  return x


def _check_same_dim(a: np.ndarray, b: np.ndarray, name_a: str, name_b: str) -> None:
  if a.shape[1] != b.shape[1]:
    raise ValueError(f"{name_a} and {name_b} have different feature dimensions "
                     f"({a.shape[1]} vs {b.shape[1]}); were they made by the same extractor?")


# --------------------------------------------------------------------------------------------------
# FID.
# --------------------------------------------------------------------------------------------------


def _psd_sqrt(sigma: np.ndarray) -> np.ndarray:
  """Symmetric square root of a PSD matrix; tiny negative eigenvalues (round-off) become 0."""
  w, v = np.linalg.eigh(sigma)
  return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
  """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2) (the squared 2-Wasserstein).

  d^2 = ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^{1/2})  (Heusel et al. 2017; the standard FID,
  not the L1 variant some papers' code computes).

  The trace of the square root is computed in the symmetric form Tr((S1^{1/2} S2 S1^{1/2})^{1/2}):
  S1 S2 and S1^{1/2} S2 S1^{1/2} are similar matrices, so their eigenvalues agree, but the latter
  is symmetric PSD, so `eigvalsh` gives real eigenvalues directly. The usual
  `scipy.linalg.sqrtm(S1 @ S2)` works on a non-symmetric product and, when the covariances are
  singular (fewer samples than feature dimensions: the common case with 2048-d features), returns
  complex parts or fails, which pytorch-fid papers over with an eps * I offset retry that shifts the
  result. Here round-off negatives are clipped to 0 and no offset is needed.

  Returns:
    The distance as a Python float, >= 0 up to round-off.
  """
  mu1 = np.atleast_1d(np.asarray(mu1, dtype=np.float64))
  mu2 = np.atleast_1d(np.asarray(mu2, dtype=np.float64))
  s1 = np.atleast_2d(np.asarray(sigma1, dtype=np.float64))
  s2 = np.atleast_2d(np.asarray(sigma2, dtype=np.float64))
  d = mu1.shape[0]
  if mu1.shape != (d,) or mu2.shape != (d,) or s1.shape != (d, d) or s2.shape != (d, d):
    raise ValueError(f"inconsistent shapes: mu1 {mu1.shape}, sigma1 {s1.shape}, mu2 {mu2.shape}, "
                     f"sigma2 {s2.shape}; expected (d,) means and (d, d) covariances")
  # Symmetrise: covariances from np.cov are symmetric only up to round-off.
  s1 = 0.5 * (s1 + s1.T)
  s2 = 0.5 * (s2 + s2.T)
  r1 = _psd_sqrt(s1)
  m = r1 @ s2 @ r1
  eig = np.linalg.eigvalsh(0.5 * (m + m.T))
  tr_covmean = np.sum(np.sqrt(np.clip(eig, 0.0, None)))
  diff = mu1 - mu2
  return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)


def feature_statistics(features) -> tuple[np.ndarray, np.ndarray]:
  """(mean, covariance) in float64; the covariance is unbiased (ddof=1), as in pytorch-fid."""
  x = _as_features(features, "features")
  return x.mean(axis=0), np.cov(x, rowvar=False, ddof=1).reshape(x.shape[1], x.shape[1])


def fid(features_a, features_b) -> float:
  """FID between two feature sets (num_samples, feature_dim).

  FID is biased upwards for small sample sizes; compare numbers only at equal sample counts.
  """
  a = _as_features(features_a, "features_a")
  b = _as_features(features_b, "features_b")
  _check_same_dim(a, b, "features_a", "features_b")
  return frechet_distance(*feature_statistics(a), *feature_statistics(b))


# --------------------------------------------------------------------------------------------------
# KID.
# --------------------------------------------------------------------------------------------------


def polynomial_mmd2_unbiased(x, y, *, degree: int = 3) -> float:
  """Unbiased MMD^2 with the kernel k(a, b) = (a.b / d + 1)^degree (Binkowski et al. 2018).

  MMD^2_u = sum_{i!=j} k(x_i,x_j) / (m(m-1)) + sum_{i!=j} k(y_i,y_j) / (n(n-1))
            - 2 sum_{i,j} k(x_i,y_j) / (m n).
  The diagonal terms are left out, which is what makes it unbiased (and lets it go negative).
  """
  x = _as_features(x, "x")
  y = _as_features(y, "y")
  _check_same_dim(x, y, "x", "y")
  d = x.shape[1]
  m, n = x.shape[0], y.shape[0]
  kxx = (x @ x.T / d + 1.0) ** degree
  kyy = (y @ y.T / d + 1.0) ** degree
  kxy = (x @ y.T / d + 1.0) ** degree
  sxx = (kxx.sum() - np.trace(kxx)) / (m * (m - 1))
  syy = (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
  return float(sxx + syy - 2.0 * kxy.mean())


def kid(features_a,
        features_b,
        *,
        num_subsets: int = 100,
        subset_size: int = 1000,
        degree: int = 3,
        seed: int = 0) -> tuple[float, float]:
  """Kernel Inception Distance: (mean, std) of unbiased MMD^2 over random subsets.

  Unlike FID, KID is unbiased, so it is comparable across sample sizes and can be slightly
  negative when the two sets come from the same distribution. Each subset draws `subset_size`
  samples without replacement from each set (independently per subset), with `subset_size` capped
  at min(n_a, n_b).

  Returns:
    (mean, std) over subsets; std is the spread across subsets (ddof=0, as torch-fidelity and
    clean-fid report), not a standard error.
  """
  a = _as_features(features_a, "features_a")
  b = _as_features(features_b, "features_b")
  _check_same_dim(a, b, "features_a", "features_b")
  if num_subsets < 1:
    raise ValueError(f"num_subsets must be >= 1, got {num_subsets}")
  if subset_size < 2:
    raise ValueError(f"subset_size must be >= 2, got {subset_size}")
  m = min(subset_size, a.shape[0], b.shape[0])
  rng = np.random.default_rng(seed)
  values = np.empty(num_subsets)
  for s in range(num_subsets):
    ia = rng.choice(a.shape[0], m, replace=False)
    ib = rng.choice(b.shape[0], m, replace=False)
    values[s] = polynomial_mmd2_unbiased(a[ia], b[ib], degree=degree)
  return float(values.mean()), float(values.std())


# --------------------------------------------------------------------------------------------------
# Improved precision and recall (Kynkaanniemi et al. 2019).
# --------------------------------------------------------------------------------------------------


def _sq_norms(x: np.ndarray) -> np.ndarray:
  return np.einsum("ij,ij->i", x, x)


def _block_rows(n_cols: int) -> int:
  return max(1, _BLOCK_ELEMENTS // max(n_cols, 1))


def _pairwise_sq_dist(a: np.ndarray, b: np.ndarray, a_sq: np.ndarray,
                      b_sq: np.ndarray) -> np.ndarray:
  return np.maximum(a_sq[:, None] + b_sq[None, :] - 2.0 * (a @ b.T), 0.0)


def _knn_radii_sq(x: np.ndarray, k: int) -> np.ndarray:
  """Squared distance from each row of x to its k-th nearest OTHER row of x."""
  x_sq = _sq_norms(x)
  out = np.empty(x.shape[0])
  step = _block_rows(x.shape[0])
  for lo in range(0, x.shape[0], step):
    d = _pairwise_sq_dist(x[lo:lo + step], x, x_sq[lo:lo + step], x_sq)
    # Index 0 after partition is the point itself (distance 0), so index k is the k-th neighbour.
    out[lo:lo + step] = np.partition(d, k, axis=1)[:, k]
  return out


def _fraction_in_manifold(queries: np.ndarray, support: np.ndarray, radii_sq: np.ndarray) -> float:
  """Fraction of queries inside the union of balls B(support_i, radius_i)."""
  q_sq, s_sq = _sq_norms(queries), _sq_norms(support)
  inside = np.zeros(queries.shape[0], dtype=bool)
  step = _block_rows(support.shape[0])
  for lo in range(0, queries.shape[0], step):
    d = _pairwise_sq_dist(queries[lo:lo + step], support, q_sq[lo:lo + step], s_sq)
    inside[lo:lo + step] = np.any(d <= radii_sq[None, :], axis=1)
  return float(inside.mean())


def precision_recall(real, fake, *, k: int = 3) -> tuple[float, float]:
  """Improved precision and recall with k-NN manifolds (Kynkaanniemi et al. 2019).

  Each set's manifold is the union of balls around its samples, each with radius the distance to
  that sample's k-th nearest neighbour in the same set (itself excluded). Precision is the fraction
  of fake samples inside the real manifold (fidelity); recall is the fraction of real samples inside
  the fake manifold (coverage). FID mixes the two; these separate them, which matters for DP models
  that tend to lose diversity (low recall) before they lose fidelity.

  Distances are Euclidean on the features, computed in row blocks so memory stays bounded for
  large sets.
  """
  r = _as_features(real, "real")
  f = _as_features(fake, "fake")
  _check_same_dim(r, f, "real", "fake")
  if k < 1 or k >= min(r.shape[0], f.shape[0]):
    raise ValueError(f"k must be in [1, min(n_real, n_fake) - 1] = [1, "
                     f"{min(r.shape[0], f.shape[0]) - 1}], got {k}")
  precision = _fraction_in_manifold(f, r, _knn_radii_sq(r, k))
  recall = _fraction_in_manifold(r, f, _knn_radii_sq(f, k))
  return precision, recall


# --------------------------------------------------------------------------------------------------
# MS-SSIM diversity.
# --------------------------------------------------------------------------------------------------

# Wang, Simoncelli & Bovik 2003: per-scale exponents for 5 scales, 11x11 Gaussian window, sigma 1.5.
MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
_WIN_SIZE = 11
_WIN_SIGMA = 1.5
_K1, _K2 = 0.01, 0.03


def _gaussian_window(size: int, sigma: float = _WIN_SIGMA) -> np.ndarray:
  t = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
  g = np.exp(-t**2 / (2.0 * sigma**2))
  return g / g.sum()


def _filter_valid(x: np.ndarray, g: np.ndarray) -> np.ndarray:
  """Separable 'valid' correlation of the last two axes with the 1D window g (no padding)."""
  k = g.size
  x = np.lib.stride_tricks.sliding_window_view(x, k, axis=-1) @ g
  return np.lib.stride_tricks.sliding_window_view(x, k, axis=-2) @ g


def _ssim_terms(x: np.ndarray, y: np.ndarray, g: np.ndarray, c1: float,
                c2: float) -> tuple[np.ndarray, np.ndarray]:
  """(ssim, cs) per image, averaged over window positions; x, y are (..., H, W)."""
  mx, my = _filter_valid(x, g), _filter_valid(y, g)
  vx = _filter_valid(x * x, g) - mx * mx
  vy = _filter_valid(y * y, g) - my * my
  cxy = _filter_valid(x * y, g) - mx * my
  cs = (2.0 * cxy + c2) / (vx + vy + c2)
  lum = (2.0 * mx * my + c1) / (mx * mx + my * my + c1)
  return (lum * cs).mean(axis=(-2, -1)), cs.mean(axis=(-2, -1))


def _downsample(x: np.ndarray) -> np.ndarray:
  """2x2 average pooling; an odd trailing row/column is dropped."""
  h, w = x.shape[-2] // 2 * 2, x.shape[-1] // 2 * 2
  x = x[..., :h, :w]
  return 0.25 * (x[..., 0::2, 0::2] + x[..., 1::2, 0::2] + x[..., 0::2, 1::2] + x[..., 1::2, 1::2])


def ms_ssim_scales(height: int, width: int) -> tuple[int, int]:
  """(num_scales, window_size) used for images of this in-plane size.

  The standard MS-SSIM uses 5 scales with an 11x11 window, which needs images of at least 176
  pixels a side; cardiac short-axis slices are 96x96 and test images smaller still. So the number
  of scales is the largest L <= 5 for which the coarsest scale (each 2x2-average-pooled, odd sizes
  floored) is still at least 11 pixels a side; 96x96 gives 4 scales. The exponents are the first L
  standard weights renormalised to sum to 1, which keeps MS-SSIM a weighted geometric mean in
  [0, 1] with identical images at exactly 1. Images smaller than 11 pixels get one scale and a
  window shrunk to the largest odd size that fits (sigma stays 1.5).
  """
  side = min(height, width)
  if side < 3:
    raise ValueError(f"MS-SSIM needs images of at least 3x3 pixels in-plane, got {height}x{width}")
  if side < _WIN_SIZE:
    return 1, side if side % 2 else side - 1
  scales = 1
  while scales < len(MS_SSIM_WEIGHTS) and side // 2**scales >= _WIN_SIZE:
    scales += 1
  return scales, _WIN_SIZE


def ms_ssim(x, y, *, data_range: float) -> np.ndarray:
  """Multi-scale SSIM (Wang et al. 2003) between images x and y of shape (..., H, W).

  Returns one value per leading index (e.g. per slice). Contrast-structure terms and the final SSIM
  are clamped at 0 before the fractional powers (as pytorch-msssim does), because negative
  correlations would give NaN; anti-correlated images therefore score 0, like unrelated ones.
  Scales adapt to the image size as described in `ms_ssim_scales`. Unrelated images do not score
  exactly 0: pooling shrinks their variance at coarse scales until the stabiliser C2 dominates the
  contrast term (independent uniform noise in [0, 1] with data_range 1 scores ~0.04; unit Gaussian
  noise with data_range = max - min ~ 8 scores ~0.3). Compare values only at the same data_range.

  Args:
    x, y: images with identical shapes; the last two axes are in-plane.
    data_range: the dynamic range L of the intensities (sets the stabilisers C1 = (0.01 L)^2,
      C2 = (0.03 L)^2); must be the same for every comparison one wants to rank.
  """
  x = np.asarray(x, dtype=np.float64)
  y = np.asarray(y, dtype=np.float64)
  if x.shape != y.shape or x.ndim < 2:
    raise ValueError(f"ms_ssim needs two images of the same shape (..., H, W), got {x.shape} and "
                     f"{y.shape}")
  if not data_range > 0 or not np.isfinite(data_range):
    raise ValueError(f"data_range must be a finite number > 0, got {data_range}")
  scales, win = ms_ssim_scales(*x.shape[-2:])
  g = _gaussian_window(win)
  weights = np.asarray(MS_SSIM_WEIGHTS[:scales])
  weights = weights / weights.sum()
  c1, c2 = (_K1 * data_range)**2, (_K2 * data_range)**2
  out = np.ones(x.shape[:-2])
  for s in range(scales):
    ssim_s, cs_s = _ssim_terms(x, y, g, c1, c2)
    term = ssim_s if s == scales - 1 else cs_s
    out = out * np.maximum(term, 0.0)**weights[s]
    if s < scales - 1:
      x, y = _downsample(x), _downsample(y)
  return out


def _as_volumes(volumes) -> np.ndarray:
  v = np.asarray(volumes, dtype=np.float64)
  if v.ndim == 5 and v.shape[-1] == 1:
    v = v[..., 0]
  if v.ndim != 4:
    raise ValueError(f"volumes must be (N, D, H, W) or (N, D, H, W, 1), got shape {v.shape}")
  return v


def ms_ssim_diversity(volumes,
                      *,
                      pairs: int = 100,
                      seed: int = 0,
                      data_range: float | None = None) -> float:
  """Mean MS-SSIM over random pairs of distinct samples: lower means a more diverse sample set.

  Each 3D volume (D, H, W) is compared slice by slice (2D MS-SSIM in-plane, where resolution is
  high; through-plane there are too few, thick slices for multi-scale analysis) and the slice
  values are averaged. Mode collapse, a typical failure of DP-trained generators, shows up as a
  mean close to that of a real data set's near-duplicates.

  Args:
    volumes: (N, D, H, W) or (N, D, H, W, 1), N >= 2.
    pairs: number of random pairs (i, j), i != j, drawn with replacement among pairs; if it is at
      least N(N-1)/2, every unordered pair is used once instead (exact).
    seed: for the pair draw.
    data_range: intensity range for the SSIM constants; default max - min over all `volumes`.
      Pass the real data's range to compare diversity across sample sets.

  Returns:
    The mean MS-SSIM over pairs, in [0, 1].
  """
  v = _as_volumes(volumes)
  n = v.shape[0]
  if n < 2:
    raise ValueError(f"ms_ssim_diversity needs at least 2 volumes, got {n}")
  if pairs < 1:
    raise ValueError(f"pairs must be >= 1, got {pairs}")
  if data_range is None:
    data_range = float(v.max() - v.min())
    if data_range <= 0:
      raise ValueError("all volumes are constant with the same value; pass data_range explicitly")
  if pairs >= n * (n - 1) // 2:
    ii, jj = np.triu_indices(n, k=1)
  else:
    rng = np.random.default_rng(seed)
    ii = rng.integers(0, n, size=pairs)
    jj = (ii + rng.integers(1, n, size=pairs)) % n  # uniform over j != i
  values = [ms_ssim(v[i], v[j], data_range=data_range).mean() for i, j in zip(ii, jj)]
  return float(np.mean(values))


# --------------------------------------------------------------------------------------------------
# Reference-statistics cache.
# --------------------------------------------------------------------------------------------------


class ReferenceStats(NamedTuple):
  mu: np.ndarray     # [d]     float64 feature mean of the reference set
  sigma: np.ndarray  # [d, d]  float64 unbiased feature covariance
  n: int             # number of reference samples (FID is biased in n: compare like with like)


def save_reference_stats(path: str | os.PathLike, features, *, extractor: str,
                         extractor_version: str) -> ReferenceStats:
  """Computes and caches the FID statistics of a reference (real) feature set.

  The file records which extractor made the features, so a cache from an older or different
  extractor is refused on load instead of silently producing incomparable FIDs. Written to a
  temporary file in the same directory and renamed, so an interrupted run never leaves a truncated
  cache that a later run would trust.
  """
  if not extractor or not extractor_version:
    raise ValueError("extractor and extractor_version must be non-empty strings")
  mu, sigma = feature_statistics(features)
  stats = ReferenceStats(mu, sigma, int(np.shape(features)[0]))
  with atomic_open(path, "wb") as fh:
    np.savez(fh, mu=stats.mu, sigma=stats.sigma, n=np.int64(stats.n),
             extractor=np.str_(extractor), extractor_version=np.str_(extractor_version),
             format=np.int64(_CACHE_FORMAT))
  return stats


def load_reference_stats(path: str | os.PathLike, *, extractor: str,
                         extractor_version: str) -> ReferenceStats:
  """Loads cached reference statistics, refusing a cache made by another extractor or version.

  Raises:
    FileNotFoundError: no cache at `path`.
    ValueError: the cache is stale (other extractor name/version or cache format) or malformed;
      the message says to delete it and recompute.
  """
  path = os.fspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f"no reference-statistics cache at {path}; compute it with "
                            "save_reference_stats")
  try:
    with np.load(path, allow_pickle=False) as z:
      fmt = int(z["format"])
      cached_extractor = str(z["extractor"])
      cached_version = str(z["extractor_version"])
      mu, sigma, n = z["mu"], z["sigma"], int(z["n"])
  except (KeyError, ValueError, OSError) as e:
    raise ValueError(f"{path} is not a valid reference-statistics cache ({e}); delete it and "
                     "recompute with save_reference_stats") from e
  if fmt != _CACHE_FORMAT:
    raise ValueError(f"reference-statistics cache {path} has format {fmt}, expected "
                     f"{_CACHE_FORMAT}; the cache is stale: delete it and recompute")
  if (cached_extractor, cached_version) != (extractor, extractor_version):
    raise ValueError(f"reference-statistics cache {path} is stale: it was computed with extractor "
                     f"{cached_extractor!r} version {cached_version!r}, but {extractor!r} version "
                     f"{extractor_version!r} was requested; delete it and recompute")
  return ReferenceStats(mu, sigma, n)
