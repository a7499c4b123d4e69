"""The canary audit detects broken noise and stays below the claim for a correct privatizer."""

import functools

import jax
import numpy as np
import pytest

from jaxldm.privacy import accounting
from jaxldm.privacy import audit
from jaxldm.privacy import noise

SIGMA, C, DELTA = 2.0, 1.0, 1e-5


def _claimed_epsilon():
  # The audit inserts the canary deterministically: one unsampled Gaussian step (q = 1).
  return accounting.epsilon(noise_multiplier=SIGMA, sampling_rate=1.0, steps=1, delta=DELTA)


def _audit(noise_multiplier, **kwargs):
  privatizer = functools.partial(noise.private_grad, l2_clip_norm=C,
                                 noise_multiplier=noise_multiplier, expected_batch_size=8.0,
                                 **kwargs)
  return audit.canary_audit(privatizer, jax.random.key(0), num_trials=4000, delta=DELTA)


def test_correct_privatizer_stays_below_the_claim():
  result = _audit(SIGMA)
  assert 0 <= result.epsilon_lower_bound < _claimed_epsilon()


def test_noise_scaled_down_10x_is_detected():
  result = _audit(SIGMA / 10)
  assert result.epsilon_lower_bound > _claimed_epsilon()


def test_padding_and_microbatching_are_audited_too():
  # The canary slot is padding when absent; microbatching must not change the verdict.
  assert _audit(SIGMA, microbatch_size=2).epsilon_lower_bound < _claimed_epsilon()


def test_epsilon_lower_bound_statistics():
  rs = np.random.default_rng(0)
  same = audit.epsilon_lower_bound(rs.normal(size=2000), rs.normal(size=2000), delta=DELTA)
  assert same[0] < 0.3  # Indistinguishable scores give (almost) nothing.
  separated = audit.epsilon_lower_bound(rs.normal(size=500) + 100, rs.normal(size=500),
                                        delta=DELTA)
  # Perfect separation of 500 vs 500: bounded by the Clopper-Pearson bounds, ~log(500 / 3.7).
  assert 4.0 < separated[0] < np.log(500)
  with pytest.raises(ValueError, match='both with and without'):
    audit.epsilon_lower_bound(np.ones(3), np.array([]), delta=DELTA)
