"""Reconstruction risk in closed form (GDP, f-DP trade-off, prior-free attacks) against scipy and
Monte-Carlo simulations; the numeric bound of a whole DP-SGD run is in test_reconstruction.py."""

import numpy as np
import pytest
from scipy import optimize
from scipy import stats

from jaxldm.privacy import reconstruction as rr


def test_gdp_mu():
  assert rr.gdp_mu(1.0, 2.0) == 0.5
  assert rr.gdp_mu(0.0, 2.0) == 0.0
  np.testing.assert_allclose(rr.gdp_mu(np.array([1.0, 3.0]), 1.5), [2 / 3, 2.0])
  with pytest.raises(ValueError, match="noise_std"):
    rr.gdp_mu(1.0, 0.0)
  with pytest.raises(ValueError, match="sensitivity"):
    rr.gdp_mu(-1.0, 1.0)


def _gdp_delta(eps, mu):
  """delta(eps) of mu-GDP (Dong, Roth & Su 2022, Corollary 2.13), written out independently."""
  return stats.norm.cdf(-eps / mu + mu / 2) - np.exp(eps) * stats.norm.cdf(-eps / mu - mu / 2)


def test_dpsgd_mu_clt_agrees_with_the_pld_reference():
  # Reference: q = 256/60000, sigma = 1.1, 14062 steps, delta = 1e-5 -> PLD eps 2.382.
  mu = rr.dpsgd_mu(1.1, 256 / 60000, 14062)
  eps = optimize.brentq(lambda e: _gdp_delta(e, mu) - 1e-5, 1e-6, 50.0)
  assert eps == pytest.approx(2.382, rel=0.05)
  assert eps < 2.382  # The CLT is known to be slightly optimistic here.


def test_dpsgd_mu_limits_and_monotonicity():
  assert rr.dpsgd_mu(1.0, 0.0, 1000) == 0.0
  assert rr.dpsgd_mu(1.0, 0.01, 0) == 0.0
  assert rr.dpsgd_mu(1.0, 0.01, 400) == pytest.approx(2 * rr.dpsgd_mu(1.0, 0.01, 100))
  assert rr.dpsgd_mu(0.8, 0.01, 100) > rr.dpsgd_mu(1.2, 0.01, 100)
  assert rr.dpsgd_mu(0.01, 0.01, 100) == np.inf
  with pytest.raises(ValueError, match="sampling_rate"):
    rr.dpsgd_mu(1.0, 1.5, 10)
  with pytest.raises(ValueError, match="noise_multiplier"):
    rr.dpsgd_mu(0.0, 0.1, 10)


def test_rero_bound_gdp_properties():
  kappas = np.linspace(0.0, 1.0, 41)
  mus = np.array([0.0, 0.1, 0.5, 1.0, 2.0, 5.0])
  np.testing.assert_allclose(rr.rero_bound_gdp(0.0, kappas), kappas, atol=1e-12)
  table = rr.rero_bound_gdp(mus[:, None], kappas[None, :])
  assert np.all(table >= kappas - 1e-12) and np.all(table <= 1.0)
  assert np.all(np.diff(table, axis=0) >= 0)  # Non-decreasing in mu...
  assert np.all(np.diff(table, axis=1) >= 0)  # ...and in kappa.
  assert np.all(np.diff(table[:, 1:-1], axis=0) > 0)  # Strictly in mu for 0 < kappa < 1.
  # Closed form at a point: kappa = 1/2 gives Phi(mu).
  assert rr.rero_bound_gdp(1.0, 0.5) == pytest.approx(stats.norm.cdf(1.0), rel=1e-12)
  assert rr.rero_bound_gdp(np.inf, 0.0) == 1.0
  with pytest.raises(ValueError, match="kappa"):
    rr.rero_bound_gdp(1.0, 1.2)
  with pytest.raises(ValueError, match="mu"):
    rr.rero_bound_gdp(-0.1, 0.5)


def test_tradeoff_form_equals_gdp_form():
  kappas = np.linspace(0.0, 1.0, 21)
  for mu in (0.0, 0.3, 1.0, 3.0):
    np.testing.assert_allclose(rr.rero_bound_tradeoff(rr.gaussian_tradeoff(mu), kappas),
                               rr.rero_bound_gdp(mu, kappas), atol=1e-12)
  # Any f works: the trivial trade-off f(a) = 1 - a (perfect privacy) gives back kappa.
  np.testing.assert_allclose(rr.rero_bound_tradeoff(lambda a: 1 - a, kappas), kappas)
  with pytest.raises(ValueError, match="outside"):
    rr.rero_bound_tradeoff(lambda a: a + 2.0, 0.5)


def test_gaussian_mechanism_monte_carlo_matches_the_tradeoff_curve():
  # Two neighbouring outputs at distance `sensitivity`, noise std s. The most powerful test of
  # H0: y ~ N(0, s^2) vs H1: y ~ N(sensitivity, s^2) at level alpha thresholds y (Neyman-Pearson);
  # its threshold comes from the empirical null quantile, so the simulation does not use Phi.
  rng = np.random.default_rng(0)
  sensitivity, s, n = 1.0, 0.8, 400_000
  f = rr.gaussian_tradeoff(rr.gdp_mu(sensitivity, s))
  y0 = s * rng.normal(size=n)
  y1 = sensitivity + s * rng.normal(size=n)
  for alpha in (0.01, 0.05, 0.2, 0.5, 0.8):
    t = np.quantile(y0, 1 - alpha)
    beta = np.mean(y1 <= t)
    assert beta == pytest.approx(f(alpha), abs=0.005)  # Binomial s.e. here is <= 0.001.


def test_reconstruction_game_monte_carlo_respects_the_bound():
  # Prior: the target is one of K points, pairwise at distance `sensitivity` (scaled orthonormal
  # basis), drawn uniformly: kappa = 1/K. The mechanism releases target + N(0, s^2 I), which is
  # (sensitivity / s)-GDP for this set; the optimal (maximum-likelihood) attack guesses the
  # nearest point. Its success must lie between kappa and the ReRo bound.
  rng = np.random.default_rng(1)
  sensitivity, s, n = 1.0, 0.5, 100_000
  mu = rr.gdp_mu(sensitivity, s)
  for k in (2, 10):
    points = np.eye(k) * sensitivity / np.sqrt(2)
    target = rng.integers(0, k, size=n)
    y = points[target] + s * rng.normal(size=(n, k))
    guess = np.argmax(y, axis=1)  # Nearest point: equal norms, so the largest coordinate.
    success = np.mean(guess == target)
    assert 1 / k < success <= rr.rero_bound_gdp(mu, 1 / k) + 0.005
    if k == 2:  # Sanity of the simulation itself: two points, success Phi(mu / 2).
      assert success == pytest.approx(stats.norm.cdf(mu / 2), abs=0.005)


def test_mse_and_psnr_probabilities_match_chi_square():
  n, s, x2, r = 50, 0.3, 4.0, 2.0
  t = np.array([0.1, 0.3, 0.36, 0.5])
  # N * MSE / (s^2 ||x||^2) ~ chi^2_N.
  np.testing.assert_allclose(rr.mse_success_probability(t, n_dims=n, noise_std=s, x_norm_sq=x2),
                             stats.chi2.cdf(n * t / (s**2 * x2), df=n), rtol=1e-10)
  psi = np.array([5.0, 10.0, 20.0])
  np.testing.assert_allclose(
      rr.psnr_success_probability(psi, n_dims=n, data_range=r, noise_std=s, x_norm_sq=x2),
      stats.chi2.cdf(n * r**2 * 10**(-psi / 10) / (s**2 * x2), df=n), rtol=1e-10)


def test_prior_free_attack_monte_carlo():
  # Simulate the optimal prior-free attack directly: x_hat = x + N(0, s^2 ||x||^2 I_N), then
  # MSE = mean((x_hat - x)^2) and PSNR = 10 log10(R^2 / MSE).
  rng = np.random.default_rng(2)
  n_dims, s, r, trials = 16, 0.05, 1.0, 200_000
  x = rng.uniform(size=n_dims)
  x2 = float(x @ x)
  x_hat = x + s * np.sqrt(x2) * rng.normal(size=(trials, n_dims))
  mse = np.mean((x_hat - x)**2, axis=1)
  psnr = 10 * np.log10(r**2 / mse)
  assert mse.mean() == pytest.approx(rr.expected_mse_optimal_attack(s, x2), rel=0.01)
  for psi in np.quantile(psnr, [0.1, 0.5, 0.9]) + [0.3, -0.2, 0.1]:
    p = rr.psnr_success_probability(psi, n_dims=n_dims, data_range=r, noise_std=s, x_norm_sq=x2)
    assert np.mean(psnr >= psi) == pytest.approx(p, abs=0.005)


def test_psnr_probability_shape():
  kw = dict(n_dims=100, data_range=1.0, noise_std=0.1, x_norm_sq=10.0)
  psi = np.linspace(-20, 80, 101)
  p = rr.psnr_success_probability(psi, **kw)
  assert np.all(np.diff(p) <= 0)  # Harder targets are reached less often.
  assert p[0] == pytest.approx(1.0) and p[-1] == pytest.approx(0.0, abs=1e-12)
  # More noise never helps the attacker.
  noisier = {**kw, "noise_std": 0.2}
  assert rr.psnr_success_probability(18.0, **noisier) < rr.psnr_success_probability(18.0, **kw)
  with pytest.raises(ValueError, match="n_dims"):
    rr.psnr_success_probability(10.0, **{**kw, "n_dims": 0})
  with pytest.raises(ValueError, match="data_range"):
    rr.psnr_success_probability(10.0, **{**kw, "data_range": 0.0})
