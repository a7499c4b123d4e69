"""White-box canary audit: an empirical LOWER bound on the epsilon of one DP-SGD step.

The accountant gives an upper bound that is only true if the code does what the analysis assumes.
A DP bug (noise too small, clipping skipped, noise divided by the actual batch size, padding that
leaks) does not crash; it makes the real epsilon larger than claimed. This audit measures it:

  1. A tiny linear model w in R^d. Regular examples are least-squares examples whose inputs are
     orthogonal to a canary direction u = e_0, so their gradients have no component along u.
  2. The canary example has loss canary_norm * <w, u>: gradient canary_norm * u, which a correct
     clipper cuts to C * u.
  3. Each trial calls the privatizer (e.g. `noise.private_grad`) on the regular examples plus one
     canary slot whose mask is 1 with probability 1/2 (present) and 0 otherwise (absent, so the
     padding path is audited too). Score = <g, u>: a pure one-dimensional Gaussian mechanism
     N(C or 0, (sigma C)^2) / E if the privatizer is right.
  4. A distinguisher "present iff score >= t" has FPR and FNR; (epsilon, delta)-DP requires
     FPR + e^eps FNR >= 1 - delta and FNR + e^eps FPR >= 1 - delta. With Clopper-Pearson upper
     bounds on FPR and FNR this gives an epsilon lower bound that holds with the stated confidence.
     The threshold is chosen on the first half of the trials and the bound evaluated on the second
     half, so choosing the best threshold does not inflate the bound.

If the lower bound exceeds the accountant's epsilon (for one step with q = 1: the audit inserts the
canary deterministically, no subsampling), the privatizer is broken. A bound below the claim does
not prove correctness: it is a smoke detector, not a proof.

Trials are vmapped (one compilation, one batched call).
"""

from collections.abc import Callable
import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from scipy import stats


@dataclasses.dataclass(frozen=True)
class AuditResult:
  epsilon_lower_bound: float  # holds with probability >= confidence
  threshold: float  # score threshold chosen on the first half of the trials
  fpr_upper: float  # Clopper-Pearson upper bound on the FPR (second half)
  fnr_upper: float  # Clopper-Pearson upper bound on the FNR (second half)
  num_trials: int
  confidence: float


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
  scores then bound epsilon: `canary_audit` selects on one half and evaluates on the other).
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


def canary_audit(private_grad_fn: Callable[..., tuple[Any, Any]], rng: jax.Array, *,
                 num_trials: int, delta: float, confidence: float = 0.95, dim: int = 8,
                 num_examples: int = 7, canary_norm: float = 1e6, seed: int = 0) -> AuditResult:
  """Audits a privatizer with the signature of `noise.private_grad` minus its DP settings.

  Args:
    private_grad_fn: `f(loss_fn, params, batch, rng, *, mask) -> (grad, aux)`, e.g.
      `functools.partial(noise.private_grad, l2_clip_norm=C, noise_multiplier=sigma,
      expected_batch_size=E)`; everything it does (clipping, masking, noise, scaling) is audited.
    rng: base key, split into (trial keys fold_in(., t), data, params).
    num_trials: trials (half choose the threshold, half bound epsilon); a few thousand suffice.
    delta: the delta of the claim being audited.
    confidence: the probability with which the returned lower bound holds.
    dim: model size (the canary lives in coordinate 0).
    num_examples: regular examples per trial.
    canary_norm: norm of the canary's unclipped gradient; must exceed the clip norm.
    seed: numpy seed for which trials include the canary.

  Returns:
    AuditResult.
  """
  if num_trials < 4:
    raise ValueError(f'num_trials must be >= 4, got {num_trials}.')
  trial_rng, data_rng, params_rng = jax.random.split(rng, 3)
  x = jax.random.normal(data_rng, (num_examples + 1, dim)).at[:, 0].set(0.0)  # Orthogonal to u.
  y = jnp.ones((num_examples + 1,))
  is_canary = jnp.zeros((num_examples + 1,), jnp.int32).at[-1].set(1)
  batch = {'x': x, 'y': y, 'is_canary': is_canary}
  params = jax.random.normal(params_rng, (dim,))
  u = jnp.zeros((dim,)).at[0].set(1.0)

  def loss_fn(w, example, _):
    regular = 0.5 * (w @ example['x'] - example['y'])**2
    return jnp.where(example['is_canary'] > 0, canary_norm * (w @ u), regular)

  present = np.random.default_rng(seed).random(num_trials) < 0.5
  masks = np.ones((num_trials, num_examples + 1), np.int32)
  masks[:, -1] = present

  def score(trial, mask):
    grad, _ = private_grad_fn(loss_fn, params, batch, jax.random.fold_in(trial_rng, trial),
                              mask=mask)
    return grad @ u

  scores = np.asarray(jax.jit(jax.vmap(score))(jnp.arange(num_trials), jnp.asarray(masks)),
                      np.float64)
  half = num_trials // 2
  select, evaluate = slice(0, half), slice(half, None)
  _, threshold, _, _ = epsilon_lower_bound(scores[select][present[select]],
                                           scores[select][~present[select]], delta=delta,
                                           confidence=confidence)
  eps, threshold, fpr_u, fnr_u = epsilon_lower_bound(scores[evaluate][present[evaluate]],
                                                     scores[evaluate][~present[evaluate]],
                                                     delta=delta, confidence=confidence,
                                                     threshold=threshold)
  return AuditResult(epsilon_lower_bound=eps, threshold=threshold, fpr_upper=fpr_u,
                     fnr_upper=fnr_u, num_trials=num_trials, confidence=confidence)
