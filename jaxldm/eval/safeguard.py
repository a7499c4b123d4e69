"""Post-hoc privacy safeguard (Shi et al. 2023, arXiv 2301.06604).

A synthetic sample is released only if its distance to EVERY training sample exceeds a preset
threshold; the others are rejected. This removes exact and near copies of training data from what
leaves the project. It is a filter, not a privacy guarantee: unlike DP it says nothing about what
the released samples reveal in aggregate, and its outcome depends on the training data (so the
released/rejected split of a DP run is itself not covered by the DP guarantee).

Metrics:
  "rmse"       pixel RMSE between volumes, sqrt(mean((a - b)^2)) over all voxels; in the
               intensity units of the data, so a threshold reads as "average voxel difference".
  "embedding"  1 - Pearson correlation between embedding rows, in [0, 2]; the similarity of the
               memorization module (Dar et al. 2023), so a copy threshold tau there corresponds to
               a safeguard threshold 1 - tau here.
  "euclidean"  L2 distance between embedding rows, for encoders trained with a Euclidean loss.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

import numpy as np

from jaxldm.eval import memorization

METRICS = ("rmse", "embedding", "euclidean")

# Distance blocks and the float64 copies of the inputs they need hold roughly this many entries.
_BLOCK_ELEMENTS = 1 << 24


class SafeguardResult(NamedTuple):
  released_indices: np.ndarray  # [Nr] int64, candidates farther than the threshold from all train
  rejected_indices: np.ndarray  # [Nc - Nr] int64, candidates within the threshold of some train
  min_distances: np.ndarray     # [Nc] float64, distance to the nearest training sample


def _flat(x, name: str) -> np.ndarray:
  """(N, ...) -> (N, prod(...)) without copying (float64 conversion happens per block)."""
  x = np.asarray(x)
  if x.ndim < 2 or x.shape[0] < 1:
    raise ValueError(f"{name} must be (N >= 1, ...) with one item per row, got shape {x.shape}")
  return x.reshape(x.shape[0], -1)


def _euclidean_blocks(c: np.ndarray, t: np.ndarray, shift: np.ndarray
                      ) -> Iterator[tuple[slice, slice, np.ndarray]]:
  """Squared Euclidean distances in (candidate block, train block) tiles.

  Uses ||a||^2 + ||b||^2 - 2 a.b in float64 (a matrix product: fast, and memory-bounded by
  tiling). Both sides are first shifted by `shift` (the training mean), which leaves differences
  unchanged but shrinks the norms, so the cancellation error, ~1e-16 * ||a - shift||^2, stays far
  below any meaningful threshold.
  """
  dim = c.shape[1]
  rows = max(1, int(np.sqrt(_BLOCK_ELEMENTS / max(dim, 1))))
  for ci in range(0, c.shape[0], rows):
    cb = c[ci:ci + rows].astype(np.float64) - shift
    cb_sq = np.einsum("ij,ij->i", cb, cb)
    for ti in range(0, t.shape[0], rows):
      tb = t[ti:ti + rows].astype(np.float64) - shift
      tb_sq = np.einsum("ij,ij->i", tb, tb)
      d2 = np.maximum(cb_sq[:, None] + tb_sq[None, :] - 2.0 * (cb @ tb.T), 0.0)
      yield slice(ci, ci + cb.shape[0]), slice(ti, ti + tb.shape[0]), d2


def _row_mean(x: np.ndarray) -> np.ndarray:
  rows = max(1, _BLOCK_ELEMENTS // max(x.shape[1], 1))
  total = np.zeros(x.shape[1])
  for lo in range(0, x.shape[0], rows):
    total += x[lo:lo + rows].astype(np.float64).sum(axis=0)
  return total / x.shape[0]


def _distance_blocks(candidates, train, metric: str
                     ) -> Iterator[tuple[slice, slice, np.ndarray]]:
  if metric not in METRICS:
    raise ValueError(f"unknown metric {metric!r}; choose one of {', '.join(METRICS)}")
  c = _flat(candidates, "candidates")
  t = _flat(train, "train")
  if c.shape[1] != t.shape[1]:
    raise ValueError(f"candidates and train items differ in size: {np.shape(candidates)[1:]} vs "
                     f"{np.shape(train)[1:]}")
  if metric == "embedding":
    d = 1.0 - memorization.pearson_matrix(c, t)
    yield slice(0, c.shape[0]), slice(0, t.shape[0]), d
    return
  shift = _row_mean(t)
  for cs, ts, d2 in _euclidean_blocks(c, t, shift):
    if metric == "rmse":
      yield cs, ts, np.sqrt(d2 / c.shape[1])
    else:
      yield cs, ts, np.sqrt(d2)


def distances(candidates, train, *, metric: str = "rmse") -> np.ndarray:
  """(Nc, Nt) distances between every candidate and every training item.

  Args:
    candidates: (Nc, ...) volumes for "rmse" (any per-item shape, e.g. (D, H, W) or (D, H, W, 1)),
      or (Nc, d) embeddings for "embedding" / "euclidean".
    train: (Nt, ...) with the same per-item shape.
    metric: one of "rmse", "embedding", "euclidean" (see the module docstring).

  Volumes are converted to float64 one tile at a time, so memory is bounded by the tile size
  (plus the output) and memory-mapped inputs are never fully loaded.
  """
  out = np.empty((np.shape(candidates)[0], np.shape(train)[0]))
  for cs, ts, d in _distance_blocks(candidates, train, metric):
    out[cs, ts] = d
  return out


def apply_safeguard(candidates, train, threshold: float, *,
                    metric: str = "rmse") -> SafeguardResult:
  """Releases only the candidates whose distance to every training item is > `threshold`.

  The comparison is strict: a candidate at exactly the threshold is rejected. A NaN distance (a
  non-finite candidate) compares false and is rejected too: when in doubt, do not release.
  Only the per-candidate minimum is kept, so the full (Nc, Nt) matrix is never stored.

  Raises:
    ValueError: threshold not a finite number > 0 (at 0 only bit-exact copies would be rejected:
      surely a configuration mistake), or an unknown metric.
  """
  threshold = float(threshold)
  if not np.isfinite(threshold) or threshold <= 0:
    raise ValueError(f"threshold must be a finite number > 0, got {threshold}")
  min_d = np.full(np.shape(candidates)[0], np.inf)
  for cs, _, d in _distance_blocks(candidates, train, metric):
    # np.min propagates NaN, so a NaN candidate keeps a NaN minimum and is rejected below.
    min_d[cs] = np.minimum(min_d[cs], d.min(axis=1))
  released = min_d > threshold
  return SafeguardResult(np.flatnonzero(released), np.flatnonzero(~released), min_d)


# --------------------------------------------------------------------------------------------------
# Choosing the threshold, and sampling until enough candidates pass.
# --------------------------------------------------------------------------------------------------


def nearest_neighbour_distances(train, *, metric: str = "rmse") -> np.ndarray:
  """(Nt,) distance of each training item to its nearest OTHER training item (leave-one-out).

  The natural scale for a threshold: how close genuinely different subjects come to each other.
  """
  n = np.shape(train)[0]
  if n < 2:
    raise ValueError(f"need at least 2 training items for nearest-neighbour distances, got {n}")
  nearest = np.full(n, np.inf)
  for cs, ts, d in _distance_blocks(train, train, metric):
    d = d.copy()
    rows, cols = np.arange(cs.start, cs.stop), np.arange(ts.start, ts.stop)
    d[rows[:, None] == cols[None, :]] = np.inf  # Not the item itself.
    nearest[cs] = np.minimum(nearest[cs], d.min(axis=1))
  return nearest


def percentile_threshold(train, *, percentile: float = 5.0, metric: str = "rmse") -> float:
  """The `percentile`-th percentile of the training set's own nearest-neighbour distances.

  With the default 5: a candidate is released only if it is farther from every training item than
  the closest 5% of training items are from their nearest other one: closer than that, it looks
  more like a copy of one training subject than distinct subjects ever look alike.

  Raises:
    ValueError: percentile outside (0, 100], or a threshold <= 0 (duplicate training items).
  """
  if not 0 < percentile <= 100:
    raise ValueError(f"percentile must be in (0, 100], got {percentile}")
  threshold = float(np.percentile(nearest_neighbour_distances(train, metric=metric), percentile))
  if not threshold > 0:
    raise ValueError(f"the {percentile:g}th percentile of the training nearest-neighbour distances is "
                     f"{threshold:g} (duplicate training items?); give an explicit threshold")
  return threshold


class SafeguardSampling(NamedTuple):
  """Outcome of `sample_with_safeguard`; counts are over all rounds."""
  volumes: np.ndarray         # [Nr, ...] released items, in slot order
  slots: np.ndarray           # [Nr] int64, which of the n requested slots each released item fills
  min_distances: np.ndarray   # [Nr] float64, each released item's distance to the nearest train item
  requested: int              # n
  candidates: int             # items drawn
  rejected: int               # items within the threshold of some training item
  rounds: int                 # sampling rounds run
  complete: bool              # every slot filled (False: max_rounds was hit)


def sample_with_safeguard(sample_fn, n: int, train, threshold: float, *, metric: str = "rmse",
                          features_fn=None, max_rounds: int = 5,
                          max_oversample: int = 8) -> SafeguardSampling:
  """Draws candidates until n pass `apply_safeguard`, or `max_rounds` rounds were drawn.

  Args:
    sample_fn: (slots [k] int64, round int) -> [k, ...] candidate volumes; slot s is the s-th of the
      n requested samples (so its conditioning can be kept when it is redrawn), and round r must
      give fresh draws (different random keys) for each r.
    n: how many samples are wanted.
    train: [Nt, ...] training volumes, or their embeddings if `features_fn` is given.
    threshold: release only candidates at distance > threshold from every training item.
    metric: see `apply_safeguard`.
    features_fn: volumes -> embeddings, applied to candidates before comparing (embedding metrics).
    max_rounds: stop after this many rounds even if slots are still empty (reported, not raised).
    max_oversample: the most candidates drawn per empty slot in one round. Round 1 draws one per
      slot; later rounds draw ~1 / (release rate so far) per empty slot, within [1, max_oversample].

  Returns:
    The released items (at most one per slot, the first that passed) and the counts.
  """
  if n < 1 or max_rounds < 1 or max_oversample < 1:
    raise ValueError(f"n, max_rounds and max_oversample must be >= 1, got {n}, {max_rounds}, "
                     f"{max_oversample}")
  filled: dict[int, tuple[np.ndarray, float]] = {}
  candidates = rejected = rounds = 0
  while len(filled) < n and rounds < max_rounds:
    empty = np.array([s for s in range(n) if s not in filled], dtype=np.int64)
    rate = (candidates - rejected) / candidates if candidates else 1.0
    per_slot = int(min(max(np.ceil(1.0 / max(rate, 1e-9)), 1), max_oversample))
    slots = np.repeat(empty, per_slot)
    volumes = np.asarray(sample_fn(slots, rounds))
    if len(volumes) != len(slots):
      raise ValueError(f"sample_fn returned {len(volumes)} items for {len(slots)} slots")
    compared = volumes if features_fn is None else np.asarray(features_fn(volumes))
    result = apply_safeguard(compared, train, threshold, metric=metric)
    for i in result.released_indices:
      slot = int(slots[i])
      if slot not in filled:
        filled[slot] = (volumes[i], float(result.min_distances[i]))
    candidates += len(slots)
    rejected += len(result.rejected_indices)
    rounds += 1
  order = sorted(filled)
  shape = np.shape(volumes)[1:]
  released = (np.stack([filled[s][0] for s in order]) if order
              else np.zeros((0, *shape), dtype=np.asarray(volumes).dtype))
  return SafeguardSampling(released, np.asarray(order, dtype=np.int64),
                           np.asarray([filled[s][1] for s in order], dtype=np.float64), n,
                           candidates, rejected, rounds, len(filled) == n)
