"""Reconstruction risk: what a DP guarantee implies about attacks that rebuild a training sample.

Epsilon is hard to read as a risk. This module translates a Gaussian-mechanism / DP-SGD guarantee
into the probability that an attacker reconstructs a training sample, in two threat models:

* With data priors (Hayes et al. 2023; Kaissis et al. 2023): reconstruction robustness (ReRo). An
  attacker who knows the target lies in some prior set and would succeed with probability kappa
  without seeing the model succeeds, after seeing the output of an f-DP mechanism, with probability
  at most 1 - f(kappa); for mu-GDP that is Phi(Phi^-1(kappa) + mu). Worst case: it covers any
  prior, any success criterion and any attack. Closed forms (`gdp_mu`, `dpsgd_mu`,
  `gaussian_tradeoff`, `rero_bound_tradeoff`, `rero_bound_gdp`) and, for a whole DP-SGD run,
  `rero_bound` (below), with `rero_summary`, `rero_curve` and `plot_rero_curve` for reports.
* Without data priors (Ziller et al. 2024, arXiv 2402.12861): an attacker reconstructing from
  scratch (analytic gradient inversion) can do no better than estimating the sample from a noisy
  copy of it, which gives closed forms for the expected MSE and the probability of reaching a PSNR
  (`expected_mse_optimal_attack`, `mse_success_probability`, `psnr_success_probability`; their
  noise_std is RELATIVE to ||x||).

The bound for a DP-SGD run. `rero_bound(noise_multiplier=, sampling_rate=, steps=, kappa=)` bounds
the success probability of ANY reconstruction attack against T Poisson-subsampled Gaussian steps
(exactly the mechanism `jaxldm.privacy.accounting` accounts for), for an attacker whose prior
success without the model is kappa. It is what epsilon means for reconstruction.

Methods:
  "exact"  closed form, full batch only (q = 1): T Gaussian steps with noise multiplier sigma are
           exactly mu-GDP with mu = sqrt(T) / sigma, so ReRo = Phi(Phi^-1(kappa) + mu); one step
           gives Phi(Phi^-1(kappa) + 1/sigma).
  "gdp"    the same formula with mu from the GDP central limit theorem (`dpsgd_mu`) when
           q < 1: an APPROXIMATION (slightly optimistic), kept as a cross-check; exact for q = 1.
  "pld"    numerical and rigorous, the default: the privacy loss distribution (PLD) of dp-
           accounting, composed T times, turned into the bound below.

From the PLD to the bound (the derivation the "pld" method implements):
  Let P = M(D + z) (the output when the target z is in the data) and Q = M(D) (without it). An
  attack is an event S on the output ("the reconstruction is close enough to z"); its prior success
  is Q(S) <= kappa, because without z in the data the output carries no information about z. For
  every gamma >= 0 the hockey-stick divergence H_gamma(P||Q) = sup_S P(S) - gamma Q(S) gives
      P(S) <= gamma Q(S) + H_gamma(P||Q) <= gamma kappa + H_gamma(P||Q),
  so ReRo(kappa) <= inf_{gamma >= 0} [gamma kappa + H_gamma(P||Q)]. This is tight: the
  Neyman-Pearson test achieves it (it is the convex conjugate form of 1 - T(Q, P)(kappa), with T
  the trade-off function), so it IS the exact trade-off bound 1 - f(kappa), not a loosening.
  Writing gamma = e^eps:
    * eps >= 0: H = delta_{P||Q}(eps), the privacy profile that dp-accounting's PLD gives (its
      REMOVE PLD: upper distribution = with the target);
    * eps < 0: H_gamma(P||Q) = 1 - gamma + gamma H_{1/gamma}(Q||P) (complement of S), so the term is
      1 - e^-eps' (1 - kappa - delta_{Q||P}(eps')) with eps' = -eps >= 0 and delta_{Q||P} the ADD
      PLD's profile.
  With the PLD discretised on losses l_j with masses w_j (and mass w_inf at +inf),
  delta(eps) = w_inf + sum_{l_j > eps} w_j (1 - e^(eps - l_j)); between two consecutive losses
  e^eps kappa + delta(eps) = const + e^eps (kappa - sum_{l_j > eps} w_j e^-l_j) is monotone, so the
  infimum over eps is attained at eps = 0 or at a loss value: evaluating at every atom is EXACT for
  the discretised PLD (no grid search error). dp-accounting's PLD is pessimistic (losses rounded
  up, truncated tails moved to +inf), so every delta it reports, and hence the bound, is an upper
  bound of the true one. The neighbouring relation is add-or-remove, as in the accountant: the
  bound is the max over both orders of (P, Q), which for q < 1 are not the same.
  Check: for q = 1 the PLD is that of N(1, sigma^2) vs N(0, sigma^2), whose trade-off function is
  Gaussian, and the numbers match Phi(Phi^-1(kappa) + sqrt(T)/sigma) to ~1e-4 (tested).

Speed: the PLD's loss grid (`value_discretization_interval`) is coarse and scaled to the run:
mu / 500 clipped to [1e-5, 1e-3] (`auto_value_discretization_interval`; the accountant uses 1e-4
for epsilon). Measured on this 2-core CPU over sigma 0.5..20, q 0.004..1, T 1..14062: every call
<= 0.4 s except full-batch T = 10^4 at sigma <= 1 (1-3 s, where the bound is 1 anyway), and the
bound is within 7e-4 of the one on a 5x finer grid. A coarser grid only makes the bound larger
(pessimistic rounding), never invalid.

Everything here is numpy/scipy on scalars (or broadcastable arrays) plus dp-accounting's PLD; it
imports no model code, so it can be used to plan a budget before anything is trained.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
from dp_accounting.pld import privacy_loss_distribution as pld_lib
from scipy import signal, special

from jaxldm.privacy import accounting
from jaxldm.privacy.checks import check_arg

TradeOff = Callable[[np.ndarray], np.ndarray]

METHODS = ("pld", "gdp", "exact")
# Loss grid of the PLD: at most this coarse (10x the accountant's 1e-4: fast; pessimistic).
DEFAULT_VALUE_DISCRETIZATION_INTERVAL = 1e-3
# ...and at most this fine: "auto" picks mu / AUTO_GRID_PER_MU within these limits.
MIN_VALUE_DISCRETIZATION_INTERVAL = 1e-5
AUTO_GRID_PER_MU = 500
# Default kappas for reports and plots: prior success 0.1%, 1%, 10%.
DEFAULT_KAPPAS = (1e-3, 1e-2, 1e-1)
# Noise multipliers of `rero_curve`: epsilon from ~50 to ~0.1 for typical DP-SGD runs.
DEFAULT_CURVE_SIGMAS = tuple(float(s) for s in np.geomspace(0.3, 20.0, 16))


def _out(x: np.ndarray) -> float | np.ndarray:
  """Python float for scalar results, the array otherwise."""
  x = np.asarray(x, dtype=np.float64)
  return float(x) if x.ndim == 0 else x


# --------------------------------------------------------------------------------------------------
# Gaussian differential privacy parameters.
# --------------------------------------------------------------------------------------------------


def gdp_mu(sensitivity, noise_std) -> float | np.ndarray:
  """mu of the Gaussian mechanism: mu = sensitivity / noise_std (one release is exactly mu-GDP).

  Distinguishing two neighbouring datasets from one release is then as hard as telling N(0, 1)
  from N(mu, 1).
  """
  sensitivity = check_arg("sensitivity", sensitivity, "[0, inf]")
  noise_std = check_arg("noise_std", noise_std, "(0, inf]")
  return _out(sensitivity / noise_std)


def dpsgd_mu(noise_multiplier, sampling_rate, steps) -> float | np.ndarray:
  """Approximate GDP mu of DP-SGD: T Poisson-subsampled Gaussian steps (the CLT of Bu et al. 2020,
  Dong et al. 2022): mu_tot = q * sqrt(T * (exp(1 / sigma^2) - 1)).

  An APPROXIMATION, not a bound: it is the central-limit limit as T -> inf with q * sqrt(T) fixed,
  so it is accurate only for small sampling rates q and many steps, and it tends to be optimistic.
  At q = 256/60000, sigma = 1.1, T = 14062 it converts to epsilon 2.32 at delta 1e-5, versus 2.38
  from the PLD accountant. Use `jaxldm.privacy.accounting` for the privacy guarantee itself; this
  is for reading that guarantee as a reconstruction risk. For q = 1 (full batch) the exact value is
  sqrt(T) / sigma, which this formula overestimates.

  Args:
    noise_multiplier: sigma, the noise std divided by the clipping norm (> 0).
    sampling_rate: q, each example's Poisson inclusion probability per step, in [0, 1].
    steps: T >= 0, the number of noisy steps taken.
  """
  sigma = check_arg("noise_multiplier", noise_multiplier, "(0, inf]")
  q = check_arg("sampling_rate", sampling_rate, "[0, 1]")
  t = check_arg("steps", steps, "[0, inf]")
  with np.errstate(over="ignore"):  # exp(1/sigma^2) overflows to inf for tiny sigma: mu = inf.
    return _out(q * np.sqrt(t * np.expm1(1.0 / sigma**2)))


# --------------------------------------------------------------------------------------------------
# ReRo with data priors: closed forms (f-DP, mu-GDP).
# --------------------------------------------------------------------------------------------------


def gaussian_tradeoff(mu) -> TradeOff:
  """The trade-off function of mu-GDP: f(alpha) = Phi(Phi^-1(1 - alpha) - mu).

  f(alpha) is the smallest type II error of any test between N(0, 1) and N(mu, 1) with type I
  error alpha; a mechanism is mu-GDP when telling neighbours apart is at least this hard.
  """
  mu = float(check_arg("mu", mu, "[0, inf]"))

  def f(alpha):
    alpha = check_arg("alpha", alpha, "[0, 1]")
    with np.errstate(invalid="ignore"):
      beta = special.ndtr(special.ndtri(1.0 - alpha) - mu)
    # inf - inf at alpha = 0, mu = inf: perfectly distinguishable, so type II error 0.
    return _out(np.where(np.isnan(beta), 0.0, beta))

  return f


def rero_bound_tradeoff(f: TradeOff, kappa) -> float | np.ndarray:
  """Upper bound 1 - f(kappa) on the success probability of ANY reconstruction attack against an
  f-DP mechanism, for an attacker whose prior success (without the release) is kappa.

  (Hayes et al. 2023 for DP-SGD; Kaissis et al. 2023 for the f-DP form.) Holds for any data prior
  and any notion of "success" with that baseline probability kappa.
  """
  kappa = check_arg("kappa", kappa, "[0, 1]")
  value = np.asarray(f(kappa), dtype=np.float64)
  if np.any(~(value >= -1e-12) | ~(value <= 1.0 + 1e-12)):
    raise ValueError(f"the trade-off function returned {value}, outside [0, 1]")
  return _out(np.clip(1.0 - value, 0.0, 1.0))


def rero_bound_gdp(mu, kappa) -> float | np.ndarray:
  """ReRo bound under mu-GDP: Phi(Phi^-1(kappa) + mu), in [kappa, 1].

  Equals `rero_bound_tradeoff(gaussian_tradeoff(mu), kappa)`: 1 - Phi(Phi^-1(1 - kappa) - mu) =
  Phi(mu - Phi^-1(1 - kappa)) = Phi(Phi^-1(kappa) + mu). mu = 0 (no information released) gives
  kappa; the bound grows with mu and kappa and tends to 1 as mu -> inf. Broadcasts over arrays.
  """
  mu = check_arg("mu", mu, "[0, inf]")
  kappa = check_arg("kappa", kappa, "[0, 1]")
  with np.errstate(invalid="ignore"):
    bound = special.ndtr(special.ndtri(kappa) + mu)
  # Edge cases where -inf + inf is NaN: kappa = 0 with mu = inf. A certain-to-fail prior stays 0
  # only for finite mu; with infinite mu the release reveals everything.
  bound = np.where(np.isnan(bound), 1.0, bound)
  return _out(bound)


# --------------------------------------------------------------------------------------------------
# ReRo of a DP-SGD run: PLD numerics (the default), GDP, exact.
# --------------------------------------------------------------------------------------------------


def _check(noise_multiplier: float, sampling_rate: float, steps: int, method: str) -> None:
  accounting.check_params(noise_multiplier=noise_multiplier, sampling_rate=sampling_rate,
                          steps=steps)
  if method not in METHODS:
    raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}.")


def auto_value_discretization_interval(*, noise_multiplier: float, sampling_rate: float,
                                       steps: int) -> float:
  """PLD loss grid scaled to the run: mu / 500, clipped to [1e-5, 1e-3].

  The composed privacy loss is roughly N(mu^2 / 2, mu^2) (GDP), so its spread is ~mu; a grid fixed
  at 1e-3 is fine for mu ~ 1 but too coarse for the small mu of a large noise multiplier, where it
  would overstate the bound's excess over kappa by up to ~2x. mu here is only a scale (the CLT
  value is close enough for that), not part of the bound.
  """
  mu = mechanism_mu(noise_multiplier=noise_multiplier, sampling_rate=sampling_rate, steps=steps)
  if not math.isfinite(mu) or mu <= 0:
    return DEFAULT_VALUE_DISCRETIZATION_INTERVAL
  return min(max(mu / AUTO_GRID_PER_MU, MIN_VALUE_DISCRETIZATION_INTERVAL),
             DEFAULT_VALUE_DISCRETIZATION_INTERVAL)


def mechanism_mu(*, noise_multiplier: float, sampling_rate: float, steps: int) -> float:
  """GDP mu of the run: exact sqrt(T) / sigma for q = 1, the CLT approximation otherwise."""
  _check(noise_multiplier, sampling_rate, steps, "gdp")
  if steps == 0:
    return 0.0
  if noise_multiplier == 0:
    return math.inf
  if sampling_rate == 1.0:
    return math.sqrt(steps) / noise_multiplier
  return float(dpsgd_mu(noise_multiplier, sampling_rate, steps))


def _profile_at_atoms(pmf) -> tuple[np.ndarray, np.ndarray]:
  """(eps, delta(eps)) at eps = 0 and at every positive loss atom of a discretised PLD.

  delta(l_k) = w_inf + sum_{j > k} w_j (1 - e^(l_k - l_j)). The second part is accumulated from
  the top with the recursion W_k = e^(l_k - l_{k+1}) (w_{k+1} + W_{k+1}) (the grid is uniform), so
  no e^l is ever formed and nothing overflows for large losses.

  Reads the dense pmf's grid (dp-accounting 0.6: _lower_loss, _probs, _discretization,
  _infinity_mass); tests compare the result with the public get_delta_for_epsilon.
  """
  dense = pmf.to_dense_pmf()
  d = float(dense._discretization)
  probs = np.asarray(dense._probs, dtype=np.float64)
  losses = (np.arange(probs.size) + dense._lower_loss) * d
  inf_mass = float(dense._infinity_mass)
  positive = losses > 0  # Atoms at losses <= 0 never enter delta(eps) for eps >= 0.
  l, w = losses[positive], probs[positive]
  # Atom "eps = 0" first: delta(0) = w_inf + sum_{l_j > 0} w_j (1 - e^-l_j).
  eps = np.concatenate([[0.0], l])
  weights = np.concatenate([[0.0], w])  # The eps = 0 point carries no mass of its own.
  gaps = np.diff(eps)  # d everywhere except the first (0 -> smallest positive loss).
  # Suffix sums over j > k: U_k = sum w_j, W_k = sum w_j e^(eps_k - l_j).
  rev_w = weights[::-1]
  u = np.concatenate([np.cumsum(rev_w)[::-1][1:], [0.0]])
  # W_k = e^-gap_k (w_{k+1} + W_{k+1}), W_last = 0: reversed, y[n] = a x[n-1] + a y[n-1], a
  # first-order IIR filter while the gap is the uniform grid step d (all but the gap 0 -> l_1).
  if l.size == 0:
    w_sum = np.zeros(1)
  else:
    a = math.exp(-d)
    w_sum = signal.lfilter([0.0, a], [1.0, -a], rev_w)[::-1]
    w_sum[0] = math.exp(-gaps[0]) * (weights[1] + w_sum[1])
  delta = np.maximum(inf_mass + u - w_sum, 0.0)
  return eps, delta


def _directional_bound(kappa: np.ndarray, pq: tuple[np.ndarray, np.ndarray],
                       qp: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
  """inf_eps e^eps kappa + H_{e^eps}(P||Q) from the profiles of (P||Q) and (Q||P), eps >= 0 each."""
  k = kappa.reshape(-1, 1)
  eps_pq, delta_pq = pq
  eps_qp, delta_qp = qp
  with np.errstate(over="ignore", invalid="ignore"):
    # gamma >= 1 (eps >= 0). kappa = 0 with e^eps = inf would be NaN: only finite eps occur here.
    upper = np.min(np.exp(eps_pq)[None, :] * k + delta_pq[None, :], axis=1)
  # gamma < 1 (eps = -eps' < 0).
  lower = np.min(1.0 - np.exp(-eps_qp)[None, :] * (1.0 - k - delta_qp[None, :]), axis=1)
  return np.minimum(upper, lower).reshape(kappa.shape)


def _pld_bound(kappa: np.ndarray, noise_multiplier: float, sampling_rate: float, steps: int,
               value_discretization_interval: float) -> np.ndarray:
  pld = pld_lib.from_gaussian_mechanism(
      noise_multiplier, sampling_prob=sampling_rate,
      value_discretization_interval=value_discretization_interval).self_compose(int(steps))
  remove = _profile_at_atoms(pld._pmf_remove)  # delta_{P||Q}: upper = with the target.
  add = remove if pld._symmetric else _profile_at_atoms(pld._pmf_add)  # delta_{Q||P}.
  return np.maximum(_directional_bound(kappa, remove, add), _directional_bound(kappa, add, remove))


def rero_bound(*, noise_multiplier: float, sampling_rate: float, steps: int, kappa,
               method: str = "pld", value_discretization_interval: float | None = None
               ) -> float | np.ndarray:
  """Upper bound on the success probability of any reconstruction attack with prior success kappa.

  Args:
    noise_multiplier: sigma, noise std / clip norm (>= 0; 0 means no privacy: bound 1).
    sampling_rate: q in (0, 1], the Poisson sampling rate (1: full batch).
    steps: T >= 0 noisy steps (0: nothing released, bound = kappa).
    kappa: prior success probability in [0, 1]; a scalar or an array (one PLD serves all).
    method: "pld" (rigorous, numeric), "gdp" (CLT approximation for q < 1) or "exact" (closed
      form, q = 1 only). See the module docstring.
    value_discretization_interval: PLD loss grid for "pld" (coarser: faster and larger bound);
      None: `auto_value_discretization_interval`.

  Returns:
    The bound in [kappa, 1]: a float for scalar kappa, else an array of kappa's shape.

  Raises:
    ValueError: invalid arguments, or method "exact" with q < 1 (no closed form exists).
  """
  _check(noise_multiplier, sampling_rate, steps, method)
  k = check_arg("kappa", kappa, "[0, 1]")
  if steps == 0:
    return _out(k)
  if noise_multiplier == 0:
    return _out(np.ones_like(k))
  if method == "exact" and sampling_rate != 1.0:
    raise ValueError(f"method 'exact' needs sampling_rate 1 (full batch), got {sampling_rate}: "
                     "subsampled DP-SGD has no closed form; use method 'pld'.")
  if method in ("exact", "gdp"):
    mu = mechanism_mu(noise_multiplier=noise_multiplier, sampling_rate=sampling_rate, steps=steps)
    bound = np.asarray(rero_bound_gdp(mu, k), dtype=np.float64)
  else:
    if value_discretization_interval is None:
      value_discretization_interval = auto_value_discretization_interval(
          noise_multiplier=noise_multiplier, sampling_rate=sampling_rate, steps=steps)
    check_arg("value_discretization_interval", value_discretization_interval, "(0, inf)")
    bound = _pld_bound(np.atleast_1d(k), noise_multiplier, sampling_rate, steps,
                       value_discretization_interval).reshape(k.shape)
  return _out(np.clip(bound, k, 1.0))


# --------------------------------------------------------------------------------------------------
# Reports and the epsilon curve.
# --------------------------------------------------------------------------------------------------


def rero_summary(*, noise_multiplier: float, sampling_rate: float, steps: int,
                 kappas: Sequence[float] = DEFAULT_KAPPAS, method: str = "pld",
                 delta: float | None = None) -> dict:
  """The numbers a report shows: the bound per kappa, the GDP cross-check, mu and epsilon.

  JSON-serialisable. `bounds` come from `method`; `gdp_bounds` always from the GDP formula (the
  cross-check; exact for q = 1); `epsilon` (accountant PLD at its default grid) only with a delta.
  """
  kappas = [float(k) for k in kappas]
  bounds = np.atleast_1d(rero_bound(noise_multiplier=noise_multiplier,
                                    sampling_rate=sampling_rate, steps=steps, kappa=kappas,
                                    method=method))
  gdp = np.atleast_1d(rero_bound(noise_multiplier=noise_multiplier, sampling_rate=sampling_rate,
                                 steps=steps, kappa=kappas, method="gdp"))
  out = {
      "method": method,
      "value_discretization_interval": (
          auto_value_discretization_interval(noise_multiplier=noise_multiplier,
                                             sampling_rate=sampling_rate, steps=steps)
          if method == "pld" and noise_multiplier > 0 else None),
      "noise_multiplier": float(noise_multiplier),
      "sampling_rate": float(sampling_rate),
      "steps": int(steps),
      "mu": mechanism_mu(noise_multiplier=noise_multiplier, sampling_rate=sampling_rate,
                         steps=steps),
      "mu_is_exact": sampling_rate == 1.0,
      "kappas": kappas,
      "bounds": [float(b) for b in bounds],
      "gdp_bounds": [float(b) for b in gdp],
  }
  if delta is not None:
    out["delta"] = float(delta)
    out["epsilon"] = accounting.epsilon(noise_multiplier=noise_multiplier,
                                        sampling_rate=sampling_rate, steps=steps, delta=delta)
  return out


def rero_curve(*, sampling_rate: float, steps: int, delta: float,
               kappas: Sequence[float] = DEFAULT_KAPPAS,
               noise_multipliers: Sequence[float] | None = None, method: str = "pld",
               max_epsilon: float = 64.0) -> dict:
  """ReRo bound against epsilon for fixed q, T, delta: sigma varies, one row per sigma.

  Epsilon comes from `accounting.epsilon` with the PLD accountant (the epsilon a training ledger
reports): on its default 1e-4 grid where epsilon <= 10, and on a 1e-3 grid above (10x faster there,
and measured within 0.1% of the 1e-4 value for epsilon > 8). Points with epsilon above
`max_epsilon` (or infinite) are dropped: there every bound is ~1.

  Returns:
    {"noise_multipliers": [S], "epsilons": [S], "kappas": [K], "bounds": [S][K], + settings}.
  """
  accounting.check_params(sampling_rate=sampling_rate, steps=steps, delta=delta)
  if noise_multipliers is None:
    noise_multipliers = DEFAULT_CURVE_SIGMAS
  kappas = [float(k) for k in kappas]
  sigmas, epsilons, bounds = [], [], []
  for sigma in sorted(float(s) for s in noise_multipliers):
    eps = accounting.epsilon(noise_multiplier=sigma, sampling_rate=sampling_rate, steps=steps,
                             delta=delta, value_discretization_interval=1e-3)
    if eps <= 10.0:
      eps = accounting.epsilon(noise_multiplier=sigma, sampling_rate=sampling_rate, steps=steps,
                               delta=delta)
    if not eps <= max_epsilon:
      continue
    b = rero_bound(noise_multiplier=sigma, sampling_rate=sampling_rate, steps=steps,
                   kappa=kappas, method=method)
    sigmas.append(sigma)
    epsilons.append(float(eps))
    bounds.append([float(v) for v in np.atleast_1d(b)])
  return {"sampling_rate": float(sampling_rate), "steps": int(steps), "delta": float(delta),
          "method": method, "kappas": kappas, "noise_multipliers": sigmas,
          "epsilons": epsilons, "bounds": bounds}


def plot_rero_curve(curve: dict, path, *, mark_epsilon: float | None = None) -> None:
  """PNG of `rero_curve`'s output: bound vs epsilon (log x), one line per kappa, written atomically.

  The dashed horizontal line at each kappa is the attacker's prior: the gap above it is what the
  training run can add at most. `mark_epsilon` draws a vertical line (e.g. the run's own epsilon).
  """
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  from jaxldm.atomic import atomic_open

  eps = np.asarray(curve["epsilons"], dtype=np.float64)
  bounds = np.asarray(curve["bounds"], dtype=np.float64).reshape(len(eps), len(curve["kappas"]))
  fig, ax = plt.subplots(figsize=(5.5, 4.0))
  try:
    for j, kappa in enumerate(curve["kappas"]):
      line, = ax.plot(eps, bounds[:, j], marker="o", markersize=3, label=f"kappa = {kappa:g}")
      ax.axhline(kappa, color=line.get_color(), linestyle=":", linewidth=0.8)
    if mark_epsilon is not None and math.isfinite(mark_epsilon) and mark_epsilon > 0:
      ax.axvline(mark_epsilon, color="black", linestyle="--", linewidth=0.8,
                 label=f"this run: eps = {mark_epsilon:.3g}")
    if len(eps) and eps.min() > 0:
      ax.set_xscale("log")
    ax.set_ylim(0.0, 1.02)
    ax.set_xlabel(f"epsilon (delta = {curve['delta']:g})")
    ax.set_ylabel("reconstruction success bound")
    ax.set_title(f"ReRo bound ({curve['method'].upper()}), q = {curve['sampling_rate']:.3g}, "
                 f"T = {curve['steps']}", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    with atomic_open(path, "wb") as f:
      fig.savefig(f, format="png", dpi=120)
  finally:
    plt.close(fig)


# --------------------------------------------------------------------------------------------------
# Without data priors (Ziller et al. 2024).
# --------------------------------------------------------------------------------------------------


def expected_mse_optimal_attack(noise_std, x_norm_sq) -> float | np.ndarray:
  """E[MSE] of the optimal prior-free reconstruction: s^2 * ||x||^2.

  Ziller et al. 2024 (arXiv 2402.12861) show that an attacker without data priors reconstructing
  a sample x in R^N from a DP-SGD update (an analytic gradient inversion) can at best estimate x
  from x_hat ~ N(x, s^2 ||x||^2 I_N): the signal enters the update at scale ||x||, and the noise at
  s times that scale, where s is the noise multiplier. MSE is the per-coordinate mean,
  MSE = ||x_hat - x||^2 / N, whose expectation is s^2 ||x||^2 (and ||x_hat - x||^2 / (s^2 ||x||^2)
  is chi-square with N degrees of freedom).

  Args:
    noise_std: s, the noise standard deviation RELATIVE to ||x|| (the noise multiplier in the
      setting above), not an absolute std; > 0.
    x_norm_sq: ||x||^2, the squared L2 norm of the sample (in the units of the data).
  """
  s = check_arg("noise_std", noise_std, "(0, inf]")
  x2 = check_arg("x_norm_sq", x_norm_sq, "[0, inf]")
  return _out(s**2 * x2)


def mse_success_probability(mse_threshold, *, n_dims: int, noise_std,
                            x_norm_sq) -> float | np.ndarray:
  """Pr[MSE <= mse_threshold] for the optimal prior-free attack of `expected_mse_optimal_attack`.

  With x_hat = x + z, z ~ N(0, s^2 ||x||^2 I_N): N * MSE / (s^2 ||x||^2) = ||z||^2 / (s^2 ||x||^2)
  ~ chi^2_N, and the chi-square CDF is P(N/2, c/2) (regularized lower incomplete gamma), so
  Pr[MSE <= t] = P(N/2, N t / (2 s^2 ||x||^2)). Being the optimal attack's success in Ziller et
  al.'s prior-free threat model, it upper-bounds every attack in that model (not attackers with
  data priors: for those use the ReRo bounds above).
  """
  check_arg("n_dims", n_dims, "[1, inf)", integer=True)
  t = check_arg("mse_threshold", mse_threshold, "[0, inf]")
  scale = check_arg("expected MSE s^2 ||x||^2", expected_mse_optimal_attack(noise_std, x_norm_sq), "(0, inf]")
  return _out(special.gammainc(n_dims / 2.0, n_dims * t / (2.0 * scale)))


def psnr_success_probability(psi, *, n_dims: int, data_range, noise_std,
                             x_norm_sq) -> float | np.ndarray:
  """Pr[PSNR >= psi] for the optimal prior-free attack.

  Pr[PSNR >= psi] = P(N/2, N R^2 10^(-psi/10) / (2 s^2 ||x||^2)).

  Derivation: PSNR = 10 log10(R^2 / MSE), so PSNR >= psi  <=>  MSE <= R^2 10^(-psi/10); then
  `mse_success_probability` with that threshold. P is the regularized lower incomplete gamma
  (scipy.special.gammainc), N = n_dims, R = data_range, s = noise_std (relative to ||x||, see
  `expected_mse_optimal_attack`).

  Args:
    psi: PSNR target in dB (any real; broadcasts).
    n_dims: N, the number of dimensions (voxels) of x.
    data_range: R > 0, the dynamic range of the data used in the PSNR.
    noise_std: s > 0, relative noise std (the noise multiplier).
    x_norm_sq: ||x||^2 > 0.
  """
  r = check_arg("data_range", data_range, "(0, inf]")
  psi = check_arg("psi", psi, "[-inf, inf]")
  return mse_success_probability(r**2 * 10.0**(-psi / 10.0), n_dims=n_dims, noise_std=noise_std,
                                 x_norm_sq=x_norm_sq)
