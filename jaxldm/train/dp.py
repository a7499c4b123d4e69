"""DP-SGD plumbing shared by the trainers (autoencoder and LDM): one place for every privacy step.

  dp_config(...)        the `dp` config group (both trainers' configs use it)
  setup(...)            sigma (given, or calibrated to dp.target_epsilon), the ledger, the secret
                        seeds, the Poisson batcher and the step budget -> PrivateRun
  run.step_inputs(...)  the Poisson batch of a step, padded, masked and sharded, and its noise key
  private_gradient(...) `noise.private_grad` with the config's clipping, plus aggregate metrics
  run.record(...)       what the run record says about privacy

A trainer supplies only its per-example loss. Keeping this in one module keeps the two trainers
from drifting apart on the parts that carry the guarantee (docs/privacy.md).

Resumes (docs/privacy.md, "Exact accounting"): every start of a run is a new *attempt*, counted in
the secrets file; the noise key and the sampling seed of an attempt fold the attempt in, so steps
re-taken after a crash (from a checkpoint older than the ledger) are fresh mechanism invocations and
are counted again: the ledger may over-count, never under-count. A ledger that records steps
without its secrets file, a checkpoint ahead of the ledger, or a change of any pinned setting
(data fingerprint, clipping, trainable set, K, released statistics) is refused.

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

from jaxldm import fitting
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
  c.microbatch_loop = "auto"  # "accumulate": the host adds one program's microbatch sums (CPU); "host": the cut batch in one vmap; "traced": one program, a loop (accelerators); "auto".
  c.stats_weight = 0.1  # Sensitivity of each logged statistic (loss, clipped fraction) as a fraction of C; 0 logs none.
  c.stats_bound = 1.0  # Per-example losses are clipped to [-B, B] before their noisy mean is logged.
  return c


def _memory_ledger(ledger_cls, **fields):
  """Processes other than 0: the same accounting as process 0's ledger, kept in memory only."""
  ledger = ledger_cls(**fields)
  ledger._write = lambda: None  # Process 0 owns the file; this copy only counts.
  return ledger


MICROBATCH_LOOPS = ("auto", "accumulate", "host", "traced")


def microbatch_loop(dp: ml_collections.ConfigDict) -> str:
  """dp.microbatch_loop resolved: "auto" is "accumulate" on CPU and "traced" on accelerators.

  Why (benchmarks/NOTES.md): XLA:CPU runs a loop or conditional body about 2x slower than the same
  computation outside control flow (tiny UNet: 1,846 ms with a traced loop over ONE microbatch of 8
  vs 846 ms for the same 8 examples vmapped), so on CPU the Poisson batch is cut on the host to
  the microbatches holding real examples (only padding is cut). "host" then vmaps the cut batch
  whole: one program per distinct size, each a full compile (43-45 s for the demo's UNet; the demo
  met two or three sizes). "accumulate" runs ONE program per microbatch and adds the clipped sums
  on the device, then one small program adds the noise and updates: two programs in all, and the
  same per-example cost (16 rows 0.74 s, 32 rows 1.50 s). On accelerators the traced loop keeps
  ONE program and bounds memory by the microbatch.
  """
  mode = dp.get("microbatch_loop", "auto")
  if mode not in MICROBATCH_LOOPS:
    raise ConfigError(f"config key 'dp.microbatch_loop': {mode!r}; choose one of {', '.join(MICROBATCH_LOOPS)}")
  if mode == "auto":
    return "accumulate" if jax.default_backend() == "cpu" else "traced"
  return mode


def host_dispatch(dp: ml_collections.ConfigDict) -> bool:
  """Whether the padded Poisson batch is cut on the host to the microbatches holding real examples
  (to ceil(real / (m x devices)) x m x devices rows: "host" and "accumulate"; `microbatch_loop`)."""
  return microbatch_loop(dp) in ("host", "accumulate")


@dataclasses.dataclass
class PrivateRun:
  """What a DP training loop needs, built once by `setup`; `resume_at` once the checkpoint is known."""
  ledger: Any                 # jaxldm.privacy.ledger.PrivacyLedger (file on process 0).
  batcher: Any                # jaxldm.privacy.sampling.PoissonBatcher (secret, per-attempt seed).
  noise_key: jax.Array        # This attempt's base key of the DP noise; step s uses fold_in(key, s).
  noise_multiplier: float     # Sigma actually used (given or calibrated).
  allowed_steps: int          # Steps the budget allows (<= train.steps), as a step index.
  per_layer: bool             # Per-layer clipping (dp.per_layer).
  attempt: int = 0            # Starts of this run so far, this one included, minus one.
  steps: int = 0              # train.steps.
  console: Any = None
  start: int = 0              # The step the loop resumes from (checkpoint).
  ledger_steps_at_start: int = 0  # Mechanism invocations the ledger counted before this attempt.
  host_dispatch: bool = False # Cut each batch to its real microbatches (see `host_dispatch`).
  row_multiple: int = 1       # microbatch size x devices: the batch's rows are a multiple of it.

  @property
  def expected_batch_size(self) -> float:
    return self.batcher.expected_batch_size

  @property
  def l2_clip_norm(self) -> float:
    return float(self.ledger.l2_clip_norm)  # The C the ledger accounts for (pinned on resume).

  def mechanism(self) -> tuple[float, float, float]:
    """(sigma, expected batch size, C): the private step's traced arguments, in that order.

    Traced, not baked into the program: runs that differ only in them (an epsilon, a clip-norm or
    a batch-size sweep; a resumed run) share one compiled step.
    """
    return self.noise_multiplier, self.expected_batch_size, self.l2_clip_norm

  def resume_at(self, start: int) -> int:
    """Fixes the step the loop resumes from; returns the last step index the budget allows.

    Every step this attempt executes is a new invocation of the mechanism (fresh noise and batch),
    counted on top of what the ledger already holds, even a step the ledger counted before a crash.

    Raises:
      ConfigError: a checkpoint ahead of the ledger (the ledger would under-count).
    """
    if start > self.ledger.steps:
      raise ConfigError(f"{self.ledger.path}: the checkpoint is at step {start} but the ledger counts only "
                        f"{self.ledger.steps} steps; the ledger would under-count. Restore the run's ledger, "
                        "or start a new run in a new workdir")
    self.start, self.ledger_steps_at_start = int(start), int(self.ledger.steps)
    allowed = _allowed_count(self.ledger, self.ledger.target_epsilon, self.ledger.steps + self.steps - start)
    self.allowed_steps = start + allowed - self.ledger.steps
    if self.allowed_steps < self.steps and self.console is not None:
      retaken = f" ({self.ledger.steps - start} re-taken after a crash count again)" if self.ledger.steps > start else ""
      self.console.print(f"[yellow]budget: epsilon {self.ledger.target_epsilon} allows {self.allowed_steps - start} "
                         f"more of the {self.steps - start} remaining steps{retaken}[/]")
    return self.allowed_steps

  def rows_needed(self, step: int) -> int:
    """Rows of step `step`'s batch after the cut: its real examples rounded up to the row multiple."""
    return self._rows(self.batcher.batch(step)) if self.host_dispatch else self.batcher.max_size

  def _rows(self, sb) -> int:
    return max(1, -(-int(sb.mask.sum()) // self.row_multiple)) * self.row_multiple

  def step_inputs(self, examples, step: int, mesh: jax.sharding.Mesh, rows: int | None = None):
    """(batch, mask, num_microbatches, rng) of step `step`: a pure function of the secrets, attempt, step.

    The same on every process (same seeds), so the global batch can be assembled from each
    process's rows, and the noise key is the same everywhere (noise drawn once, globally). With
    host dispatch the batch is cut to `rows` (default `rows_needed(step)`): padding only.
    """
    sb = self.batcher.batch(step)
    indices, mask = sb.indices, sb.mask
    if self.host_dispatch:
      rows = self._rows(sb) if rows is None else rows
      if mask[rows:].any():  # Never drop a sampled example (docs/privacy.md, "Poisson batches").
        raise RuntimeError(f"step {step}: cutting the batch to {rows} rows would drop sampled examples")
      indices, mask = indices[:rows], mask[:rows]
    batch, mask = common.shard_batch((jax.tree_util.tree_map(lambda a: a[indices], examples),
                                      mask.astype(np.float32)), mesh)
    return batch, mask, jnp.asarray(sb.num_microbatches, jnp.int32), jax.random.fold_in(self.noise_key, step)

  def record_steps(self, done: int) -> float:
    """Epsilon after the steps of this attempt up to step `done`; process 0 writes the ledger first
    (call it before anything computed from these steps leaves the loop)."""
    return self.ledger.record_total(self.ledger_steps_at_start + max(0, int(done) - self.start))

  def record(self, epsilon: float, stopped_for_budget: bool) -> dict:
    ledger = self.ledger
    out = dict(epsilon=epsilon, delta=ledger.delta, noise_multiplier=ledger.noise_multiplier,
               sampling_rate=ledger.sampling_rate, l2_clip_norm=ledger.l2_clip_norm,
               per_layer=self.per_layer, accountant=ledger.accountant, mechanism_steps=ledger.steps,
               noise_seed=ledger.noise_seed_provenance, stopped_for_budget=stopped_for_budget,
               data_fingerprint=ledger.pinned.get("data.fingerprint"))
    if ledger.upstream:
      out["stages"] = [dict(u) for u in ledger.upstream] + [dict(
          stage="this run", epsilon=epsilon, steps=ledger.steps, noise_multiplier=ledger.noise_multiplier,
          sampling_rate=ledger.sampling_rate)]
      out["composed_epsilon"] = ledger.composed_epsilon()
    return out

  def summary(self, stopped_for_budget: bool) -> str:
    ledger = self.ledger
    composed = (f"; composed with {len(ledger.upstream)} earlier stage(s) on the same data: epsilon "
                f"{ledger.composed_epsilon():.3f}" if ledger.upstream else "")
    return (f"DP: epsilon {ledger.epsilon():.3f} at delta {ledger.delta:g} after {ledger.steps} mechanism steps "
            f"(sigma {ledger.noise_multiplier:.4f}, q {ledger.sampling_rate:.4g}, {ledger.accountant}"
            f"{', per-layer clipping' if self.per_layer else ''}){composed}"
            + (" — stopped: the next step would exceed the budget" if stopped_for_budget else ""))


def pinned_settings(dp: ml_collections.ConfigDict, data_fingerprint: str, **extra) -> dict:
  """What a resume must not change, by config key (extra: e.g. train.trainable, K)."""
  return {"data.fingerprint": data_fingerprint, "dp.per_layer": bool(dp.per_layer),
          "dp.stats_weight": float(dp.stats_weight), "dp.stats_bound": float(dp.stats_bound), **extra}


def setup(dp: ml_collections.ConfigDict, workdir: pathlib.Path, n: int, steps: int, console,
          num_devices: int, *, pinned: dict | None = None, upstream: list | None = None) -> PrivateRun:
  """Sigma, ledger, secret seeds, Poisson batcher and step budget of a DP run over n examples.

  Call `resume_at(start)` on the result once the checkpoint step is known.

  Raises:
    ConfigError: a sampling rate outside (0, 1], an unreachable target epsilon, a workdir whose
      ledger records another mechanism or pinned setting, or steps without the secrets file (each
      names the config key or the file).
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
  if not dp.stats_weight >= 0 or not dp.stats_bound > 0:
    raise ConfigError(f"config keys 'dp.stats_weight' ({dp.stats_weight}) and 'dp.stats_bound' "
                      f"({dp.stats_bound}): need stats_weight >= 0 and stats_bound > 0")
  if not 0 < dp.delta < 1:
    raise ConfigError(f"config key 'dp.delta': {dp.delta}; delta must be in (0, 1), e.g. 1e-5")
  sigma = dp.noise_multiplier
  if sigma <= 0:
    try:
      sigma = accounting.calibrate_noise_multiplier(target_epsilon=dp.target_epsilon, sampling_rate=q,
                                                    steps=steps, delta=dp.delta, accountant=dp.accountant)
    except ValueError as e:
      raise ConfigError(f"config key 'dp.target_epsilon': {e}") from e
  sigma = float(sigma)
  fields = dict(sampling_rate=q, noise_multiplier=sigma, l2_clip_norm=dp.l2_clip_norm, delta=dp.delta,
                dataset_size=n, accountant=dp.accountant, target_epsilon=dp.target_epsilon)
  if distributed.is_primary():
    secrets_path = workdir / SECRETS_FILENAME
    ledger_path = workdir / ledger_lib.LEDGER_FILENAME
    # Checks against the recorded ledger that name what the user must restore or type.
    try:
      recorded = ledger_lib.PrivacyLedger.load(str(ledger_path)) if ledger_path.is_file() else None
    except ValueError as e:  # Names the file and what to do.
      raise ConfigError(str(e)) from e
    if recorded is not None and recorded.steps and not secrets_path.is_file():
      raise ConfigError(f"{secrets_path} is missing but {ledger_path} records {recorded.steps} steps: a resume "
                        "would draw new secret seeds and its steps could go uncounted. Restore the "
                        "secrets file, or start a new run in a new workdir")
    if recorded is not None and recorded.steps and pinned and "data.fingerprint" in pinned:
      was = recorded.pinned.get("data.fingerprint")
      if was != pinned["data.fingerprint"]:
        raise ConfigError(f"config key 'data.root': the private dataset differs from the one {ledger_path} "
                          f"counts {recorded.steps} steps on (data fingerprint {pinned['data.fingerprint'][:12]} "
                          f"vs {str(was)[:12]}); resume on the original data (same files and attributes), or "
                          "start a new run in a new workdir")
    seeds = _peek_seeds(secrets_path, dp.noise_seed)
    try:
      ledger = ledger_lib.PrivacyLedger.load_or_create(
          str(workdir), noise_seed_provenance=seeds["provenance"], pinned=pinned, upstream=upstream, **fields)
    except ValueError as e:
      raise ConfigError(str(e)) from e
    seeds = _start_attempt(secrets_path, seeds)  # Only once every check has passed.
  else:
    ledger, seeds = None, {"noise_seed": 0, "sampling_seed": 0, "attempt": 0}
  # Every process: process 0's seeds, attempt and step count (same batches, same noise, same budget).
  ints = distributed.broadcast_seeds({k: seeds[k] for k in ("noise_seed", "sampling_seed", "attempt")})
  taken = distributed.broadcast_int(ledger.steps if ledger is not None else 0)
  if ledger is None:
    ledger = _memory_ledger(ledger_lib.PrivacyLedger, path=str(workdir / ledger_lib.LEDGER_FILENAME),
                            steps=taken, pinned=dict(pinned or {}), upstream=list(upstream or []), **fields)

  # One static padded size, a multiple of microbatch x devices so the batch shards evenly.
  multiple = dp.microbatch_size * num_devices
  attempt = ints["attempt"]
  batcher = sampling.PoissonBatcher(n, q, _attempt_seed(ints["sampling_seed"], attempt),
                                    microbatch_size=dp.microbatch_size,
                                    max_size=sampling.max_batch_size(n, q, multiple))
  # All 63 bits of the seed (PRNGKey keeps 32), then the attempt: re-taken steps get fresh noise.
  noise_key = jax.random.fold_in(ledger_lib.key_from_seed(ints["noise_seed"]), attempt)
  console.print(f"DP-SGD: q = {q:.4g} (expected batch {dp.expected_batch_size}), sigma = {sigma:.4f}, "
                f"C = {dp.l2_clip_norm}{' per layer' if dp.per_layer else ''}, delta = {dp.delta:g}, "
                f"{dp.accountant.upper()} accountant, noise seed: {ledger.noise_seed_provenance}; "
                f"padded batch {batcher.max_size}" + (f"; attempt {attempt + 1}" if attempt else ""))
  run = PrivateRun(ledger=ledger, batcher=batcher, noise_key=noise_key, noise_multiplier=sigma,
                   allowed_steps=steps, per_layer=bool(dp.per_layer), attempt=attempt, steps=steps,
                   console=console, host_dispatch=host_dispatch(dp), row_multiple=multiple)
  run.resume_at(0)  # Trainers call it again with the checkpoint's step.
  return run


SECRETS_FILENAME = "dp_secrets.json"


def upstream_stages(config_key: str, workdir, info: dict, fingerprint: str) -> list[dict]:
  """The DP stages of an input model (autoencoder, pretrained LDM) on this run's private data.

  An input trained on other data (another fingerprint) composes with nothing. One trained on the
  SAME data: with DP, its stages compose with this run (listed, for the ledger); without DP, it is
  refused (docs/privacy.md, "Stages compose"): its parameters are an un-noised function of the
  private data.

  Raises:
    ConfigError: naming `config_key`, for a non-private input trained on the private data.
  """
  from jaxldm.privacy import ledger as ledger_lib

  workdir = pathlib.Path(workdir)
  if info.get("data_fingerprint") != fingerprint:
    return []
  if not info.get("private"):
    raise ConfigError(f"config key '{config_key}': {workdir} was trained WITHOUT DP on this run's private data "
                      "(same data fingerprint), so it carries the data outside the mechanism; train it on "
                      "public data, or with DP (its epsilon then composes with this run's)")
  ledger = ledger_lib.PrivacyLedger.load(str(workdir / ledger_lib.LEDGER_FILENAME))
  own = dict(stage=config_key, workdir=str(workdir.absolute()), sampling_rate=ledger.sampling_rate,
             noise_multiplier=ledger.noise_multiplier, steps=ledger.steps, delta=ledger.delta,
             accountant=ledger.accountant, epsilon=ledger.epsilon())
  return [dict(u) for u in ledger.upstream] + [own]


def merge_stages(*lists: list[dict]) -> list[dict]:
  """Stages of several inputs, each workdir once (a pretrained LDM may list the same autoencoder)."""
  out, seen = [], set()
  for stages in lists:
    for st in stages:
      if st["workdir"] not in seen:
        seen.add(st["workdir"])
        out.append(st)
  return out


def _peek_seeds(path: pathlib.Path, fixed: int | None) -> dict:
  """The run's secret seeds (from the file, or new), NOT yet written: nothing is written before
  every resume check has passed. Provenance comes from the seeds actually used."""
  from jaxldm.privacy import ledger as ledger_lib

  if path.is_file():
    seeds = json.loads(path.read_text())
    seeds.setdefault("attempt", 0)
    seeds.setdefault("provenance", ledger_lib.FIXED_SEED if fixed is not None else ledger_lib.OS_ENTROPY)
    seeds["attempt"] += 1  # This start is a new attempt.
    return seeds
  entropy = lambda: int.from_bytes(os.urandom(8), "little") >> 1
  return {"noise_seed": fixed if fixed is not None else entropy(),
          "sampling_seed": fixed + 1 if fixed is not None else entropy(), "attempt": 0,
          "provenance": ledger_lib.FIXED_SEED if fixed is not None else ledger_lib.OS_ENTROPY}


def _start_attempt(path: pathlib.Path, seeds: dict) -> dict:
  """Writes the secrets with this attempt's number (0600 from the first byte)."""
  with atomic_open(path, private=True) as f:
    json.dump(seeds, f)
  return seeds


def _attempt_seed(sampling_seed: int, attempt: int) -> int:
  """The sampling seed of an attempt: 63 bits from (secret seed, attempt)."""
  words = np.random.SeedSequence([int(sampling_seed) >> 32, int(sampling_seed) & 0xFFFFFFFF,
                                  int(attempt)]).generate_state(2, np.uint32)
  return (int(words[0]) << 31) | (int(words[1]) >> 1)


def _allowed_count(ledger, target_epsilon: float | None, steps: int) -> int:
  """The largest mechanism-step count (<= steps) whose epsilon stays within the target."""
  if target_epsilon is None or not target_epsilon > 0 or ledger.epsilon(steps) <= target_epsilon * (1 + 1e-9):
    return steps
  lo, hi = ledger.steps, steps
  while lo < hi:
    mid = (lo + hi + 1) // 2
    if ledger.epsilon(mid) <= target_epsilon:
      lo = mid
    else:
      hi = mid - 1
  return lo


def program_key(dp: ml_collections.ConfigDict, private: bool) -> dict | None:
  """The dp settings `private_gradient` builds into the compiled step (a `common.cached_jit` key
  part); None for a non-private step. sigma, the expected batch size and C are traced, not here."""
  if not private:
    return None
  return {"per_layer": bool(dp.per_layer), "microbatch_size": dp.microbatch_size,
          "stats_weight": float(dp.stats_weight), "stats_bound": float(dp.stats_bound),
          "microbatch_loop": microbatch_loop(dp)}


def private_gradient(loss_fn, params, batch, mask, num_microbatches, rng, *, dp: ml_collections.ConfigDict,
                     noise_multiplier: float, expected_batch_size: float, l2_clip_norm: Any = None,
                     has_aux: bool = False):
  """The DP-SGD gradient of one Poisson batch and its aggregate metrics (call under jit).

  Args:
    loss_fn: `loss_fn(params, example, rng)` of ONE example; with has_aux, `(loss, aux)` where aux
      is a dict of scalars (averaged over the real examples for the metrics).
    rng: fold_in(noise base key, step); `noise.private_grad` splits it into per-example keys and
      the one noise key of this logical batch.
    noise_multiplier, expected_batch_size, l2_clip_norm: traced scalars (`PrivateRun.mechanism`);
      l2_clip_norm None takes dp.l2_clip_norm.

  Returns:
    (noisy gradient like params, metrics). Only what the mechanism releases (docs/privacy.md,
    "Nothing un-noised leaves"): the norm of the noisy gradient (post-processing), and with
    dp.stats_weight > 0 the noisy means of the loss, the clipped fraction and each scalar aux value,
    released through the step's one Gaussian mechanism. Nothing per example, and no un-noised
    aggregate, leaves the step.
  """
  from jaxldm.privacy import noise

  if host_dispatch(dp):  # The batch was cut to its real microbatches on the host: one vmap, no loop.
    # ("accumulate" steps call chunk_sums/release_sums; here, e.g. in the audit, the cut batch is one vmap.)
    microbatch_size, num_microbatches = None, None
  else:
    microbatch_size = dp.microbatch_size
  grads, aux = noise.private_grad(
      loss_fn, params, batch, rng, l2_clip_norm=dp.l2_clip_norm if l2_clip_norm is None else l2_clip_norm,
      noise_multiplier=noise_multiplier,
      expected_batch_size=expected_batch_size, mask=mask, microbatch_size=microbatch_size,
      num_microbatches=num_microbatches, has_aux=has_aux, per_layer=bool(dp.per_layer),
      stats_weight=float(dp.stats_weight), stats_bound=float(dp.stats_bound))
  return grads, _step_metrics(grads, aux)


def _step_metrics(grads, out: dict) -> dict:
  """What a private step logs: the norm of the noisy gradient (post-processing) and the released
  statistics (`noise.release`); nothing else of `out` (per-example values) leaves the step."""
  return {"grad_norm": fitting.global_norm(grads), **out.get("released", {})}


# ---------------------------------------------------------------------------------------------
# The trainers' private step
# ---------------------------------------------------------------------------------------------
def private_step(loss_of, finish, dp: ml_collections.ConfigDict, *, has_aux: bool = False, vmapped: bool = False):
  """The trainers' private train step, compiled:

    step(state, batch, mask, num_microbatches, rng, noise_multiplier, expected_batch_size, l2_clip_norm)
      -> (state, metrics)

  with the arguments of `PrivateRun.step_inputs` and `PrivateRun.mechanism`. The trainer supplies

    loss_of(state) -> (params, loss_fn)     the parameters to differentiate and the loss of ONE
                                            example, loss_fn(params, example, rng)
    finish(state, grads, metrics) -> (state, metrics)   the optimizer update with the noisy gradient

  "traced" and "host" (`microbatch_loop`): ONE jitted function, `private_gradient` then `finish`.
  "accumulate": `AccumulatedStep`, the same mechanism in two programs with the host adding the
  microbatches. vmapped: every argument but the last three has a leading axis (stacked seeds).
  The state (argument 0) is donated.
  """
  if microbatch_loop(dp) == "accumulate":
    return AccumulatedStep(loss_of, finish, dp, has_aux=has_aux, vmapped=vmapped)

  def step(state, batch, mask, num_microbatches, rng, noise_multiplier, expected_batch_size, l2_clip_norm):
    params, loss_fn = loss_of(state)
    grads, metrics = private_gradient(loss_fn, params, batch, mask, num_microbatches, rng, dp=dp,
                                      noise_multiplier=noise_multiplier, expected_batch_size=expected_batch_size,
                                      l2_clip_norm=l2_clip_norm, has_aux=has_aux)
    return finish(state, grads, metrics)

  return jax.jit(jax.vmap(step, in_axes=(0, 0, 0, 0, 0, None, None, None)) if vmapped else step, donate_argnums=0)


def chunk_sums(loss_fn, params, chunk, mask, index_offset, rng, *, dp: ml_collections.ConfigDict,
               l2_clip_norm: Any, has_aux: bool = False):
  """The clipped gradient sum and statistic sums of rows [offset, offset + m) of a step's batch.

  rng is the STEP's key (fold_in(noise base key, step)); each row gets the key it gets in the whole
  batch (`clipping.clipped_grad_sum`, index_offset), so the chunks' sums add up to the batch's.
  Nothing here is released: the sums go to `release_sums` (once per logical batch) and nowhere else.
  """
  from jaxldm.privacy import clipping, noise

  example_rng, _ = noise.split_step_rng(rng)
  grad_sum, aux = clipping.clipped_grad_sum(loss_fn, params, chunk, example_rng, l2_clip_norm=l2_clip_norm,
                                            mask=mask, has_aux=has_aux, per_layer=bool(dp.per_layer),
                                            index_offset=index_offset)
  sums = noise.stat_sums(aux, stats_bound=float(dp.stats_bound)) if dp.stats_weight > 0 else {}
  return grad_sum, sums


def release_sums(sums, rng, *, dp: ml_collections.ConfigDict, noise_multiplier: Any, expected_batch_size: Any,
                 l2_clip_norm: Any):
  """The Gaussian mechanism on the clipped sums of a WHOLE logical batch (`chunk_sums` added over
  every chunk): (noisy gradient, metrics) exactly as `private_gradient` returns them."""
  from jaxldm.privacy import noise

  grad_sum, stats = sums
  _, noise_rng = noise.split_step_rng(rng)
  grads, out = noise.release(grad_sum, stats, noise_rng, l2_clip_norm=l2_clip_norm,
                             noise_multiplier=noise_multiplier, expected_batch_size=expected_batch_size,
                             per_layer=bool(dp.per_layer), stats_weight=float(dp.stats_weight),
                             stats_bound=float(dp.stats_bound))
  return grads, _step_metrics(grads, out)


def accumulated_gradient(loss_fn, params, batch, mask, rng, *, dp: ml_collections.ConfigDict, noise_multiplier: Any,
                         expected_batch_size: Any, l2_clip_norm: Any = None, chunk_rows: int, has_aux: bool = False):
  """`AccumulatedStep`'s mechanism as one traced function (the privacy audit jits it over trials):
  `chunk_sums` of every chunk of `chunk_rows` rows added, then `release_sums`."""
  c = dp.l2_clip_norm if l2_clip_norm is None else l2_clip_norm
  rows = mask.shape[0]
  total = None
  for lo in range(0, rows, chunk_rows):
    chunk = jax.tree_util.tree_map(lambda a: a[lo:lo + chunk_rows], batch)
    sums = chunk_sums(loss_fn, params, chunk, mask[lo:lo + chunk_rows], lo, rng, dp=dp, l2_clip_norm=c,
                      has_aux=has_aux)
    total = sums if total is None else jax.tree_util.tree_map(jnp.add, total, sums)
  return release_sums(total, rng, dp=dp, noise_multiplier=noise_multiplier,
                      expected_batch_size=expected_batch_size, l2_clip_norm=c)


class AccumulatedStep:
  """The private step as the host runs it on CPU (dp.microbatch_loop "accumulate"): per step, ONE
  compiled program per chunk of m x devices rows adds that chunk's clipped sums (`chunk_sums`) to an
  accumulator on the device (donated), then ONE program adds the noise (`release_sums`) and applies
  `finish`. Every batch size runs the same two programs: a Poisson size never compiles anything new.

  The privacy invariants are those of `private_gradient`: every row of the (cut) batch is summed
  (the host loop covers all of them; padding is masked to zero), each example keeps its key, and the
  noise is drawn once per logical batch, after the last chunk. Nothing but the noisy gradient and
  the released statistics leaves the release program.
  """

  def __init__(self, loss_of, finish, dp: ml_collections.ConfigDict, *, has_aux: bool = False, vmapped: bool = False):
    self.microbatch_size, self.vmapped = int(dp.microbatch_size), vmapped

    def sums_fn(state, chunk, mask, index_offset, rng, l2_clip_norm):
      params, loss_fn = loss_of(state)
      return chunk_sums(loss_fn, params, chunk, mask, index_offset, rng, dp=dp, l2_clip_norm=l2_clip_norm,
                        has_aux=has_aux)

    def release_fn(state, sums, rng, noise_multiplier, expected_batch_size, l2_clip_norm):
      grads, metrics = release_sums(sums, rng, dp=dp, noise_multiplier=noise_multiplier,
                                    expected_batch_size=expected_batch_size, l2_clip_norm=l2_clip_norm)
      return finish(state, grads, metrics)

    if vmapped:
      sums_fn = jax.vmap(sums_fn, in_axes=(0, 0, 0, None, 0, None))
      release_fn = jax.vmap(release_fn, in_axes=(0, 0, 0, None, None, None))
    self._sums = jax.jit(sums_fn)  # Traced once: `_shape` (eval_shape) and `_add` reuse its trace.
    self._add = jax.jit(lambda acc, *args: jax.tree_util.tree_map(jnp.add, acc, self._sums(*args)),
                        donate_argnums=0)
    self._release = jax.jit(release_fn, donate_argnums=0)  # The state (the sums have no output to reuse them).
    self._shapes = {}

  def chunk_rows(self, mask) -> int:
    """m x the devices the batch is sharded over: the batch's rows are a multiple of it."""
    return self.microbatch_size * len(mask.sharding.device_set)

  def __call__(self, state, batch, mask, num_microbatches, rng, noise_multiplier, expected_batch_size,
               l2_clip_norm):
    del num_microbatches  # The host covers every row of the cut batch.
    axis = 1 if self.vmapped else 0
    rows, c = mask.shape[axis], self.chunk_rows(mask)
    if rows % c:
      raise ValueError(f"the batch's {rows} rows are not a multiple of microbatch x devices = {c}")
    sharding = getattr(mask, "sharding", None)
    # The offset as an operand: one program per leaf shape, not one per (offset, shape) (a Poisson batch
    # larger than any before would otherwise compile new slices in the middle of a run).
    take = lambda a, lo: jax.lax.dynamic_slice_in_dim(a, np.int32(lo), c, axis=axis)
    acc = None
    for lo in range(0, rows, c):
      chunk, chunk_mask = jax.tree_util.tree_map(lambda a: take(a, lo), (batch, mask))
      if not self.vmapped and isinstance(sharding, jax.sharding.NamedSharding):
        chunk, chunk_mask = jax.device_put((chunk, chunk_mask), sharding)  # Rows over `data` again.
      args = (state, chunk, chunk_mask, np.uint32(lo), rng, l2_clip_norm)
      if acc is None:  # Replicated as `_add` returns it: one compiled `_add`, not one per input sharding.
        # Host zeros in ONE device_put: a jnp.zeros per leaf is a dispatch each (hundreds per step).
        where = (jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
                 if isinstance(sharding, jax.sharding.NamedSharding) else None)  # None: uncommitted.
        acc = jax.device_put(jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), self._shape(*args)), where)
      acc = self._add(acc, *args)
    return self._release(state, acc, rng, noise_multiplier, expected_batch_size, l2_clip_norm)

  def _shape(self, *args):
    # Once per step, over every leaf of the state (~1,100 for the tiny LDM): attribute reads, not
    # jnp.shape / str(dtype) (0.36 vs 3.7 ms per call).
    leaves, treedef = jax.tree_util.tree_flatten(args)
    key = treedef, tuple((getattr(a, "shape", None), getattr(a, "dtype", type(a))) for a in leaves)
    if key not in self._shapes:
      self._shapes[key] = jax.eval_shape(self._sums, *args)
    return self._shapes[key]
