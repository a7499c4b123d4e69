"""Accounting against reference numbers, calibration round trips, parameter validation."""

import math
import time
import warnings

import pytest

from jaxldm.privacy import accounting

# Reference numbers measured with dp-accounting 0.6.0 (jaxldm/privacy/accounting.py docstring).
REFERENCE = dict(noise_multiplier=1.1, sampling_rate=256 / 60000, steps=14062, delta=1e-5)


@pytest.mark.parametrize('accountant, want', [('rdp', 2.597), ('pld', 2.382)])
def test_reference_epsilon(accountant, want):
  assert accounting.epsilon(**REFERENCE, accountant=accountant) == pytest.approx(want, abs=1e-3)


def test_pld_is_tighter_than_rdp_and_coarse_pld_is_pessimistic():
  rdp = accounting.epsilon(**REFERENCE, accountant='rdp')
  fine = accounting.epsilon(**REFERENCE, accountant='pld')
  coarse = accounting.epsilon(**REFERENCE, accountant='pld', value_discretization_interval=1e-2)
  assert fine < rdp and fine < coarse


def test_epsilon_is_monotone_and_has_sane_limits():
  base = dict(sampling_rate=0.01, delta=1e-5, accountant='rdp')
  eps = [accounting.epsilon(noise_multiplier=s, steps=500, **base) for s in (0.8, 1.0, 2.0)]
  assert eps[0] > eps[1] > eps[2] > 0
  eps = [accounting.epsilon(noise_multiplier=1.0, steps=t, **base) for t in (10, 100, 1000)]
  assert eps[0] < eps[1] < eps[2]
  assert accounting.epsilon(noise_multiplier=1.0, steps=0, **base) == 0.0
  assert accounting.epsilon(noise_multiplier=0.0, steps=1, **base) == math.inf


@pytest.mark.parametrize('accountant', ['rdp', 'pld'])
@pytest.mark.parametrize('target', [1.0, 8.0])
def test_calibration_round_trip(accountant, target):
  config = dict(sampling_rate=0.01, steps=1000, delta=1e-5, accountant=accountant)
  start = time.perf_counter()
  sigma = accounting.calibrate_noise_multiplier(target_epsilon=target, **config)
  seconds = time.perf_counter() - start
  eps = accounting.epsilon(noise_multiplier=sigma, **config)
  assert eps <= target  # Never over budget ...
  assert eps >= target * 0.99  # ... and within 1% of it (no noise wasted).
  assert seconds < 60, f'calibration took {seconds:.1f} s'


def test_calibration_reproduces_reference_sigma():
  config = dict(sampling_rate=256 / 60000, steps=14062, delta=1e-5)
  assert accounting.calibrate_noise_multiplier(
      target_epsilon=2.382, accountant='pld', **config) == pytest.approx(1.1, rel=2e-3)
  assert accounting.calibrate_noise_multiplier(
      target_epsilon=2.597, accountant='rdp', **config) == pytest.approx(1.1, rel=2e-3)


@pytest.mark.parametrize('kwargs, match', [
    (dict(sampling_rate=0.0), 'sampling_rate'),
    (dict(sampling_rate=1.5), 'sampling_rate'),
    (dict(sampling_rate=float('nan')), 'sampling_rate'),
    (dict(delta=0.0), 'delta'),
    (dict(delta=1.0), 'delta'),
    (dict(noise_multiplier=-0.1), 'noise_multiplier'),
    (dict(steps=-1), 'steps'),
    (dict(steps=1.5), 'steps'),
    (dict(accountant='moments'), 'accountant'),
])
def test_epsilon_rejects_bad_params(kwargs, match):
  args = dict(noise_multiplier=1.0, sampling_rate=0.01, steps=10, delta=1e-5)
  args.update(kwargs)
  with pytest.raises(ValueError, match=match):
    accounting.epsilon(**args)


@pytest.mark.parametrize('target', [0.0, -1.0])
def test_non_positive_target_is_unreachable(target):
  with pytest.raises(ValueError, match='unreachable'):
    accounting.calibrate_noise_multiplier(target_epsilon=target, sampling_rate=0.01, steps=10,
                                          delta=1e-5)


@pytest.mark.parametrize('accountant', ['rdp', 'pld'])
def test_tiny_target_is_unreachable(accountant):
  with pytest.raises(ValueError, match='unreachable.*noise multiplier above 1000'):
    accounting.calibrate_noise_multiplier(target_epsilon=1e-3, sampling_rate=1.0, steps=1000,
                                          delta=1e-5, accountant=accountant)


def test_calibration_errors():
  with pytest.raises(ValueError, match='steps must be > 0'):
    accounting.calibrate_noise_multiplier(target_epsilon=1.0, sampling_rate=0.01, steps=0,
                                          delta=1e-5)
  with pytest.raises(ValueError, match='delta'):
    accounting.calibrate_noise_multiplier(target_epsilon=1.0, sampling_rate=0.01, steps=10,
                                          delta=2.0)


def test_warn_if_delta_too_large():
  with pytest.warns(UserWarning, match='delta=0.001 >= 1/N'):
    accounting.warn_if_delta_too_large(1e-3, dataset_size=5000)
  with warnings.catch_warnings():
    warnings.simplefilter('error')
    accounting.warn_if_delta_too_large(1e-5, dataset_size=5000)


def test_rdp_non_converged_order_warnings_are_dropped_and_others_kept(caplog):
  import logging

  with caplog.at_level(logging.WARNING, logger="absl"):
    eps = accounting.epsilon(noise_multiplier=1.56, sampling_rate=0.25, steps=100, delta=1e-5, accountant="rdp")
    logging.getLogger("absl").warning("another absl warning")
  assert 9.0 < eps <= 10.0  # The orders dp-accounting leaves out do not change the bound's validity.
  messages = [r.getMessage() for r in caplog.records]
  assert not any("failed to converge" in m for m in messages)
  assert "another absl warning" in messages


@pytest.mark.parametrize("q,sigma,steps", [(0.01, 1.1, 1), (0.01, 1.1, 1000), (0.25, 0.7, 37), (1.0, 2.0, 5),
                                           (1 / 16, 0.9, 300)])
def test_rdp_epsilon_equals_dp_accounting(q, sigma, steps):
  # The cached one-step RDP curve times `steps` against dp-accounting's own composition of the event.
  import dp_accounting
  from dp_accounting import rdp
  acc = rdp.RdpAccountant()
  acc.compose(dp_accounting.SelfComposedDpEvent(
      dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps))
  want = acc.get_epsilon(1e-5)
  for _ in range(2):  # Computed, then from the cache.
    got = accounting.epsilon(noise_multiplier=sigma, sampling_rate=q, steps=steps, delta=1e-5, accountant="rdp")
    assert got == pytest.approx(want, rel=1e-12)
