"""Reconstruction-risk bounds: what a DP guarantee implies about data reconstruction attacks.

Epsilon is hard to read as a risk. These bounds translate a Gaussian-mechanism / DP-SGD guarantee
into the probability that an attacker reconstructs a training sample:

* With data priors (Hayes et al. 2023; Kaissis et al. 2023): reconstruction robustness (ReRo). An
  attacker who knows the target lies in some prior set and would succeed with probability kappa
  without seeing the model succeeds, after seeing the output of an f-DP mechanism, with probability
  at most 1 - f(kappa); for mu-GDP that is Phi(Phi^-1(kappa) + mu). Worst case: it covers any
  prior, any success criterion and any attack.
* Without data priors (Ziller et al. 2024, arXiv 2402.12861): an attacker reconstructing from
  scratch (analytic gradient inversion) can do no better than estimating the sample from a noisy
  copy of it, which gives closed forms for the expected MSE and the probability of reaching a PSNR.

This module is pure numpy/scipy on scalars (or broadcastable arrays); it imports no model code and
no other privacy module, so it can be used to plan a budget before anything is trained.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy import special

TradeOff = Callable[[np.ndarray], np.ndarray]


def _out(x: np.ndarray) -> float | np.ndarray:
  """Python float for scalar results, the array otherwise."""
  x = np.asarray(x, dtype=np.float64)
  return float(x) if x.ndim == 0 else x


def _check_probability(name: str, p) -> np.ndarray:
  p = np.asarray(p, dtype=np.float64)
  if np.any(~(p >= 0.0) | ~(p <= 1.0)):
    raise ValueError(f"{name} must lie in [0, 1], got {p}")
  return p


def _check_nonnegative(name: str, x, strict: bool = False) -> np.ndarray:
  x = np.asarray(x, dtype=np.float64)
  bad = ~(x > 0) if strict else ~(x >= 0)
  if np.any(bad) or np.any(np.isnan(x)):
    raise ValueError(f"{name} must be {'>' if strict else '>='} 0, got {x}")
  return x


# --------------------------------------------------------------------------------------------------
# Gaussian differential privacy parameters.
# --------------------------------------------------------------------------------------------------


def gdp_mu(sensitivity, noise_std) -> float | np.ndarray:
  """mu of the Gaussian mechanism: mu = sensitivity / noise_std (one release is exactly mu-GDP).

  Distinguishing two neighbouring datasets from one release is then as hard as telling N(0, 1)
  from N(mu, 1).
  """
  sensitivity = _check_nonnegative("sensitivity", sensitivity)
  noise_std = _check_nonnegative("noise_std", noise_std, strict=True)
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
  sigma = _check_nonnegative("noise_multiplier", noise_multiplier, strict=True)
  q = _check_probability("sampling_rate", sampling_rate)
  t = _check_nonnegative("steps", steps)
  with np.errstate(over="ignore"):  # exp(1/sigma^2) overflows to inf for tiny sigma: mu = inf.
    return _out(q * np.sqrt(t * np.expm1(1.0 / sigma**2)))


# --------------------------------------------------------------------------------------------------
# ReRo with data priors (f-DP).
# --------------------------------------------------------------------------------------------------


def gaussian_tradeoff(mu) -> TradeOff:
  """The trade-off function of mu-GDP: f(alpha) = Phi(Phi^-1(1 - alpha) - mu).

  f(alpha) is the smallest type II error of any test between N(0, 1) and N(mu, 1) with type I
  error alpha; a mechanism is mu-GDP when telling neighbours apart is at least this hard.
  """
  mu = float(_check_nonnegative("mu", mu))

  def f(alpha):
    alpha = _check_probability("alpha", alpha)
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
  kappa = _check_probability("kappa", kappa)
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
  mu = _check_nonnegative("mu", mu)
  kappa = _check_probability("kappa", kappa)
  with np.errstate(invalid="ignore"):
    bound = special.ndtr(special.ndtri(kappa) + mu)
  # Edge cases where -inf + inf is NaN: kappa = 0 with mu = inf. A certain-to-fail prior stays 0
  # only for finite mu; with infinite mu the release reveals everything.
  bound = np.where(np.isnan(bound), 1.0, bound)
  return _out(bound)


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
  s = _check_nonnegative("noise_std", noise_std, strict=True)
  x2 = _check_nonnegative("x_norm_sq", x_norm_sq)
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
  if int(n_dims) != n_dims or n_dims < 1:
    raise ValueError(f"n_dims must be a positive integer, got {n_dims}")
  t = _check_nonnegative("mse_threshold", mse_threshold)
  scale = _check_nonnegative("expected MSE s^2 ||x||^2",
                             expected_mse_optimal_attack(noise_std, x_norm_sq), strict=True)
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
  r = _check_nonnegative("data_range", data_range, strict=True)
  psi = np.asarray(psi, dtype=np.float64)
  if np.any(np.isnan(psi)):
    raise ValueError("psi must not be NaN")
  return mse_success_probability(r**2 * 10.0**(-psi / 10.0), n_dims=n_dims, noise_std=noise_std,
                                 x_norm_sq=x_norm_sq)
