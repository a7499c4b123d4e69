"""Poisson batch selection on the host, padded to static shapes with a mask.

The accountant's amplification-by-sampling assumes Poisson sampling: every example enters each
step's batch independently with probability q, so the batch size is Binomial(N, q) and varies.
Fixed-size shuffled batches are NOT what the accountant analyses. Sampling happens in numpy on the
host, which holds the dataset indices.

Static shapes. jit wants a fixed batch shape; a Poisson batch does not have one. Two designs:

  * "max_size" (default, recommended): pad every batch to ONE buffer size `max_size` (a multiple of
    the microbatch size m, chosen so overflow is astronomically rare) and report
    `num_microbatches = ceil(n / m)`. The step passes that count to
    `clipping.clipped_grad_sum(..., num_microbatches=...)`, which loops (lax.fori_loop with a
    traced trip count) over only those microbatches. One compilation serves every step and at most
    m - 1 padding examples are computed per step; the price is a host buffer of `max_size` rows
    (padding rows may be cheap zeros: they are never computed past the count).
  * "buckets": pad to the smallest of a few static sizes (multiples of m). No dynamic loop, a
    smaller buffer to transfer, but one compilation per bucket and up to one bucket gap of wasted
    compute per step. Useful where a while-loop is undesirable.

Either way a sampled example is never dropped or truncated. A batch larger than the largest size
(probability < 1e-10 per step with the default max size) is padded to the next multiple of m with a
warning: one extra compilation, no lost example.

Reproducibility and secrecy. Step s uses `np.random.default_rng([seed, step])`, so step s draws
the same batch after a restart without replaying earlier steps. The seed must be SECRET in a real
run: an adversary who knows it knows which examples were in each batch, and the privacy
amplification by sampling is gone. `seed=None` draws it from OS entropy; checkpoint `batcher.seed`.
"""

from collections.abc import Iterator
import math
import secrets
from typing import NamedTuple
import warnings

import numpy as np
from scipy import stats

from jaxldm.privacy.checks import check_arg

# Probability per step that a Poisson batch exceeds the default max size.
DEFAULT_OVERFLOW_PROB = 1e-10


def poisson_sample(rng: np.random.Generator, num_examples: int,
                   sampling_rate: float) -> np.ndarray:
  """Indices (sorted, int64) of a Poisson sample: each example kept independently w.p. q."""
  check_arg('sampling_rate', sampling_rate, '(0, 1]')
  check_arg('num_examples', num_examples, '[0, inf)', integer=True)
  return _poisson_indices(rng, num_examples, sampling_rate)


def _poisson_indices(rng: np.random.Generator, num_examples: int, sampling_rate: float) -> np.ndarray:
  """`poisson_sample` without the checks, for arguments checked once (a batcher's, every step)."""
  return np.flatnonzero(rng.random(num_examples) < sampling_rate).astype(np.int64)


def pad_to_size(indices: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
  """Pads with index 0 / mask 0 to exactly `size`; raises rather than truncate."""
  indices = np.asarray(indices, np.int64)
  if indices.ndim != 1:
    raise ValueError(f'indices must be 1-D, got shape {indices.shape}.')
  if len(indices) > size:
    raise ValueError(f'{len(indices)} sampled examples do not fit in a padded size of {size}; '
                     'refusing to drop sampled examples (that would break the DP accounting).')
  padded = np.zeros(size, np.int64)
  padded[:len(indices)] = indices
  mask = np.zeros(size, np.int32)
  mask[:len(indices)] = 1
  return padded, mask


def pad_to_multiple(indices: np.ndarray, multiple: int,
                    max_size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Pads to the next multiple of `multiple` (at least one) with index 0 / mask 0.

  Args:
    indices: sampled indices.
    multiple: the microbatch size.
    max_size: optional cap (a multiple of `multiple`); a batch that needs more raises ValueError
      instead of being truncated.

  Returns:
    (padded indices int64, mask int32 with 1 for sampled examples).
  """
  check_arg('multiple', multiple, '[1, inf)', integer=True)
  if max_size is not None and (max_size < multiple or max_size % multiple):
    raise ValueError(f'max_size {max_size} must be a positive multiple of {multiple}.')
  size = max(1, math.ceil(len(indices) / multiple)) * multiple
  if max_size is not None and size > max_size:
    raise ValueError(f'{len(indices)} sampled examples exceed max_size {max_size}; refusing to '
                     'drop sampled examples (that would break the DP accounting).')
  return pad_to_size(indices, size)


def max_batch_size(num_examples: int, sampling_rate: float, multiple: int = 1,
                   overflow_prob: float = DEFAULT_OVERFLOW_PROB) -> int:
  """Smallest multiple of `multiple` that a Binomial(N, q) batch exceeds w.p. <= overflow_prob."""
  check_arg('sampling_rate', sampling_rate, '(0, 1]')
  quantile = stats.binom.isf(overflow_prob, num_examples, sampling_rate)
  size = int(min(num_examples, quantile if np.isfinite(quantile) else num_examples))
  return max(1, math.ceil(size / multiple)) * multiple


class SampledBatch(NamedTuple):
  """One step's batch. `indices[mask == 1]` are the sampled examples, in increasing order."""
  indices: np.ndarray  # [padded size] int64; padding rows are index 0
  mask: np.ndarray  # [padded size] int32; 1 = sampled, 0 = padding
  num_microbatches: int  # ceil(#sampled / microbatch_size): microbatches holding real examples


class PoissonBatcher:
  """Per-step Poisson batches with static padded shapes; see the module docstring."""

  def __init__(self, num_examples: int, sampling_rate: float, seed: int | None = None, *,
               microbatch_size: int = 1, padding: str = 'max_size', max_size: int | None = None,
               bucket_sizes: tuple[int, ...] | None = None):
    """Builds a batcher.

    Args:
      num_examples: N, the dataset size.
      sampling_rate: q in (0, 1].
      seed: secret sampling seed; None draws 63 bits from OS entropy (see `self.seed`).
      microbatch_size: m; every padded size is a multiple of it.
      padding: "max_size" (one size, use `num_microbatches`) or "buckets".
      max_size: the padded size for "max_size" and the largest bucket; default `max_batch_size`.
      bucket_sizes: for "buckets"; default four sizes at about E, E + std, E + 2 std and max_size;
        when given, the largest is the max size.
    """
    check_arg('num_examples', num_examples, '[1, inf)', integer=True)
    check_arg('sampling_rate', sampling_rate, '(0, 1]')
    check_arg('microbatch_size', microbatch_size, '[1, inf)', integer=True)
    if padding not in ('max_size', 'buckets'):
      raise ValueError(f'padding must be "max_size" or "buckets", got {padding!r}.')
    self.num_examples = num_examples
    self.sampling_rate = sampling_rate
    self.seed = secrets.randbits(63) if seed is None else int(seed)
    self.microbatch_size = microbatch_size
    self.padding = padding
    m = microbatch_size
    if padding == 'buckets' and bucket_sizes is not None:
      bucket_sizes = tuple(sorted({int(b) for b in bucket_sizes}))
      if any(b < m or b % m for b in bucket_sizes):
        raise ValueError(f'bucket_sizes {bucket_sizes} must be positive multiples of {m}.')
      if max_size is not None and max_size != bucket_sizes[-1]:
        raise ValueError(f'max_size {max_size} must equal the largest bucket size '
                         f'{bucket_sizes[-1]} (or be left out).')
      max_size = bucket_sizes[-1]
    if max_size is None:
      max_size = max_batch_size(num_examples, sampling_rate, m)
    if max_size < m or max_size % m:
      raise ValueError(f'max_size {max_size} must be a positive multiple of microbatch_size {m}.')
    self.max_size = max_size
    if padding == 'max_size':
      self.sizes = (max_size,)
    elif bucket_sizes is not None:
      self.sizes = bucket_sizes
    else:  # About E, E + std, E + 2 std and the max size, rounded up to multiples of m.
      mean = num_examples * sampling_rate
      std = math.sqrt(mean * (1 - sampling_rate))
      sizes = {max(1, math.ceil((mean + k * std) / m)) * m for k in (0, 1, 2)}
      self.sizes = tuple(sorted({s for s in sizes if s < max_size} | {max_size}))

  @property
  def expected_batch_size(self) -> float:
    """q * N: what the noisy gradient sum is divided by (never the actual size)."""
    return self.num_examples * self.sampling_rate

  def batch(self, step: int) -> SampledBatch:
    """The batch of step `step`, reproducible from (seed, step) alone."""
    check_arg('step', step, '[0, inf)', integer=True)
    rng = np.random.default_rng([self.seed, step])
    indices = _poisson_indices(rng, self.num_examples, self.sampling_rate)
    n, m = len(indices), self.microbatch_size
    size = next((s for s in self.sizes if s >= n), None)
    if size is None:
      size = math.ceil(n / m) * m
      warnings.warn(f'Step {step}: Poisson batch of {n} examples exceeds the largest padded size '
                    f'{self.sizes[-1]}; padding to {size} (one extra compilation, nothing '
                    'dropped).', UserWarning, stacklevel=2)
    padded, mask = pad_to_size(indices, size)
    return SampledBatch(padded, mask, math.ceil(n / m))

  def __iter__(self) -> Iterator[SampledBatch]:
    return self.iterate(0)

  def iterate(self, start_step: int = 0) -> Iterator[SampledBatch]:
    """Batches of steps start_step, start_step + 1, ... (resume by passing the restored step)."""
    step = start_step
    while True:
      yield self.batch(step)
      step += 1
