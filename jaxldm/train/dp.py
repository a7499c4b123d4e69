"""DP-SGD plumbing shared by the trainers (autoencoder and LDM): one place for every privacy step.

  dp_config(...)        the `dp` config group (both trainers' configs use it)
  setup(...)            sigma (given, or calibrated to dp.target_epsilon), the ledger, the secret
                        seeds, the Poisson batcher and the step budget -> PrivateRun
  run.step_inputs(...)  the Poisson batch of a step, padded, masked and sharded, and its noise key
  private_gradient(...) `noise.private_grad` with the config's clipping, plus aggregate metrics
  run.record(...)       what the run record says about privacy

A trainer supplies only its per-example loss. Keeping this in one module keeps the two trainers
from drifting apart on the parts that carry the guarantee (DESIGN.md, "Privacy invariants").

Multi-host: process 0 owns the files (ledger, secrets); the seeds are broadcast so every process
samples the same batches and draws the same noise, and every process keeps the same accounting in
memory so all of them stop at the same step.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from ml_collections import config_dict

from jaxldm.atomic import atomic_open
from jaxldm.config import ConfigError
from jaxldm.train import common, distributed


def dp_config(*, private: bool, tiny: bool) -> ml_collections.ConfigDict:
  """The `dp` group. private=False gives the disabled form (non-private baselines)."""
  c = ml_collections.ConfigDict()
  c.enabled = private  # DP-SGD on (privacy settings below) or off (non-private baseline).
  c.target_epsilon = 10.0  # Budget; training stops before exceeding it.
  c.delta = 1e-5  # Delta (should be < 1/N).
  c.noise_multiplier = 0.0  # Sigma; 0 = calibrate to target_epsilon over train.steps.
  c.l2_clip_norm = 1.0  # Per-example clipping norm C (paper: 1).
  c.per_layer = False  # Clip each parameter tensor to C/sqrt(k) instead of the whole gradient to C (sensitivity C either way).
  c.expected_batch_size = 8 if tiny else 256  # q * N: Poisson sampling rate times dataset size (paper: 256).
  c.microbatch_size = 8 if tiny else 32  # Examples per vmapped chunk (memory bound; same result).
  c.accountant = "rdp" if tiny else "pld"  # "pld" (tighter) or "rdp".
  c.noise_seed = config_dict.placeholder(int)  # Fixed noise/sampling seed: TESTS ONLY (flagged insecure).
  return c


def _memory_ledger(ledger_cls, **fields):
  """Processes other than 0: the same accounting as process 0's ledger, kept in memory only."""
  ledger = ledger_cls(**fields)
  ledger._write = lambda: None  # Process 0 owns the file; this copy only counts.
  return ledger


@dataclasses.dataclass
class PrivateRun:
  """What a DP training loop needs, built once by `setup`."""
  ledger: Any                 # jaxldm.privacy.ledger.PrivacyLedger (file on process 0).
  batcher: Any                # jaxldm.privacy.sampling.PoissonBatcher (secret sampling seed).
  noise_key: jax.Array        # Base key of the DP noise (secret); step s uses fold_in(key, s).
  noise_multiplier: float     # Sigma actually used (given or calibrated).
  allowed_steps: int          # Steps the budget allows (<= train.steps).
  per_layer: bool             # Per-layer clipping (dp.per_layer).

  @property
  def expected_batch_size(self) -> float:
    return self.batcher.expected_batch_size

  def step_inputs(self, examples, step: int, mesh: jax.sharding.Mesh):
    """(batch, mask, num_microbatches, rng) of step `step`: a pure function of the secrets and step.

    The same on every process (same seeds), so the global batch can be assembled from each
    process's rows, and the noise key is the same everywhere (noise drawn once, globally).
    """
    sb = self.batcher.batch(step)
    batch, mask = common.shard_batch((jax.tree_util.tree_map(lambda a: a[sb.indices], examples),
                                      sb.mask.astype(np.float32)), mesh)
    return batch, mask, jnp.asarray(sb.num_microbatches, jnp.int32), jax.random.fold_in(self.noise_key, step)

  def record_steps(self, total_steps: int) -> float:
    """Epsilon after steps 1..total_steps; process 0 writes the ledger first (it may over-count,
    never under-count: call it before anything computed from these steps leaves the loop)."""
    return self.ledger.record_total(total_steps)

  def record(self, epsilon: float, stopped_for_budget: bool) -> dict:
    ledger = self.ledger
    return dict(epsilon=epsilon, delta=ledger.delta, noise_multiplier=ledger.noise_multiplier,
                sampling_rate=ledger.sampling_rate, l2_clip_norm=ledger.l2_clip_norm,
                per_layer=self.per_layer, accountant=ledger.accountant,
                noise_seed=ledger.noise_seed_provenance, stopped_for_budget=stopped_for_budget)

  def summary(self, steps: int, stopped_for_budget: bool) -> str:
    ledger = self.ledger
    return (f"DP: epsilon {ledger.epsilon(steps):.3f} at delta {ledger.delta:g} after {steps} steps "
            f"(sigma {ledger.noise_multiplier:.4f}, q {ledger.sampling_rate:.4g}, {ledger.accountant}"
            f"{', per-layer clipping' if self.per_layer else ''})"
            + (" — stopped: the next step would exceed the budget" if stopped_for_budget else ""))


def setup(dp: ml_collections.ConfigDict, workdir: pathlib.Path, n: int, steps: int, console,
          num_devices: int) -> PrivateRun:
  """Sigma, ledger, secret seeds, Poisson batcher and step budget of a DP run over n examples.

  Raises:
    ConfigError: a sampling rate outside (0, 1], an unreachable target epsilon, or a workdir whose
      ledger records another mechanism (each names the config key or the file).
  """
  from jaxldm.privacy import accounting, ledger as ledger_lib, sampling

  workdir = pathlib.Path(workdir)
  q = dp.expected_batch_size / n
  if not 0 < q <= 1:
    raise ConfigError(f"config key 'dp.expected_batch_size': {dp.expected_batch_size} gives sampling rate "
                      f"{q:.4g} for {n} examples; it must be in (0, N]")
  if not dp.l2_clip_norm > 0:
    raise ConfigError(f"config key 'dp.l2_clip_norm': {dp.l2_clip_norm}; the clip norm must be > 0")
  if dp.microbatch_size < 1:
    raise ConfigError(f"config key 'dp.microbatch_size': {dp.microbatch_size}; it must be >= 1")
  sigma = dp.noise_multiplier
  if sigma <= 0:
    try:
      sigma = accounting.calibrate_noise_multiplier(target_epsilon=dp.target_epsilon, sampling_rate=q,
                                                    steps=steps, delta=dp.delta, accountant=dp.accountant)
    except ValueError as e:
      raise ConfigError(f"config key 'dp.target_epsilon': {e}") from e
  sigma = float(sigma)
  provenance = ledger_lib.FIXED_SEED if dp.noise_seed is not None else ledger_lib.OS_ENTROPY
  fields = dict(sampling_rate=q, noise_multiplier=sigma, l2_clip_norm=dp.l2_clip_norm, delta=dp.delta,
                dataset_size=n, accountant=dp.accountant, target_epsilon=dp.target_epsilon,
                noise_seed_provenance=provenance)
  if distributed.is_primary():
    try:
      ledger = ledger_lib.PrivacyLedger.load_or_create(str(workdir), **fields)
    except ValueError as e:
      raise ConfigError(str(e)) from e
    seeds = _load_or_create_seeds(workdir, dp.noise_seed)
  else:
    ledger, seeds = None, {"noise_seed": 0, "sampling_seed": 0}
  # Every process: process 0's seeds and step count (same batches, same noise, same budget).
  seeds = distributed.broadcast_seeds(seeds)
  taken = distributed.broadcast_int(ledger.steps if ledger is not None else 0)
  if ledger is None:
    ledger = _memory_ledger(ledger_lib.PrivacyLedger, path=str(workdir / ledger_lib.LEDGER_FILENAME),
                            steps=taken, **fields)

  # One static padded size, a multiple of microbatch x devices so the batch shards evenly.
  multiple = dp.microbatch_size * num_devices
  batcher = sampling.PoissonBatcher(n, q, seeds["sampling_seed"], microbatch_size=dp.microbatch_size,
                                    max_size=sampling.max_batch_size(n, q, multiple))
  noise_key = ledger_lib.key_from_seed(seeds["noise_seed"])  # All 63 bits (PRNGKey keeps 32).
  allowed = _allowed_steps(ledger, dp.target_epsilon, steps)
  if allowed < steps:
    console.print(f"[yellow]budget: epsilon {dp.target_epsilon} allows {allowed} of {steps} steps[/]")
  console.print(f"DP-SGD: q = {q:.4g} (expected batch {dp.expected_batch_size}), sigma = {sigma:.4f}, "
                f"C = {dp.l2_clip_norm}{' per layer' if dp.per_layer else ''}, delta = {dp.delta:g}, "
                f"{dp.accountant.upper()} accountant, noise seed: {ledger.noise_seed_provenance}; "
                f"padded batch {batcher.max_size}")
  return PrivateRun(ledger=ledger, batcher=batcher, noise_key=noise_key, noise_multiplier=sigma,
                    allowed_steps=allowed, per_layer=bool(dp.per_layer))


def _load_or_create_seeds(workdir: pathlib.Path, fixed: int | None) -> dict[str, int]:
  """The secret seeds live in the workdir (never in logs) so a resumed run continues exactly."""
  path = workdir / "dp_secrets.json"
  if path.is_file():
    return json.loads(path.read_text())
  entropy = lambda: int.from_bytes(os.urandom(8), "little") >> 1
  seeds = {"noise_seed": fixed if fixed is not None else entropy(),
           "sampling_seed": fixed + 1 if fixed is not None else entropy()}
  with atomic_open(path, private=True) as f:  # 0600 from the first byte.
    json.dump(seeds, f)
  return seeds


def _allowed_steps(ledger, target_epsilon: float, steps: int) -> int:
  """The largest step count whose epsilon stays within the target."""
  if not target_epsilon > 0 or ledger.epsilon(steps) <= target_epsilon * (1 + 1e-9):
    return steps
  lo, hi = ledger.steps, steps
  while lo < hi:
    mid = (lo + hi + 1) // 2
    if ledger.epsilon(mid) <= target_epsilon:
      lo = mid
    else:
      hi = mid - 1
  return lo


def private_gradient(loss_fn, params, batch, mask, num_microbatches, rng, *, dp: ml_collections.ConfigDict,
                     noise_multiplier: float, expected_batch_size: float, has_aux: bool = False):
  """The DP-SGD gradient of one Poisson batch and its aggregate metrics (call under jit).

  Args:
    loss_fn: `loss_fn(params, example, rng)` of ONE example; with has_aux, `(loss, aux)` where aux
      is a dict of scalars (averaged over the real examples for the metrics).
    rng: fold_in(noise base key, step); `noise.private_grad` splits it into per-example keys and
      the one noise key of this logical batch.

  Returns:
    (noisy gradient like params, metrics). Aggregates only (invariant 7): nothing per example
    leaves the step.
  """
  from jaxldm.privacy import noise

  grads, aux = noise.private_grad(
      loss_fn, params, batch, rng, l2_clip_norm=dp.l2_clip_norm, noise_multiplier=noise_multiplier,
      expected_batch_size=expected_batch_size, mask=mask, microbatch_size=dp.microbatch_size,
      num_microbatches=num_microbatches, has_aux=has_aux, per_layer=bool(dp.per_layer))
  real = jnp.maximum(mask.sum(), 1)
  mean = lambda v: (v * mask).sum() / real
  metrics = {"loss": mean(aux["loss"]), "grad_norm": common.global_norm(grads),
             "clipped_fraction": aux["clipped_fraction"]}
  if has_aux:
    metrics.update({name: mean(value) for name, value in aux["aux"].items()})
  return grads, metrics
