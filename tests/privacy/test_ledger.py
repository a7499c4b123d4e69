"""The privacy ledger survives restarts, refuses a changed mechanism, and stops at the budget."""

import json
import os

import jax
import numpy as np
import pytest

from jaxldm.privacy import accounting
from jaxldm.privacy import ledger as ledger_lib

PARAMS = dict(sampling_rate=0.01, noise_multiplier=1.0, l2_clip_norm=1.0, delta=1e-5,
              dataset_size=10000, accountant='rdp', target_epsilon=3.0)


def _eps(steps, **overrides):
  p = dict(PARAMS, **overrides)
  return accounting.epsilon(noise_multiplier=p['noise_multiplier'],
                            sampling_rate=p['sampling_rate'], steps=steps, delta=p['delta'],
                            accountant=p['accountant'])


@pytest.mark.parametrize('accountant', ['rdp', 'pld'])
def test_kill_and_resume(tmp_path, accountant):
  workdir = str(tmp_path / 'run')
  params = dict(PARAMS, accountant=accountant)
  first = ledger_lib.PrivacyLedger.load_or_create(workdir, **params)
  assert first.steps == 0 and first.epsilon() == 0.0
  first.record_steps(10)
  del first  # "Kill": nothing survives but the file.
  resumed = ledger_lib.PrivacyLedger.load_or_create(workdir, **params)
  assert resumed.steps == 10
  assert resumed.epsilon_so_far == pytest.approx(_eps(10, accountant=accountant))
  eps = resumed.record_steps(5)
  assert resumed.steps == 15
  assert eps == pytest.approx(_eps(15, accountant=accountant))
  with open(os.path.join(workdir, 'privacy_ledger.json')) as f:
    record = json.load(f)
  assert record['steps'] == 15 and record['epsilon_so_far'] == pytest.approx(eps)
  for key, value in params.items():
    assert record[key] == value
  assert record['noise_seed_provenance'] == 'os-entropy'
  assert [n for n in os.listdir(workdir) if n.endswith('.tmp')] == []  # No temp files left.


@pytest.mark.parametrize('field, value', [('sampling_rate', 0.02), ('noise_multiplier', 1.2),
                                          ('l2_clip_norm', 0.5), ('delta', 1e-6),
                                          ('dataset_size', 20000), ('accountant', 'pld'),
                                          ('target_epsilon', 8.0)])
def test_resume_with_a_different_mechanism_is_refused(tmp_path, field, value):
  ledger_lib.PrivacyLedger.load_or_create(str(tmp_path), **PARAMS).record_steps(3)
  with pytest.raises(ValueError, match=f'cannot resume with {field}='):
    ledger_lib.PrivacyLedger.load_or_create(str(tmp_path), **dict(PARAMS, **{field: value}))
  # Float noise from recomputing q = B / N is not a mismatch.
  q = PARAMS['sampling_rate'] * (1 + 1e-12)
  assert ledger_lib.PrivacyLedger.load_or_create(str(tmp_path),
                                                 **dict(PARAMS, sampling_rate=q)).steps == 3


def test_budget_check(tmp_path):
  target = _eps(100)
  ledger = ledger_lib.PrivacyLedger.load_or_create(str(tmp_path),
                                                   **dict(PARAMS, target_epsilon=target))
  ledger.record_steps(90)
  assert ledger.can_take(10)
  assert not ledger.can_take(11)
  ledger.record_steps(10)
  assert not ledger.can_take(1) and ledger.can_take(0)
  untargeted = ledger_lib.PrivacyLedger.load_or_create(str(tmp_path / 'b'),
                                                       **dict(PARAMS, target_epsilon=None))
  assert untargeted.can_take(10**6)


def test_atomic_write_keeps_the_old_ledger_on_failure(tmp_path, monkeypatch):
  ledger = ledger_lib.PrivacyLedger.load_or_create(str(tmp_path), **PARAMS)
  ledger.record_steps(4)

  def crash(*args):
    raise OSError('disk full')

  monkeypatch.setattr(ledger_lib.os, 'replace', crash)
  with pytest.raises(OSError, match='disk full'):
    ledger.record_steps(6)
  monkeypatch.undo()
  assert ledger_lib.PrivacyLedger.load_or_create(str(tmp_path), **PARAMS).steps == 4
  assert sorted(os.listdir(tmp_path)) == ['privacy_ledger.json']


def test_corrupt_ledger_names_the_file(tmp_path):
  path = tmp_path / 'privacy_ledger.json'
  path.write_text('{"steps": 3')
  with pytest.raises(ValueError, match='privacy_ledger.json is not a readable privacy ledger'):
    ledger_lib.PrivacyLedger.load_or_create(str(tmp_path), **PARAMS)


def test_invalid_parameters_and_delta_warning(tmp_path):
  with pytest.raises(ValueError, match='sampling_rate'):
    ledger_lib.PrivacyLedger.load_or_create(str(tmp_path), **dict(PARAMS, sampling_rate=0.0))
  with pytest.raises(ValueError, match='l2_clip_norm'):
    ledger_lib.PrivacyLedger.load_or_create(str(tmp_path), **dict(PARAMS, l2_clip_norm=0.0))
  with pytest.raises(ValueError, match='unreachable'):
    ledger_lib.PrivacyLedger.load_or_create(str(tmp_path), **dict(PARAMS, target_epsilon=0.0))
  with pytest.warns(UserWarning, match='1/N'):
    ledger_lib.PrivacyLedger.load_or_create(str(tmp_path), **dict(PARAMS, delta=1e-3))
  with pytest.raises(ValueError, match='n must be an integer >= 0'):
    ledger_lib.PrivacyLedger.load_or_create(str(tmp_path / 'x'), **PARAMS).record_steps(-1)


def test_noise_base_key_provenance():
  key_a, prov_a = ledger_lib.noise_base_key(None)
  key_b, _ = ledger_lib.noise_base_key(None)
  assert prov_a == 'os-entropy'
  assert not np.array_equal(jax.random.key_data(key_a), jax.random.key_data(key_b))
  fixed_a, prov = ledger_lib.noise_base_key(42)
  fixed_b, _ = ledger_lib.noise_base_key(42)
  assert prov == 'fixed-seed (NOT SECURE: tests only)'
  np.testing.assert_array_equal(jax.random.key_data(fixed_a), jax.random.key_data(fixed_b))
  jax.random.normal(jax.random.fold_in(key_a, 3), (2,))  # Usable as a key.


def test_key_from_seed_keeps_64_bits():
  low = ledger_lib.key_from_seed(7)
  high = ledger_lib.key_from_seed(2**62 + 7)  # jax.random.PRNGKey would drop the high bits.
  legacy = jax.random.PRNGKey(7)
  np.testing.assert_array_equal(jax.random.key_data(low), jax.random.key_data(legacy))
  assert not np.array_equal(jax.random.key_data(low), jax.random.key_data(high))
  with pytest.raises(ValueError, match='seed'):
    ledger_lib.key_from_seed(-1)
  with pytest.raises(ValueError, match='seed'):
    ledger_lib.key_from_seed(2**64)


def test_record_total_after_resuming_from_an_older_checkpoint(tmp_path):
  ledger = ledger_lib.PrivacyLedger.load_or_create(str(tmp_path), **PARAMS)
  ledger.record_total(100)  # Logged at step 100; the last checkpoint was at step 50.
  resumed = ledger_lib.PrivacyLedger.load_or_create(str(tmp_path), **PARAMS)
  assert resumed.record_total(60) == pytest.approx(_eps(100))  # Re-taken steps: no change.
  assert resumed.steps == 100
  resumed.record_total(120)
  assert resumed.steps == 120 and resumed.epsilon_so_far == pytest.approx(_eps(120))


def test_fixed_seed_segment_flags_the_whole_run(tmp_path):
  ledger_lib.PrivacyLedger.load_or_create(str(tmp_path), **PARAMS)
  resumed = ledger_lib.PrivacyLedger.load_or_create(
      str(tmp_path), noise_seed_provenance=ledger_lib.FIXED_SEED, **PARAMS)
  assert resumed.noise_seed_provenance == ledger_lib.FIXED_SEED
  again = ledger_lib.PrivacyLedger.load_or_create(str(tmp_path), **PARAMS)
  assert again.noise_seed_provenance == ledger_lib.FIXED_SEED
