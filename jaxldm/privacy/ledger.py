"""The run's privacy ledger: a JSON record in the workdir of what the privacy budget has paid for.

Why a separate file from the checkpoint: the ledger is the human- and auditor-readable statement of
the guarantee (q, sigma, C, delta, steps actually taken, epsilon so far, where the noise seed came
from, the settings and the dataset fingerprint the guarantee depends on, and the earlier stages on
the same private data it composes with), and it must survive restarts exactly. docs/privacy.md,
"Exact accounting": accounting composes exactly the steps taken with the q and sigma used, so
resuming with a different mechanism, other settings or other data is refused, and `can_take` lets
the trainer stop BEFORE the target would be exceeded.

Writes are atomic (temporary file in the same directory, fsync, os.replace): a crash mid-write
leaves the previous ledger, never a truncated one.

When to record: the ledger may over-count, never under-count. Record the steps BEFORE anything
that depends on them leaves the process (a checkpoint, samples, a model export): a crash between
the two then leaves a ledger that counts a few steps the checkpoint lacks (safe), never the reverse.
Steps lost in a crash that never left the process cost nothing.
"""

import dataclasses
import datetime
import json
import math
import os
import secrets
from typing import Any

import jax
import numpy as np

from jaxldm.atomic import atomic_open
from jaxldm.privacy import accounting

LEDGER_FILENAME = 'privacy_ledger.json'
OS_ENTROPY = 'os-entropy'
FIXED_SEED = 'fixed-seed (NOT SECURE: tests only)'
_FORMAT_VERSION = 2
# Resuming with another value of any of these would make the ledger lie about the steps already
# taken (the mechanism and data) or quietly move the budget (target_epsilon: to spend more, start a
# new workdir or edit the ledger deliberately).
_FIXED_FIELDS = ('sampling_rate', 'noise_multiplier', 'l2_clip_norm', 'delta', 'dataset_size',
                     'accountant', 'target_epsilon')


def key_from_seed(seed: int) -> jax.Array:
  """A JAX key holding all 64 bits of `seed` (0 <= seed < 2^64).

  Why not `jax.random.PRNGKey(seed)`: without jax_enable_x64 it keeps only the low 32 bits, so a
  64-bit secret seed silently becomes a 32-bit one (PRNGKey(2**62 + 7) == PRNGKey(7)). For seeds
  below 2^32 the key equals PRNGKey(seed)'s.
  """
  seed = int(seed)
  if not 0 <= seed < 2**64:
    raise ValueError(f'seed must be in [0, 2^64), got {seed}.')
  return jax.random.wrap_key_data(np.array([seed >> 32, seed & 0xFFFFFFFF], np.uint32))


def noise_base_key(seed: int | None) -> tuple[jax.Array, str]:
  """The run's base key for DP noise and its provenance string for the ledger.

  seed None: 64 bits from the OS entropy pool (`secrets`), the only setting that is private: the
  noise must be unpredictable to an adversary, and a seed in a config file is not. An int seed is
  for tests and reproductions only and is flagged as such. Step s then uses
  fold_in(base_key, s) as the `rng` of `noise.private_grad` (which derives the rest).
  """
  if seed is None:
    return key_from_seed(secrets.randbits(64)), OS_ENTROPY
  return key_from_seed(seed), FIXED_SEED


def _now() -> str:
  return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')


def _same(a: Any, b: Any) -> bool:
  if isinstance(a, float) or isinstance(b, float):
    return a is not None and b is not None and math.isclose(a, b, rel_tol=1e-9, abs_tol=0.0)
  return a == b


@dataclasses.dataclass
class PrivacyLedger:
  """Privacy state of one run; `path` is the JSON file it lives in."""
  path: str
  sampling_rate: float
  noise_multiplier: float
  l2_clip_norm: float
  delta: float
  dataset_size: int
  accountant: str = 'pld'
  target_epsilon: float | None = None
  noise_seed_provenance: str = OS_ENTROPY
  # Settings the guarantee depends on, by config key (e.g. 'data.fingerprint', 'dp.per_layer'):
  # a resume that changes any is refused naming the key.
  pinned: dict = dataclasses.field(default_factory=dict)
  # Earlier DP stages on the same private data (each: stage, workdir, sampling_rate,
  # noise_multiplier, steps, delta, accountant): `composed_epsilon` composes them with this run.
  upstream: list = dataclasses.field(default_factory=list)
  steps: int = 0
  epsilon_so_far: float = 0.0
  created: str = ''
  updated: str = ''

  @classmethod
  def load_or_create(cls, workdir: str, *, sampling_rate: float, noise_multiplier: float,
                     l2_clip_norm: float, delta: float, dataset_size: int,
                     accountant: str = 'pld', target_epsilon: float | None = None,
                     noise_seed_provenance: str = OS_ENTROPY, pinned: dict | None = None,
                     upstream: list | None = None) -> 'PrivacyLedger':
    """Resumes the ledger in `workdir`, or creates it (and the workdir) if absent.

    `pinned` maps config keys to the values the guarantee depends on; `upstream` lists the earlier
    DP stages on the same data (replaced by the current list on resume: they may have trained on).

    Raises:
      ValueError: invalid parameters, or an existing ledger with a different mechanism or pinned
        setting (names the field or config key): the steps already taken were paid for with the
        recorded values.
    """
    pinned = dict(pinned or {})
    accounting.check_params(noise_multiplier=noise_multiplier, sampling_rate=sampling_rate,
                            delta=delta, target_epsilon=target_epsilon, accountant=accountant)
    if not l2_clip_norm > 0:
      raise ValueError(f'l2_clip_norm must be > 0, got {l2_clip_norm}.')
    if dataset_size < 1:
      raise ValueError(f'dataset_size must be >= 1, got {dataset_size}.')
    accounting.warn_if_delta_too_large(delta, dataset_size)
    path = os.path.join(workdir, LEDGER_FILENAME)
    wanted = dict(sampling_rate=sampling_rate, noise_multiplier=noise_multiplier,
                  l2_clip_norm=l2_clip_norm, delta=delta, dataset_size=dataset_size,
                  accountant=accountant, target_epsilon=target_epsilon)
    if not os.path.exists(path):
      os.makedirs(workdir, exist_ok=True)
      now = _now()
      ledger = cls(path=path, noise_seed_provenance=noise_seed_provenance, created=now,
                   updated=now, pinned=pinned, upstream=list(upstream or []), **wanted)
      ledger._write()
      return ledger
    ledger = cls.load(path)
    for name in _FIXED_FIELDS:
      if not _same(getattr(ledger, name), wanted[name]):
        raise ValueError(
            f'{path}: cannot resume with {name}={wanted[name]!r}, the ledger records '
            f'{name}={getattr(ledger, name)!r} for the {ledger.steps} steps already taken. Resume '
            'with the recorded value, or start a new run in a new workdir.')
    for key, value in pinned.items():
      if key not in ledger.pinned and ledger.steps == 0:
        continue
      if key not in ledger.pinned or not _same(ledger.pinned[key], value):
        recorded = repr(ledger.pinned[key]) if key in ledger.pinned else 'nothing (an older ledger)'
        raise ValueError(
            f"{path}: cannot resume with config key '{key}' = {value!r}; the ledger records "
            f'{recorded} for the {ledger.steps} steps already taken. Resume with the recorded '
            'setting (and the same private data), or start a new run in a new workdir.')
    ledger.pinned.update(pinned)
    if upstream is not None:
      ledger.upstream = list(upstream)
    if noise_seed_provenance != ledger.noise_seed_provenance:
      # A run is only as secure as its weakest segment: once fixed, always flagged.
      if FIXED_SEED in (noise_seed_provenance, ledger.noise_seed_provenance):
        ledger.noise_seed_provenance = FIXED_SEED
      ledger._write()
    return ledger

  @classmethod
  def load(cls, path: str) -> 'PrivacyLedger':
    """Reads a ledger file; raises ValueError naming the file if it is not a ledger."""
    try:
      with open(path) as f:
        record = json.load(f)
      record.pop('format_version')
      record.setdefault('pinned', {})  # Format 1 pinned nothing.
      record.setdefault('upstream', [])
      return cls(path=path, **record)
    except (OSError, ValueError, KeyError, TypeError) as e:
      raise ValueError(f'{path} is not a readable privacy ledger ({e}). Restore it from a backup '
                       'or start a new run in a new workdir.') from e

  def epsilon(self, steps: int | None = None) -> float:
    """Epsilon after `steps` steps (default: the steps taken so far)."""
    return accounting.epsilon(noise_multiplier=self.noise_multiplier,
                              sampling_rate=self.sampling_rate,
                              steps=self.steps if steps is None else steps, delta=self.delta,
                              accountant=self.accountant)

  def composed_epsilon(self, steps: int | None = None) -> float:
    """Epsilon of this run composed with its `upstream` stages (same data), at this run's delta."""
    stages = [dict(noise_multiplier=u['noise_multiplier'], sampling_rate=u['sampling_rate'],
                   steps=u['steps']) for u in self.upstream]
    stages.append(dict(noise_multiplier=self.noise_multiplier, sampling_rate=self.sampling_rate,
                       steps=self.steps if steps is None else steps))
    return accounting.composed_epsilon(stages, delta=self.delta, accountant=self.accountant)

  def can_take(self, n_more_steps: int = 1) -> bool:
    """False if n more steps would push epsilon above the target (always True without one)."""
    if n_more_steps < 0:
      raise ValueError(f'n_more_steps must be >= 0, got {n_more_steps}.')
    if self.target_epsilon is None:
      return True
    return self.epsilon(self.steps + n_more_steps) <= self.target_epsilon

  def record_steps(self, n: int) -> float:
    """Adds n taken steps, recomputes epsilon, writes atomically; returns epsilon so far."""
    if n < 0 or int(n) != n:
      raise ValueError(f'n must be an integer >= 0, got {n}.')
    self.steps += int(n)
    self.epsilon_so_far = self.epsilon()
    self.updated = _now()
    self._write()
    return self.epsilon_so_far

  def record_total(self, total_steps: int) -> float:
    """Records that steps 1..total_steps have been taken (no-op if already counted).

    For a trainer that resumes from a checkpoint older than the ledger and re-takes steps the
    ledger already counts. Counting them once is right ONLY if a re-taken step is the same
    mechanism output as the first time: same batch (step-seeded sampling) and same noise
    (the noise base key persisted and reused, fold_in(base_key, step)). With a fresh noise key
    after a restart, re-taken steps are new releases: use `record_steps` for them instead.
    """
    if total_steps < 0 or int(total_steps) != total_steps:
      raise ValueError(f'total_steps must be an integer >= 0, got {total_steps}.')
    return self.record_steps(max(0, int(total_steps) - self.steps))

  def _write(self) -> None:
    record = dataclasses.asdict(self)
    del record['path']
    record['format_version'] = _FORMAT_VERSION
    with atomic_open(self.path) as f:
      json.dump(record, f, indent=2, sort_keys=True)
      f.write('\n')
