"""Canary audit of the trainers' DP step: does the code do what the accountant assumes?

The accountant's epsilon is only true if the code adds the claimed noise once per logical batch,
bounds each example's influence by C and divides by the expected batch size. A bug (noise added
per microbatch or per device, too little noise, clipping skipped, division by the actual batch
size, padding that leaks) does not crash; it silently changes the mechanism. `audit_private_step`
(what `jaxldm privacy audit` runs) measures the mechanism of THE TRAINERS' STEP: the Poisson
batcher (`sampling.PoissonBatcher` built as `dp.setup` builds it: q < 1, padded to a multiple of
microbatch x devices, masked), the noise keys of `dp.PrivateRun.step_inputs` (a PrivateRun without
a ledger; the stacked batches and keys are checked against `step_inputs` on a few steps), the
batch sharded over a `data` mesh, microbatching, flat or per-layer clipping, K random draws per
example, and `dp.private_gradient` itself. `audit_engines` holds six deliberately broken engines
the audit must catch.

The model is linear over three parameter tensors:
  * Regular examples: least squares averaged over K random draws (like the diffusion loss's noise
    multiplicity), inputs zero along a unit canary direction u, so their gradients, clipped or
    not, have NO component along u.
  * Example 0, the canary: loss canary_norm * <params, u>, gradient canary_norm * u (>> C) with
    equal norm in every tensor, so flat and per-layer clipping both cut it to exactly C u. The
    batcher pads with index 0, so padding rows are canary copies: a padding leak moves the score.
    In the neighbouring dataset D' the canary is a null example (gradient 0): for a correct step,
    the same as removing it.
  * Score = <g, u>. For a correct step: (C [canary in the batch] + N(0, (sigma C)^2)) / E, with E
    = q N the expected batch size.

Checks (each must hold; `reasons` of the result say which did not):
  (a) noise: std of the D' scores of `trials` steps x E / (sigma C) = 1 within `tolerance` (10%;
      standard error ~1% at 4000 steps). The trainers' released statistics (dp.stats_weight) ride
      on the same mechanism and add sqrt(1 + k w^2) - 1 ~ 1% noise: measured ~1.01-1.03.
  (b) sensitivity: score(D) - score(D') on the same step (same batch, same noise key: the noise
      cancels) x E / C, averaged over the steps that sampled the canary, = 1 within the tolerance;
      the same on steps that did not sample it (the leak) = 0 within the tolerance.
  (c) a black-box epsilon lower bound: on `eps_trials` further steps example 0 is deterministically
      in the batch, the canary (D) or the null example (D') at random, the others Poisson-sampled.
      "Canary iff score >= t" is a distinguisher; with FPR and FNR its error rates, (epsilon,
      delta)-DP requires FPR + e^eps FNR >= 1 - delta and FNR + e^eps FPR >= 1 - delta, so
      one-sided Clopper-Pearson upper bounds on both (each at level (1 - confidence) / 2) give an
      epsilon lower bound that holds with probability >= confidence. It must not exceed the claim:
      the accountant's epsilon of one step at q = 1. t is planned on the first fifth of the trials
      (normal fits of both score distributions, the t with the largest bound at the remaining
      counts) and the bound evaluated on the other four fifths, so the choice cannot inflate it.

Power, at the defaults (sigma 1, C 1, E 4, q 0.25, microbatch 2, 4 devices; tests/privacy/
test_audit.py): the real step measures noise 1.03, sensitivity 1.000, leak 0, bound 2.64 <= 4.38.
Noise per microbatch: noise 1.47; per device: 1.98; division by the actual batch size: 1.56;
half sigma: 0.51 and bound 5.24 > 4.38 (true epsilon 10.0); no clipping: sensitivity 1e6; padding
counted: sensitivity and leak 12. At sigma 2 the bound is 1.25 for the real step and 2.64 for half
sigma (claim 1.99, true 4.38). A pass does not prove correctness: it is a smoke detector.

Trials are vmapped and jitted in chunks (one compilation per engine and setting).
"""

from __future__ import annotations

from collections.abc import Callable
import dataclasses
import functools
import math
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from scipy import stats

from jaxldm.privacy import audit_engines
from jaxldm.privacy import sampling


@dataclasses.dataclass(frozen=True)
class AuditResult:
  """An epsilon lower bound from canary-present/absent scores (`_split_bound`)."""
  epsilon_lower_bound: float  # holds with probability >= confidence
  threshold: float  # score threshold chosen on the selection trials
  fpr_upper: float  # Clopper-Pearson upper bound on the FPR (evaluation trials)
  fnr_upper: float  # Clopper-Pearson upper bound on the FNR (evaluation trials)
  num_trials: int
  confidence: float


# ---------------------------------------------------------------------------------------------
# Statistics.
# ---------------------------------------------------------------------------------------------
def _cp_upper(k: np.ndarray, n: int, alpha: float) -> np.ndarray:
  """One-sided Clopper-Pearson upper bound on a rate with k successes of n, level 1 - alpha."""
  k = np.asarray(k)
  upper = stats.beta.ppf(1 - alpha, k + 1, np.maximum(n - k, 1))
  return np.where(k >= n, 1.0, upper)


def _epsilon_bound(fpr: np.ndarray, fnr: np.ndarray, delta: float) -> np.ndarray:
  with np.errstate(divide='ignore', invalid='ignore'):
    a = np.log(np.maximum(1 - delta - fpr, 0) / fnr)
    b = np.log(np.maximum(1 - delta - fnr, 0) / fpr)
  return np.maximum(np.nan_to_num(np.maximum(a, b), nan=0.0, neginf=0.0), 0.0)


def _rates(scores_in: np.ndarray, scores_out: np.ndarray,
           thresholds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Counts of false positives (out >= t) and false negatives (in < t) for each threshold."""
  fp = len(scores_out) - np.searchsorted(np.sort(scores_out), thresholds, side='left')
  fn = np.searchsorted(np.sort(scores_in), thresholds, side='left')
  return fp, fn


def epsilon_lower_bound(scores_in: np.ndarray, scores_out: np.ndarray, *, delta: float,
                        confidence: float = 0.95, threshold: float | None = None
                        ) -> tuple[float, float, float, float]:
  """(epsilon lower bound, threshold, FPR upper, FNR upper) from canary-present/absent scores.

  With `threshold` None the best threshold for these scores is used (optimistic if the same
  scores then bound epsilon: the audits select on some trials and evaluate on the others).
  The two Clopper-Pearson bounds each get half of 1 - confidence (union bound).
  """
  scores_in, scores_out = np.asarray(scores_in, np.float64), np.asarray(scores_out, np.float64)
  n_in, n_out = len(scores_in), len(scores_out)
  if n_in == 0 or n_out == 0:
    raise ValueError('Need scores from trials both with and without the canary.')
  alpha = (1 - confidence) / 2
  if threshold is None:  # Midpoints, so a threshold in a gap generalizes to fresh scores.
    unique = np.unique(np.concatenate([scores_in, scores_out]))
    thresholds = np.concatenate([unique[:1], (unique[:-1] + unique[1:]) / 2])
  else:
    thresholds = np.array([threshold], np.float64)
  fp, fn = _rates(scores_in, scores_out, thresholds)
  fpr_u, fnr_u = _cp_upper(fp, n_out, alpha), _cp_upper(fn, n_in, alpha)
  bounds = _epsilon_bound(fpr_u, fnr_u, delta)
  best = int(np.argmax(bounds))
  return float(bounds[best]), float(thresholds[best]), float(fpr_u[best]), float(fnr_u[best])


def _planned_threshold(scores_in: np.ndarray, scores_out: np.ndarray, n_in: int, n_out: int, *,
                       delta: float, confidence: float) -> float:
  """The threshold whose bound is largest if evaluated on n_in / n_out fresh trials.

  Fits a normal distribution to each class of the selection scores and predicts the error counts
  of the evaluation trials from it: far steadier in the tails, where the bound lives, than the
  empirically best threshold of the selection trials, which mostly chases one lucky outlier. Any
  rule that does not look at the evaluation trials keeps the bound valid; this one only makes it
  tight for the Gaussian scores of a (correct or broken) Gaussian mechanism.
  """
  mi, mo = float(np.mean(scores_in)), float(np.mean(scores_out))
  scale = max(abs(mi), abs(mo), 1e-30)
  si = max(float(np.std(scores_in)), 1e-9 * scale)
  so = max(float(np.std(scores_out)), 1e-9 * scale)
  spread = max(si, so)
  grid = np.linspace(min(mi, mo) - 12 * spread, max(mi, mo) + 12 * spread, 4001)
  alpha = (1 - confidence) / 2
  fp = np.floor(n_out * stats.norm.sf(grid, mo, so))
  fn = np.floor(n_in * stats.norm.cdf(grid, mi, si))
  bounds = _epsilon_bound(_cp_upper(fp, n_out, alpha), _cp_upper(fn, n_in, alpha), delta)
  return float(grid[int(np.argmax(bounds))])


def _split_bound(scores: np.ndarray, present: np.ndarray, *, delta: float, confidence: float,
                 select_fraction: float = 0.2) -> AuditResult:
  """Threshold planned on the first `select_fraction` of the trials, bound on the rest."""
  n = len(scores)
  cut = min(max(int(round(n * select_fraction)), 2), n - 2)
  sel, ev = slice(0, cut), slice(cut, None)
  p_sel, p_ev = present[sel], present[ev]
  if not (p_sel.any() and (~p_sel).any() and p_ev.any() and (~p_ev).any()):
    raise ValueError('Need trials both with and without the canary in both parts.')
  threshold = _planned_threshold(scores[sel][p_sel], scores[sel][~p_sel], int(p_ev.sum()),
                                 int((~p_ev).sum()), delta=delta, confidence=confidence)
  eps, threshold, fpr_u, fnr_u = epsilon_lower_bound(scores[ev][p_ev], scores[ev][~p_ev],
                                                     delta=delta, confidence=confidence,
                                                     threshold=threshold)
  return AuditResult(epsilon_lower_bound=eps, threshold=threshold, fpr_upper=fpr_u,
                     fnr_upper=fnr_u, num_trials=n, confidence=confidence)


def gaussian_epsilon(noise_multiplier: float, delta: float) -> float:
  """Exact epsilon of one Gaussian mechanism step (q = 1) at sensitivity 1 (Balle & Wang 2018).

  delta(eps) = Phi(mu / 2 - eps / mu) - e^eps Phi(-mu / 2 - eps / mu), mu = 1 / sigma; inf for
  sigma 0. It equals the PLD accountant's epsilon for one step at q = 1.
  """
  if noise_multiplier <= 0 or not math.isfinite(noise_multiplier):
    return math.inf if noise_multiplier <= 0 else 0.0
  mu = 1.0 / noise_multiplier

  def excess(eps):
    return (stats.norm.cdf(mu / 2 - eps / mu)
            - math.exp(eps + stats.norm.logcdf(-mu / 2 - eps / mu)) - delta)

  if excess(0.0) <= 0:
    return 0.0
  lo, hi = 0.0, mu * mu / 2 + 10 * mu + 10
  for _ in range(200):
    mid = (lo + hi) / 2
    lo, hi = (mid, hi) if excess(mid) > 0 else (lo, mid)
  return hi


# ---------------------------------------------------------------------------------------------
# Audit of the trainers' private step.
# ---------------------------------------------------------------------------------------------
CANARY, REGULAR, NULL = 1, 0, 2  # `kind` of an example; the canary (or its null twin) is row 0.
_CHUNK = 4096  # Trials per jitted call (padded): one compilation for every trial count.


@dataclasses.dataclass(frozen=True)
class Check:
  name: str
  claimed: str
  measured: str
  passed: bool | None  # None: informational.


@dataclasses.dataclass(frozen=True)
class StepAuditResult:
  """What `audit_private_step` measured; `passed` is the verdict and `reasons` say why not."""
  engine: str
  noise_multiplier: float  # Claimed sigma.
  l2_clip_norm: float
  expected_batch_size: float
  sampling_rate: float
  dataset_size: int
  padded_batch_size: int
  microbatch_size: int
  num_devices: int
  per_layer: bool
  k: int
  delta: float
  tolerance: float
  trials: int
  noise_ratio: float  # Measured noise std / (sigma C / E); 1 if the claim holds.
  noise_ratio_se: float
  sensitivity_ratio: float  # Measured mean shift of a sampled canary / (C / E); 1 if it holds.
  sensitivity_ratio_se: float
  leak_ratio: float  # Mean |shift| / (C / E) on steps that did not sample the canary; 0.
  claimed_epsilon: float  # Accountant's epsilon of one step at q = 1 and sigma.
  effective_epsilon: float  # The same at sigma * noise_ratio / sensitivity_ratio (an estimate).
  epsilon_lower_bound: float | None  # None: the epsilon audit was skipped (eps_trials = 0).
  eps_trials: int
  confidence: float
  reasons: tuple[str, ...]
  seconds: float
  noise_keys: str  # How the per-step noise keys were obtained (see `_step_rngs`).

  @property
  def passed(self) -> bool:
    return not self.reasons

  def checks(self) -> list[Check]:
    tol = self.tolerance
    ok = lambda ratio, target: bool(np.isfinite(ratio) and abs(ratio - target) <= tol)
    rows = [
        Check('noise std x E / (sigma C)', '1',
              f'{self.noise_ratio:.3f} ± {self.noise_ratio_se:.3f}', ok(self.noise_ratio, 1.0)),
        Check('sensitivity x E / C (canary sampled)', '1',
              f'{self.sensitivity_ratio:.3f} ± {self.sensitivity_ratio_se:.3f}',
              ok(self.sensitivity_ratio, 1.0)),
        Check('leak x E / C (canary not sampled)', '0', f'{self.leak_ratio:.3f}',
              ok(self.leak_ratio, 0.0)),
    ]
    if self.epsilon_lower_bound is not None:
      rows.append(Check(f'epsilon (1 step, q = 1) lower bound, {self.confidence:.0%}',
                        f'<= {self.claimed_epsilon:.3f}', f'{self.epsilon_lower_bound:.3f}',
                        self.epsilon_lower_bound <= self.claimed_epsilon))
    rows.append(Check('effective epsilon (1 step, q = 1)', f'{self.claimed_epsilon:.3f}',
                      _fmt_eps(self.effective_epsilon), None))
    return rows

  def table(self) -> str:
    rows = [('check', 'claimed', 'measured', 'verdict')]
    rows += [(c.name, c.claimed, c.measured, 'info' if c.passed is None else
              ('ok' if c.passed else 'FAIL')) for c in self.checks()]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    line = lambda r: '  '.join(v.ljust(w) for v, w in zip(r, widths)).rstrip()
    rule = tuple('-' * w for w in widths)
    return '\n'.join(line(r) for r in [rows[0], rule] + rows[1:])


def _fmt_eps(eps: float) -> str:
  return 'inf' if not math.isfinite(eps) else (f'{eps:.3g}' if eps >= 1000 else f'{eps:.3f}')


_SHAPES = {'dense': {'kernel': (3, 2), 'bias': (2,)}, 'scale': (4,)}  # Three tensors.


@dataclasses.dataclass(frozen=True, eq=False)  # Hashed by identity (a jit cache key).
class _Model:
  params: Any
  u: Any  # Unit vector like params, 1 / sqrt(#tensors) on the first entry of each tensor.
  loss_fn: Callable[..., Any]


def _flat_shapes():
  return jax.tree_util.tree_flatten(_SHAPES, is_leaf=lambda s: isinstance(s, tuple))


@functools.lru_cache(maxsize=8)
def _model(k: int, canary_norm: float) -> _Model:
  """The linear model and its per-example loss (the trainers' `loss_fn(params, example, rng)`).

  Cached: the same loss_fn object lets jit reuse its compilation across audits and seeds.
  """
  leaves, treedef = _flat_shapes()
  rs = np.random.default_rng(7)
  params = jax.tree_util.tree_unflatten(
      treedef, [jnp.asarray(rs.normal(size=s).astype(np.float32) * 0.1) for s in leaves])
  u = jax.tree_util.tree_unflatten(treedef, [
      jnp.zeros(s).reshape(-1).at[0].set(1 / math.sqrt(len(leaves))).reshape(s) for s in leaves])
  dot = lambda a, b: sum(jnp.vdot(x, y) for x, y in zip(jax.tree_util.tree_leaves(a),
                                                        jax.tree_util.tree_leaves(b)))

  def loss_fn(p, example, rng):
    pred = dot(p, example['x'])
    draws = 0.1 * jax.random.normal(rng, (k,))  # K noise draws averaged, as with multiplicity K.
    regular = jnp.mean(0.5 * (pred + draws - example['y'])**2)
    canary = canary_norm * dot(p, u)  # Gradient canary_norm * u.
    null = 0.0 * regular  # Gradient exactly 0: the canary removed.
    return jnp.where(example['kind'] == CANARY, canary,
                     jnp.where(example['kind'] == NULL, null, regular))

  return _Model(params=params, u=u, loss_fn=loss_fn)


@functools.lru_cache(maxsize=8)
def _examples(dataset_size: int) -> dict:
  """N examples (host arrays): regular ones with inputs zero along u, the canary in row 0."""
  leaves, treedef = _flat_shapes()
  rs = np.random.default_rng(8)
  xs = []
  for s in leaves:
    x = rs.normal(size=(dataset_size,) + s).astype(np.float32)
    x.reshape(dataset_size, -1)[:, 0] = 0.0  # Zero along u: no regular gradient moves the score.
    xs.append(x)
  kind = np.full((dataset_size,), REGULAR, np.int32)
  kind[0] = CANARY
  return {'x': jax.tree_util.tree_unflatten(treedef, xs),
          'y': rs.normal(size=dataset_size).astype(np.float32), 'kind': kind}


class _CanaryIncluded:
  """The batcher's batch of a step with example 0 (the canary slot) always included.

  Deterministic inclusion for the epsilon audit: the other examples keep their Poisson coins, and
  the batch is what `PoissonBatcher` would give if example 0's coin had come up heads.
  """

  def __init__(self, batcher):
    self.inner = batcher
    self.microbatch_size, self.max_size = batcher.microbatch_size, batcher.max_size
    self.expected_batch_size = batcher.expected_batch_size

  def batch(self, step: int):
    sb = self.inner.batch(step)
    real = sb.indices[sb.mask > 0]
    if len(real) and real[0] == 0:
      return sb
    indices, mask = sampling.pad_to_size(np.concatenate([[0], real]), len(sb.indices))
    return sampling.SampledBatch(indices, mask, math.ceil((len(real) + 1) / self.microbatch_size))


def _private_run(batcher, noise_seed: int, sigma: float, per_layer: bool):
  """A `dp.PrivateRun` without a ledger (the audit writes nothing), built from its parts."""
  from jaxldm.privacy import ledger as ledger_lib
  from jaxldm.train import dp as dp_lib

  return dp_lib.PrivateRun(ledger=None, batcher=batcher,
                           noise_key=ledger_lib.key_from_seed(noise_seed), noise_multiplier=sigma,
                           allowed_steps=2**31 - 1, per_layer=per_layer)


@functools.lru_cache(maxsize=4)
def _host_batches(batcher_args: tuple, include_canary: bool, num_steps: int):
  """(indices, float32 mask, num_microbatches) of steps 0..num_steps-1, stacked (cached)."""
  batcher = _make_batcher(*batcher_args)
  if include_canary:
    batcher = _CanaryIncluded(batcher)
  batches = [batcher.batch(s) for s in range(num_steps)]
  indices = np.stack([b.indices for b in batches])
  mask = np.stack([b.mask for b in batches]).astype(np.float32)  # As step_inputs casts it.
  nmb = np.array([b.num_microbatches for b in batches], np.int32)
  return indices, mask, nmb


def _make_batcher(n: int, q: float, seed: int, microbatch_size: int, num_devices: int):
  """The batcher exactly as `dp.setup` builds it (padded to a multiple of microbatch x devices)."""
  max_size = sampling.max_batch_size(n, q, microbatch_size * num_devices)
  return sampling.PoissonBatcher(n, q, seed, microbatch_size=microbatch_size, max_size=max_size)


def _step_rngs(run, host: tuple, examples: dict, mesh, check_steps: list[int]):
  """The noise keys of steps 0..num_steps-1, checked against `run.step_inputs` on `check_steps`.

  Derived in one vmapped call as fold_in(run.noise_key, step), which is what `step_inputs` returns
  today; if it returns anything else for a checked step, every key is taken from `step_inputs`
  itself (about 1 ms per step). Also checks that the stacked host batches equal what
  `step_inputs` shards: the same rows, mask, microbatch count and a batch split over `data`.

  Returns:
    (keys, how they were obtained).
  """
  indices, mask, nmb = host
  num_steps = len(nmb)
  keys = jax.vmap(lambda s: jax.random.fold_in(run.noise_key, s))(jnp.arange(num_steps))
  same_keys = True
  for s in check_steps:
    batch, m, n, rng = run.step_inputs(examples, s, mesh)
    rows = jax.tree_util.tree_map(lambda a: a[indices[s]], examples)
    leaves_ok = all(np.array_equal(np.asarray(a), b) for a, b in
                    zip(jax.tree_util.tree_leaves(batch), jax.tree_util.tree_leaves(rows)))
    sharded = all(leaf.sharding.spec[:1] == ('data',) for leaf in jax.tree_util.tree_leaves(batch))
    if not (leaves_ok and sharded and np.array_equal(np.asarray(m), mask[s]) and int(n) == nmb[s]):
      raise RuntimeError(f'the audit\'s batches differ from dp.PrivateRun.step_inputs at step {s}; '
                         'update jaxldm.privacy.audit to the trainer\'s batching')
    same_keys &= bool(np.array_equal(np.asarray(jax.random.key_data(rng)),
                                     np.asarray(jax.random.key_data(keys[s]))))
  if same_keys:
    return keys, 'fold_in(noise_key, step), checked against step_inputs'
  one = jax.sharding.Mesh(np.array(jax.devices()[:1]), ('data',))
  tiny = {'i': np.zeros((len(examples['kind']),), np.int8)}
  keys = jnp.stack([run.step_inputs(tiny, s, one)[3] for s in range(num_steps)])
  return keys, 'step_inputs (per step)'


@functools.lru_cache(maxsize=16)
def _scorer(engine_fn, model: _Model, l2_clip_norm: float, microbatch_size: int,
            per_layer: bool, expected_batch_size: float, mesh, microbatch_loop: str = 'traced'):
  """jit(vmap(score)) over trials: score = <engine gradient, u> (cached per engine and setting)."""
  from jaxldm.train import dp as dp_lib

  cfg = dp_lib.dp_config(private=True, tiny=True)
  cfg.l2_clip_norm = float(l2_clip_norm)
  cfg.microbatch_size = int(microbatch_size)
  cfg.per_layer = bool(per_layer)
  cfg.microbatch_loop = microbatch_loop  # 'traced': the accelerator loop; 'accumulate' (CPU) or 'host': cut on the host.
  u = model.u

  def score(batch, mask, num_microbatches, rng, sigma):
    grads = engine_fn(model.loss_fn, model.params, batch, mask, num_microbatches, rng, dp=cfg,
                      noise_multiplier=sigma, expected_batch_size=expected_batch_size, mesh=mesh)
    return sum(jnp.vdot(g, v) for g, v in zip(jax.tree_util.tree_leaves(grads),
                                              jax.tree_util.tree_leaves(u)))

  return jax.jit(jax.vmap(score, in_axes=(0, 0, 0, 0, None)))


def _scores(scorer, mesh, examples: dict, indices: np.ndarray, canary_kind: np.ndarray,
            mask: np.ndarray, nmb: np.ndarray, keys, sigma: float) -> np.ndarray:
  """Scores of the trials (leading axis), in chunks of _CHUNK; the batch axis split over `data`.

  Trial t runs on rows indices[t] of the examples, example 0 (the canary slot) holding the
  example of kind canary_kind[t]. Chunks are dispatched without waiting, so the host gathers the
  next chunk while the devices compute.
  """
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, 'data'))
  total = len(mask)
  out = []
  for start in range(0, total, _CHUNK):
    take = np.arange(start, start + _CHUNK).clip(max=total - 1)  # The last chunk repeats a trial.
    rows = jax.tree_util.tree_map(lambda a: a[indices[take]], examples)
    rows['kind'] = np.where(indices[take] == 0, canary_kind[take, None], rows['kind'])
    b, m = jax.device_put((rows, mask[take]), sharding)
    out.append(scorer(b, m, jnp.asarray(nmb[take]), keys[jnp.asarray(take)], jnp.float32(sigma)))
  scores = [np.asarray(s, np.float64) for s in out]
  return np.concatenate(scores)[:total]


def audit_private_step(engine: str | audit_engines.Engine = 'trainer', *,
                       noise_multiplier: float = 1.0, l2_clip_norm: float = 1.0,
                       expected_batch_size: float = 4.0, sampling_rate: float = 0.25,
                       per_layer: bool = False, microbatch_size: int = 2, k: int = 1,
                       num_devices: int = 0, trials: int = 4000, eps_trials: int = 100_000,
                       delta: float = 1e-5, confidence: float = 0.95, tolerance: float = 0.10,
                       noise_scale: float = 1.0, canary_norm: float = 1e6,
                       seed: int = 0, microbatch_loop: str = 'traced') -> StepAuditResult:
  """Audits the trainers' DP step (or a broken engine) against its claim; see the module docstring.

  Args:
    engine: 'trainer' (`dp.private_gradient`), a name from `audit_engines.BROKEN_ENGINES`, or an
      `audit_engines.Engine`.
    noise_multiplier: the claimed sigma (the engine adds noise_scale * sigma).
    l2_clip_norm: C.
    expected_batch_size: E = q * N; the dataset has N = round(E / q) examples, q is then E / N.
    sampling_rate: q < 1 exercises Poisson sampling and padding.
    per_layer: per-layer clipping (dp.per_layer).
    microbatch_size: dp.microbatch_size; batches are padded to a multiple of it times the devices.
    k: random draws the loss averages (noise multiplicity K).
    num_devices: devices of the data mesh (0 = all, like train.num_devices).
    trials: steps for the noise and sensitivity checks (each run on D and on D').
    eps_trials: steps for the epsilon lower bound (canary included or excluded at random); 0 skips.
    microbatch_loop: dp.microbatch_loop of the audited step: 'traced' (the loop over microbatches
      accelerators run), 'accumulate' (CPU trainers: `dp.chunk_sums` of every m x devices rows
      added, then `dp.release_sums`) or 'host' (the batch vmapped whole); the last two here uncut,
      so the padding rows are audited too.
    delta, confidence: of the claim and of the lower bound.
    tolerance: largest relative deviation of the measured noise and sensitivity from the claim.
    noise_scale: multiplies the noise actually added (simulates a bug; 1 = none).
    canary_norm: the canary's unclipped gradient norm (>> C).
    seed: every seed of the audit (sampling, noise, data, canary inclusion).

  Returns:
    StepAuditResult.
  """
  from jaxldm.train import common

  start = time.perf_counter()
  engine = audit_engines.get(engine) if isinstance(engine, str) else engine
  if not 0 < sampling_rate <= 1 or not expected_batch_size > 0:
    raise ValueError(f'need 0 < q <= 1 and E > 0, got q {sampling_rate}, E {expected_batch_size}')
  if not l2_clip_norm > 0 or not noise_multiplier > 0:
    raise ValueError(f'need C > 0 and sigma > 0, got C {l2_clip_norm}, sigma {noise_multiplier}')
  if trials < 100 or (eps_trials and eps_trials < 100) or eps_trials < 0:
    raise ValueError(f'need >= 100 trials and eps_trials 0 or >= 100, got {trials}, {eps_trials}')
  if microbatch_size < 1 or k < 1:
    raise ValueError(f'need microbatch_size >= 1 and k >= 1, got {microbatch_size}, {k}')
  n = max(1, int(round(expected_batch_size / sampling_rate)))
  if expected_batch_size > n:
    raise ValueError(f'E {expected_batch_size} exceeds the dataset size {n}')
  q = expected_batch_size / n
  mesh = common.make_mesh(num_devices)
  devices = mesh.devices.size
  sigma = float(noise_multiplier)
  model, examples = _model(int(k), float(canary_norm)), _examples(n)
  if microbatch_loop not in ('traced', 'accumulate', 'host'):
    raise ValueError(f"microbatch_loop must be 'traced', 'accumulate' or 'host', got {microbatch_loop!r}")
  scorer = _scorer(engine.fn, model, float(l2_clip_norm), int(microbatch_size), bool(per_layer),
                   float(expected_batch_size), mesh, microbatch_loop)
  used_sigma = sigma * engine.noise_scale * noise_scale
  scale = expected_batch_size / l2_clip_norm  # Score units -> multiples of C / E.

  def prepare(batcher_seed, noise_seed, include_canary, steps):
    args = (n, q, batcher_seed, int(microbatch_size), devices)
    batcher = _make_batcher(*args)
    run = _private_run(_CanaryIncluded(batcher) if include_canary else batcher, noise_seed, sigma,
                       per_layer)
    host = _host_batches(args, include_canary, steps)
    keys, path = _step_rngs(run, host, examples, mesh, sorted({0, 1, steps // 2, steps - 1}))
    return host, keys, path, batcher.max_size

  # (a), (b): the same steps on D (canary in row 0) and D' (a null example instead).
  (indices, mask, nmb), keys, path, padded = prepare(2 * seed + 1, 2 * seed + 2, False, trials)
  scores = _scores(scorer, mesh, examples, np.concatenate([indices, indices]),
                   np.repeat([CANARY, NULL], trials), np.concatenate([mask, mask]),
                   np.concatenate([nmb, nmb]), jnp.concatenate([keys, keys]), used_sigma)
  on_d, on_null = scores[:trials], scores[trials:]
  sampled = (indices[:, 0] == 0) & (mask[:, 0] > 0)
  reasons = []
  finite = bool(np.isfinite(scores).all())
  if not finite:
    reasons.append(f'{int((~np.isfinite(scores)).sum())} of {2 * trials} steps gave a non-finite '
                   'gradient')
  noise_ratio = float(np.std(on_null, ddof=1) * scale / sigma)
  noise_se = noise_ratio / math.sqrt(2 * (trials - 1))
  diff = (on_d - on_null) * scale
  if sampled.sum() >= 2:
    sens = float(np.mean(diff[sampled]))
    sens_se = float(np.std(diff[sampled], ddof=1) / math.sqrt(sampled.sum()))
  else:
    sens, sens_se = math.nan, math.nan
    reasons.append('too few steps sampled the canary to measure the sensitivity; raise the '
                   'trials or q')
  leak = float(np.mean(np.abs(diff[~sampled]))) if (~sampled).any() else 0.0
  if finite and not abs(noise_ratio - 1) <= tolerance:
    reasons.append(f'noise std is {noise_ratio:.3f} x the claimed sigma C / E')
  if finite and not abs(sens - 1) <= tolerance and np.isfinite(sens):
    reasons.append(f'a sampled canary moves the gradient by {sens:.3g} x C / E (sensitivity C)')
  if finite and not leak <= tolerance:
    reasons.append(f'the canary moves the gradient by {leak:.3g} x C / E on steps that did not '
                   'sample it (padding or another leak)')

  # (c): canary deterministically included (D) or excluded (D'), at random, on further steps.
  claimed = gaussian_epsilon(sigma, delta)  # = the PLD accountant's epsilon of 1 step at q = 1.
  bound = None
  if eps_trials:
    (indices, mask, nmb), keys, _, _ = prepare(2 * seed + 3, 2 * seed + 4, True, eps_trials)
    present = np.random.default_rng([seed, 11]).random(eps_trials) < 0.5
    eps_scores = _scores(scorer, mesh, examples, indices, np.where(present, CANARY, NULL), mask,
                         nmb, keys, used_sigma)
    if np.isfinite(eps_scores).all():
      bound = _split_bound(eps_scores, present, delta=delta,
                           confidence=confidence).epsilon_lower_bound
      if bound > claimed:
        reasons.append(f'empirical epsilon lower bound {bound:.3f} exceeds the claimed '
                       f'{claimed:.3f}')
    else:
      bound = math.inf
      reasons.append('non-finite gradients in the epsilon audit')
  effective = (gaussian_epsilon(sigma * noise_ratio / sens, delta)
               if np.isfinite(sens) and sens > 0 and np.isfinite(noise_ratio) else math.inf)
  return StepAuditResult(
      engine=engine.name, noise_multiplier=sigma, l2_clip_norm=float(l2_clip_norm),
      expected_batch_size=float(expected_batch_size), sampling_rate=q, dataset_size=n,
      padded_batch_size=padded, microbatch_size=int(microbatch_size), num_devices=devices,
      per_layer=bool(per_layer), k=int(k), delta=delta, tolerance=tolerance, trials=trials,
      noise_ratio=noise_ratio, noise_ratio_se=noise_se, sensitivity_ratio=sens,
      sensitivity_ratio_se=sens_se, leak_ratio=leak, claimed_epsilon=claimed,
      effective_epsilon=effective, epsilon_lower_bound=bound, eps_trials=int(eps_trials),
      confidence=confidence, reasons=tuple(reasons), seconds=time.perf_counter() - start,
      noise_keys=path)
