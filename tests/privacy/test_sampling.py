"""Poisson sampling statistics, padding that never drops, reproducible per-step batches."""

import math
import warnings

import numpy as np
import pytest

from jaxldm.privacy import sampling

N, Q, STEPS = 1000, 0.05, 4000


def test_poisson_sample_is_binomial_and_uniform():
  sizes = np.zeros(STEPS)
  counts = np.zeros(N)
  for step in range(STEPS):
    indices = sampling.poisson_sample(np.random.default_rng([1, step]), N, Q)
    assert np.all(np.diff(indices) > 0) and indices.dtype == np.int64  # Sorted, no repeats.
    sizes[step] = len(indices)
    counts[indices] += 1
  mean, var = N * Q, N * Q * (1 - Q)
  assert abs(sizes.mean() - mean) < 5 * math.sqrt(var / STEPS)
  assert abs(sizes.var(ddof=1) - var) < 5 * var * math.sqrt(2 / (STEPS - 1))
  # Every example is sampled with frequency ~q: counts ~ Binomial(STEPS, q) each.
  count_std = math.sqrt(STEPS * Q * (1 - Q))
  assert np.all(np.abs(counts - STEPS * Q) < 6 * count_std)
  assert abs(counts.var(ddof=1) / count_std**2 - 1) < 0.2  # Not over-dispersed (not fixed sets).


def test_poisson_sample_edge_rates():
  rng = np.random.default_rng(0)
  np.testing.assert_array_equal(sampling.poisson_sample(rng, 7, 1.0), np.arange(7))
  for q in (0.0, -0.1, 1.5):
    with pytest.raises(ValueError, match='sampling_rate'):
      sampling.poisson_sample(rng, 7, q)


def test_pad_to_multiple_never_drops():
  indices = np.array([3, 8, 9, 20, 41])
  padded, mask = sampling.pad_to_multiple(indices, 4)
  assert len(padded) == 8 and mask.sum() == 5
  np.testing.assert_array_equal(padded[mask == 1], indices)
  np.testing.assert_array_equal(padded[mask == 0], 0)
  padded, mask = sampling.pad_to_multiple(np.array([], np.int64), 4)
  assert len(padded) == 4 and mask.sum() == 0  # An empty batch still has one microbatch.
  assert len(sampling.pad_to_multiple(indices, 4, max_size=8)[0]) == 8
  with pytest.raises(ValueError, match='refusing to drop'):
    sampling.pad_to_multiple(indices, 4, max_size=4)
  with pytest.raises(ValueError, match='multiple of 4'):
    sampling.pad_to_multiple(indices, 4, max_size=10)
  with pytest.raises(ValueError, match='refusing to drop'):
    sampling.pad_to_size(indices, 4)


@pytest.mark.parametrize('padding', ['max_size', 'buckets'])
def test_batcher_masks_sum_to_sampled_count_and_nothing_dropped(padding):
  m = 8
  batcher = sampling.PoissonBatcher(N, Q, seed=123, microbatch_size=m, padding=padding)
  sizes = set()
  for step, batch in zip(range(300), batcher):
    sampled = sampling.poisson_sample(np.random.default_rng([123, step]), N, Q)
    assert batch.mask.sum() == len(sampled)
    np.testing.assert_array_equal(batch.indices[batch.mask == 1], sampled)
    assert np.all(batch.indices[batch.mask == 0] == 0)
    assert np.all(batch.mask[:len(sampled)] == 1)  # Real examples first, padding after.
    assert len(batch.indices) % m == 0
    assert batch.num_microbatches == math.ceil(len(sampled) / m)
    assert batch.num_microbatches * m <= len(batch.indices)
    sizes.add(len(batch.indices))
  assert sizes <= set(batcher.sizes)
  if padding == 'max_size':
    assert sizes == {batcher.max_size}
  else:
    assert 1 < len(sizes) <= 4  # A few static sizes: a few compilations.
  assert batcher.expected_batch_size == N * Q


def test_batcher_is_reproducible_per_step_after_restart():
  a = sampling.PoissonBatcher(N, Q, seed=7, microbatch_size=4)
  first = [b.indices.copy() for _, b in zip(range(20), a)]
  resumed = sampling.PoissonBatcher(N, Q, seed=7, microbatch_size=4).iterate(start_step=12)
  for step in range(12, 20):
    np.testing.assert_array_equal(next(resumed).indices, first[step])
  assert not np.array_equal(first[0], first[1])
  other = sampling.PoissonBatcher(N, Q, seed=8, microbatch_size=4).batch(0)
  assert not np.array_equal(other.indices, first[0])


def test_batcher_secret_seed_from_os_entropy():
  a, b = sampling.PoissonBatcher(N, Q), sampling.PoissonBatcher(N, Q)
  assert a.seed != b.seed and a.seed >= 0


def test_explicit_buckets():
  batcher = sampling.PoissonBatcher(N, Q, seed=3, microbatch_size=8, padding='buckets',
                                    bucket_sizes=(64, 48, 96))
  assert batcher.sizes == (48, 64, 96) and batcher.max_size == 96
  for step in range(50):
    batch = batcher.batch(step)
    n = batch.mask.sum()
    assert len(batch.indices) == min(s for s in batcher.sizes if s >= n)


def test_default_max_size_covers_the_binomial_tail():
  size = sampling.max_batch_size(60000, 256 / 60000, multiple=16)
  assert size % 16 == 0
  # 256 +- 16: the default covers more than 6 standard deviations, but not absurdly many.
  assert 256 + 6 * 16 < size < 256 + 12 * 16
  assert sampling.max_batch_size(10, 1.0, multiple=4) == 12


def test_overflow_pads_further_with_a_warning_instead_of_dropping():
  batcher = sampling.PoissonBatcher(100, 0.5, seed=0, microbatch_size=4, max_size=8)
  with pytest.warns(UserWarning, match='nothing dropped'):
    batch = batcher.batch(0)
  assert batch.mask.sum() > 8 and len(batch.indices) % 4 == 0
  assert batch.num_microbatches * 4 == len(batch.indices)


def test_batcher_errors():
  with pytest.raises(ValueError, match='sampling_rate'):
    sampling.PoissonBatcher(N, 0.0)
  with pytest.raises(ValueError, match='max_size 10 must be a positive multiple'):
    sampling.PoissonBatcher(N, Q, microbatch_size=4, max_size=10)
  with pytest.raises(ValueError, match='padding'):
    sampling.PoissonBatcher(N, Q, padding='drop')
  with pytest.raises(ValueError, match='bucket_sizes'):
    sampling.PoissonBatcher(N, Q, microbatch_size=4, padding='buckets', bucket_sizes=(6, 100))
  with pytest.raises(ValueError, match='must equal the largest bucket size 96'):
    sampling.PoissonBatcher(N, Q, microbatch_size=4, padding='buckets', bucket_sizes=(48, 96),
                            max_size=128)
  with pytest.raises(ValueError, match='step'):
    sampling.PoissonBatcher(N, Q).batch(-1)
  with warnings.catch_warnings():
    warnings.simplefilter('error')
    sampling.PoissonBatcher(N, Q, seed=0).batch(0)  # The default size never warns in practice.
