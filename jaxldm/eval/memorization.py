"""Memorization detection by embedding correlation (Dar et al. 2023, arXiv 2307.01148).

A self-supervised contrastive encoder maps volumes to embeddings (that encoder lives elsewhere;
this module only sees its outputs). Similarity is the Pearson correlation of embeddings. The copy
threshold tau is calibrated on data the model never saw: the 95th percentile, over training
samples, of each one's correlation to its nearest validation sample, i.e. how close two DIFFERENT
real patients can look. A synthetic sample more correlated than tau with its nearest training
sample is called a copy.

The per-sample outputs (`nn_indices`, `nn_correlations`, the closest-pair figure) point at
individual training volumes: they are for audits of non-private baselines or for the data owner,
never for a DP run's logs or reports, which carry the aggregate rates only.
"""

from __future__ import annotations

import os

import numpy as np

from jaxldm.atomic import atomic_open

# Correlation blocks hold at most this many float64 entries (128 MiB).
_BLOCK_ELEMENTS = 1 << 24


def _standardize_rows(x, name: str) -> np.ndarray:
  """Rows centred and scaled to unit L2 norm, so a dot product of two rows is their Pearson r."""
  x = np.asarray(x, dtype=np.float64)
  if x.ndim != 2 or x.shape[0] < 1 or x.shape[1] < 2:
    raise ValueError(f"{name} must be (num_samples >= 1, embedding_dim >= 2), got shape {x.shape}")
  if not np.all(np.isfinite(x)):
    raise ValueError(f"{name} contains NaN or inf")
  x = x - x.mean(axis=1, keepdims=True)
  norms = np.linalg.norm(x, axis=1, keepdims=True)
  constant = np.flatnonzero(norms[:, 0] == 0)
  if constant.size:
    raise ValueError(f"{name} rows {constant[:10].tolist()} are constant; Pearson correlation is "
                     "undefined for them")
  return x / norms


def _check_dims(a: np.ndarray, b: np.ndarray, name_a: str, name_b: str) -> None:
  if a.shape[1] != b.shape[1]:
    raise ValueError(f"{name_a} and {name_b} have different embedding dimensions "
                     f"({a.shape[1]} vs {b.shape[1]})")


def pearson_matrix(a, b) -> np.ndarray:
  """Pearson correlation between every row of `a` (Na, d) and every row of `b` (Nb, d).

  Returns:
    (Na, Nb) float64 in [-1, 1]. Invariant to a positive affine rescaling of any row.
  """
  za = _standardize_rows(a, "a")
  zb = _standardize_rows(b, "b")
  _check_dims(za, zb, "a", "b")
  return np.clip(za @ zb.T, -1.0, 1.0)


def nearest_neighbours(query_emb, reference_emb) -> tuple[np.ndarray, np.ndarray]:
  """For each query row, the reference row of highest Pearson correlation.

  Computed in query blocks so memory stays bounded for large reference sets. Ties go to the lowest
  reference index.

  Returns:
    (indices [Nq] int64, correlations [Nq] float64).
  """
  q = _standardize_rows(query_emb, "query_emb")
  r = _standardize_rows(reference_emb, "reference_emb")
  _check_dims(q, r, "query_emb", "reference_emb")
  idx = np.empty(q.shape[0], dtype=np.int64)
  corr = np.empty(q.shape[0])
  step = max(1, _BLOCK_ELEMENTS // r.shape[0])
  for lo in range(0, q.shape[0], step):
    c = q[lo:lo + step] @ r.T
    j = np.argmax(c, axis=1)
    idx[lo:lo + step] = j
    corr[lo:lo + step] = c[np.arange(c.shape[0]), j]
  return idx, np.clip(corr, -1.0, 1.0)


def copy_threshold(train_emb, val_emb, percentile: float = 95.0) -> float:
  """tau: the `percentile` over training samples of each one's correlation to its nearest
  validation sample (Dar et al. use 95).

  Validation samples are real data the generator never trained on, so this is the similarity two
  distinct patients reach by chance; anything closer to a training sample is suspicious. Uses
  numpy's default (linear) percentile interpolation.
  """
  if not 0.0 <= percentile <= 100.0:
    raise ValueError(f"percentile must be in [0, 100], got {percentile}")
  _, corr = nearest_neighbours(train_emb, val_emb)
  return float(np.percentile(corr, percentile))


def copy_rates(synthetic_emb, train_emb, tau: float) -> dict[str, float | np.ndarray]:
  """Copy statistics of a synthetic set against the training set.

  A synthetic sample is a copy when its correlation to its nearest training sample is strictly
  greater than tau.

  Returns:
    synthetic_copy_rate: fraction of synthetic samples that are copies (Dar et al.: 69-87% for
      non-private LDMs).
    train_copied_rate: fraction of training samples that are the nearest neighbour of at least one
      copy (Dar et al.: 37-48%).
    nn_indices: [Ns] index of each synthetic sample's nearest training sample (per-example: not for
      DP-run reports).
    nn_correlations: [Ns] its correlation.
    is_copy: [Ns] bool, nn_correlations > tau.
  """
  if not np.isfinite(tau):
    raise ValueError(f"tau must be finite, got {tau}")
  n_train = np.shape(train_emb)[0]
  idx, corr = nearest_neighbours(synthetic_emb, train_emb)
  is_copy = corr > tau
  return {
      "synthetic_copy_rate": float(is_copy.mean()),
      "train_copied_rate": float(np.unique(idx[is_copy]).size / n_train),
      "nn_indices": idx,
      "nn_correlations": corr,
      "is_copy": is_copy,
  }


def _mid_slice(volume: np.ndarray) -> np.ndarray:
  v = np.asarray(volume, dtype=np.float64)
  if v.ndim == 4 and v.shape[-1] == 1:
    v = v[..., 0]
  if v.ndim == 3:
    return v[v.shape[0] // 2]
  if v.ndim == 2:
    return v
  raise ValueError(f"expected a volume (D, H, W), (D, H, W, 1) or an image (H, W), got {v.shape}")


def save_closest_pairs(synthetic, train, nn_indices, correlations, path: str | os.PathLike, *,
                       top: int = 8) -> None:
  """PNG of the `top` most-correlated (synthetic, nearest training) pairs, mid-slices side by side.

  The figure is how a reader checks by eye that "copies" are copies and not an artefact of the
  encoder. It shows training data: keep it with the data owner. Written to a temporary file and
  renamed, so a crash never leaves a half-written image.

  Args:
    synthetic: (Ns, D, H, W[, 1]) synthetic volumes (or (Ns, H, W) images).
    train: (Nt, ...) training volumes, same layout.
    nn_indices, correlations: [Ns] from `nearest_neighbours` / `copy_rates`.
    path: output .png file.
    top: number of pairs (rows) to show, highest correlation first.
  """
  # Lazy import: plotting is optional and slow to import. A bare Figure renders PNG with the Agg
  # canvas and never touches pyplot's global state or the user's interactive backend.
  from matplotlib.figure import Figure

  nn_indices = np.asarray(nn_indices)
  correlations = np.asarray(correlations, dtype=np.float64)
  ns = len(synthetic)
  if nn_indices.shape != (ns,) or correlations.shape != (ns,):
    raise ValueError(f"nn_indices {nn_indices.shape} and correlations {correlations.shape} must "
                     f"both have shape ({ns},), one entry per synthetic sample")
  if ns == 0 or top < 1:
    raise ValueError(f"nothing to plot: {ns} synthetic samples, top={top}")
  if nn_indices.min() < 0 or nn_indices.max() >= len(train):
    raise ValueError(f"nn_indices must index the {len(train)} training samples")
  order = np.argsort(-correlations, kind="stable")[:top]

  fig = Figure(figsize=(4.0, 2.0 * len(order)), dpi=100)
  axes = fig.subplots(len(order), 2, squeeze=False)
  for row, i in enumerate(order):
    j = int(nn_indices[i])
    panels = ((_mid_slice(synthetic[i]), f"synthetic {i}"),
              (_mid_slice(train[j]), f"train {j}  r={correlations[i]:.3f}"))
    for col, (img, title) in enumerate(panels):
      ax = axes[row, col]
      ax.imshow(img, cmap="gray")
      ax.set_title(title, fontsize=8)
      ax.axis("off")
  fig.tight_layout()

  with atomic_open(path, "wb") as fh:
    fig.savefig(fh, format="png")
