"""The audit passes the trainers' DP step and catches each of six broken engines.

Runs on 4 CPU devices (tests/conftest.py). Audits with eps_trials=0 skip the epsilon bound (its
100k steps run once, in the power test); the compilations (one per engine and setting) dominate.
"""

import jax
import numpy as np
import pytest

from jaxldm import cli
from jaxldm.privacy import accounting
from jaxldm.privacy import audit
from jaxldm.privacy import audit_engines

DELTA = 1e-5


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


def test_planned_threshold_bound_has_power_and_stays_valid():
  # Gaussian scores at sigma 1 (true epsilon 4.38) against a claim of sigma 2 (1.99).
  rs = np.random.default_rng(1)
  present = rs.random(100_000) < 0.5
  for sigma, low, high in ((1.0, 2.3, 4.38), (2.0, 0.5, 1.99)):
    scores = rs.normal(size=present.size) * sigma + present
    bound = audit._split_bound(scores, present, delta=DELTA, confidence=0.95).epsilon_lower_bound
    assert low < bound < high, (sigma, bound)


def test_gaussian_epsilon_is_the_accountants_for_one_step():
  for sigma in (0.5, 1.0, 2.0):
    claimed = accounting.epsilon(noise_multiplier=sigma, sampling_rate=1.0, steps=1, delta=DELTA)
    assert audit.gaussian_epsilon(sigma, DELTA) == pytest.approx(claimed, rel=1e-4)
  assert audit.gaussian_epsilon(1e-3, DELTA) > 1e5


def test_trainer_step_passes_and_half_sigma_is_caught_power_table(capsys):
  """The power table: the real step stays below its claim; half the noise exceeds it."""
  assert len(jax.devices()) >= 4
  good = audit.audit_private_step('trainer', num_devices=4)
  half = audit.audit_private_step('half_sigma', num_devices=4)
  claimed = accounting.epsilon(noise_multiplier=1.0, sampling_rate=1.0, steps=1, delta=DELTA)
  true_half = audit.gaussian_epsilon(0.5, DELTA)
  with capsys.disabled():
    print('\nengine      true eps  claimed  lower bound  noise ratio  sensitivity ratio')
    for r, true in ((good, claimed), (half, true_half)):
      print(f'{r.engine:10s}  {true:8.3f}  {r.claimed_epsilon:7.3f}  '
            f'{r.epsilon_lower_bound:11.3f}  {r.noise_ratio:11.3f}  {r.sensitivity_ratio:17.3f}')
  assert good.passed, good.reasons
  assert good.num_devices == 4 and good.padded_batch_size % (2 * 4) == 0
  assert good.claimed_epsilon == pytest.approx(claimed)
  assert abs(good.noise_ratio - 1) < 0.05 and abs(good.sensitivity_ratio - 1) < 1e-3
  assert good.leak_ratio < 1e-3
  assert good.epsilon_lower_bound < claimed
  assert 'checked against step_inputs' in good.noise_keys
  assert not half.passed
  assert claimed < half.epsilon_lower_bound <= true_half  # Caught by the black-box bound alone.
  assert abs(half.noise_ratio - 0.5) < 0.05
  assert any('exceeds the claimed' in r for r in half.reasons)


def test_trainer_step_passes_with_per_layer_clipping_and_k():
  r = audit.audit_private_step('trainer', per_layer=True, k=3, microbatch_size=1, num_devices=4,
                               eps_trials=0)
  assert r.passed, r.reasons
  assert abs(r.sensitivity_ratio - 1) < 1e-3 and abs(r.noise_ratio - 1) < 0.05


@pytest.mark.parametrize('name, check', [
    ('noise_per_microbatch', 'noise std'),
    ('noise_per_device', 'noise std'),
    ('actual_batch_size', 'noise std'),
    ('no_clipping', 'sensitivity'),
    ('mask_ignored', 'leak'),
])
def test_broken_engine_is_caught_by_the_cli(name, check, capsys):
  assert cli.main(['privacy', 'audit', '--engine', name, '--devices', '4', '--eps-trials', '0',
                   '--trials', '2000']) == 1
  out = capsys.readouterr().out
  assert 'FAIL' in out
  row = next(line for line in out.splitlines() if line.startswith(check))
  assert row.rstrip().endswith('FAIL'), out


def test_every_broken_engine_is_registered():
  assert set(audit_engines.BROKEN_ENGINES) == {
      'noise_per_microbatch', 'noise_per_device', 'actual_batch_size', 'half_sigma', 'no_clipping',
      'mask_ignored'}
  assert not audit_engines.TRAINER.broken
  with pytest.raises(ValueError, match='unknown engine'):
    audit_engines.get('nope')


def test_cli_rejects_bad_settings_in_one_line(capsys):
  assert cli.main(['privacy', 'audit', '--sampling-rate', '0']) == 2
  assert cli.main(['privacy', 'audit', '--engine', 'nope']) == 2
  assert cli.main(['privacy', 'audit', '--devices', '64']) == 2
  err = capsys.readouterr().err
  assert err.count('jaxldm: error:') == 3 and 'unknown engine' in err


def test_the_cpu_trainers_accumulated_step_passes_and_half_sigma_is_caught_there_too():
  # dp.microbatch_loop = 'accumulate' (what the trainers run on CPU): the clipped sums of every
  # microbatch x devices rows added (dp.chunk_sums), then ONE noise draw (dp.release_sums).
  assert cli.main(["privacy", "audit", "--microbatch-loop", "accumulate", "--trials", "2000",
                   "--eps-trials", "20000"]) == 0
  assert cli.main(["privacy", "audit", "--microbatch-loop", "accumulate", "--trials", "2000", "--eps-trials",
                   "20000", "--noise-scale", "0.5"]) == 1
