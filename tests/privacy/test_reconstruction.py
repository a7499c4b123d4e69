"""rero_bound of a DP-SGD run: PLD numerics against the Gaussian closed form, the privacy profile and the GDP CLT."""

import numpy as np
import pytest
from dp_accounting.pld import privacy_loss_distribution as pld_lib
from scipy import stats

from jaxldm.privacy import reconstruction as rr

KAPPAS = np.array([1e-4, 1e-3, 1e-2, 0.1, 0.3, 0.5, 0.9])


def _closed_form(sigma, steps, kappa):
  """Phi(Phi^-1(kappa) + sqrt(T) / sigma), written with scipy.stats independently of the module."""
  return stats.norm.cdf(stats.norm.ppf(kappa) + np.sqrt(steps) / sigma)


@pytest.mark.parametrize("sigma", [0.5, 1.0, 2.0, 4.0])
def test_one_full_batch_step_matches_closed_form(sigma):
  for method in ("pld", "exact", "gdp"):
    bound = rr.rero_bound(noise_multiplier=sigma, sampling_rate=1.0, steps=1, kappa=KAPPAS,
                          method=method)
    np.testing.assert_allclose(bound, _closed_form(sigma, 1, KAPPAS), atol=1e-3, rtol=0)
  # The PLD route is in fact much closer than 1e-3: the discretisation is the only error.
  pld = rr.rero_bound(noise_multiplier=sigma, sampling_rate=1.0, steps=1, kappa=KAPPAS)
  np.testing.assert_allclose(pld, _closed_form(sigma, 1, KAPPAS), atol=1e-5, rtol=0)
  assert np.all(pld >= _closed_form(sigma, 1, KAPPAS) - 1e-9)  # Pessimistic, never optimistic.


def test_full_batch_composition_matches_closed_form():
  # T Gaussian steps at q = 1 are exactly sqrt(T)/sigma-GDP: checks the PLD composition too.
  for sigma, steps in ((1.0, 10), (3.0, 100), (8.0, 1000)):
    bound = rr.rero_bound(noise_multiplier=sigma, sampling_rate=1.0, steps=steps, kappa=KAPPAS)
    np.testing.assert_allclose(bound, _closed_form(sigma, steps, KAPPAS), atol=1e-4, rtol=0)


def test_scalar_in_scalar_out_and_edge_cases():
  b = rr.rero_bound(noise_multiplier=1.0, sampling_rate=0.1, steps=10, kappa=0.01)
  assert isinstance(b, float) and 0.01 < b < 1.0
  assert rr.rero_bound(noise_multiplier=1.0, sampling_rate=0.1, steps=0, kappa=0.01) == 0.01
  assert rr.rero_bound(noise_multiplier=0.0, sampling_rate=0.1, steps=5, kappa=0.01) == 1.0
  assert rr.rero_bound(noise_multiplier=1.0, sampling_rate=0.1, steps=10, kappa=1.0) == 1.0
  assert rr.rero_bound(noise_multiplier=1.0, sampling_rate=0.1, steps=10, kappa=0.0) < 1e-9
  with pytest.raises(ValueError, match="exact"):
    rr.rero_bound(noise_multiplier=1.0, sampling_rate=0.1, steps=10, kappa=0.1, method="exact")
  with pytest.raises(ValueError, match="kappa"):
    rr.rero_bound(noise_multiplier=1.0, sampling_rate=0.1, steps=10, kappa=1.5)
  with pytest.raises(ValueError, match="sampling_rate"):
    rr.rero_bound(noise_multiplier=1.0, sampling_rate=0.0, steps=10, kappa=0.1)
  with pytest.raises(ValueError, match="method"):
    rr.rero_bound(noise_multiplier=1.0, sampling_rate=0.1, steps=10, kappa=0.1, method="rdp")


def test_within_kappa_and_one_and_monotone():
  base = dict(noise_multiplier=1.0, sampling_rate=0.02, steps=300)
  for method in ("pld", "gdp"):
    grid = rr.rero_bound(**base, kappa=np.linspace(0, 1, 21), method=method)
    assert np.all(grid >= np.linspace(0, 1, 21)) and np.all(grid <= 1.0)
    assert np.all(np.diff(grid) >= 0)  # Non-decreasing in kappa.
    bound = lambda **kw: rr.rero_bound(**{**base, **kw}, kappa=KAPPAS[:-1], method=method)
    sig = [bound(noise_multiplier=s) for s in (0.7, 1.0, 1.5, 3.0)]
    steps = [bound(steps=t) for t in (10, 100, 300, 3000)]
    rates = [bound(sampling_rate=q) for q in (0.005, 0.02, 0.1, 0.5)]
    assert all(np.all(a > b) for a, b in zip(sig, sig[1:]))  # Falls with sigma...
    assert all(np.all(a < b) for a, b in zip(steps, steps[1:]))  # ...grows with steps...
    assert all(np.all(a < b) for a, b in zip(rates, rates[1:]))  # ...and with q.


def test_profile_at_atoms_matches_dp_accounting():
  pld = pld_lib.from_gaussian_mechanism(1.3, sampling_prob=0.05,
                                        value_discretization_interval=1e-3).self_compose(200)
  for pmf in (pld._pmf_remove, pld._pmf_add):
    eps, delta = rr._profile_at_atoms(pmf)
    assert eps[0] == 0 and np.all(np.diff(eps) > 0)
    idx = np.unique(np.linspace(0, len(eps) - 1, 200).astype(int))
    np.testing.assert_allclose(delta[idx], pmf.get_delta_for_epsilon(eps[idx]), atol=1e-12)


def test_pld_bound_equals_min_over_the_privacy_profile():
  # The naive form the issue names: ReRo <= min over eps >= 0 of e^eps kappa + delta(eps), with
  # delta(eps) from dp-accounting's public API on a fine eps grid (the max over both neighbour
  # orders). It is an upper bound of ours (ours also uses eps < 0 and the exact atoms) and equal to
  # it for small kappa, where the optimal eps is positive.
  sigma, q, steps, vdi = 1.0, 0.05, 100, 1e-3
  pld = pld_lib.from_gaussian_mechanism(sigma, sampling_prob=q,
                                        value_discretization_interval=vdi).self_compose(steps)
  eps = np.arange(0.0, 20.0, vdi)
  delta = np.maximum(pld._pmf_remove.get_delta_for_epsilon(eps),
                     pld._pmf_add.get_delta_for_epsilon(eps))
  kappas = np.array([1e-4, 1e-3, 1e-2, 0.05])
  naive = np.min(np.exp(eps)[None, :] * kappas[:, None] + delta[None, :], axis=1)
  ours = rr.rero_bound(noise_multiplier=sigma, sampling_rate=q, steps=steps, kappa=kappas,
                       value_discretization_interval=vdi)
  assert np.all(ours <= naive + 1e-12)
  np.testing.assert_allclose(ours, naive, atol=2e-4, rtol=0)
  # For large kappa the eps < 0 branch matters: the naive eps >= 0 form is capped at kappa + TV.
  big = rr.rero_bound(noise_multiplier=sigma, sampling_rate=q, steps=steps, kappa=0.9,
                      value_discretization_interval=vdi)
  assert big < 0.9 + delta[0]


@pytest.mark.parametrize("sigma,q,steps,atol", [
    (1.1, 256 / 60000, 14062, 2e-3),  # The reference run (Daum et al. scale).
    (2.0, 1e-3, 10000, 7e-3),
    (1.0, 0.01, 10000, 1e-2),
])
def test_pld_close_to_gdp_clt_for_small_q_many_steps(sigma, q, steps, atol):
  # Measured (vdi 1e-3): max |PLD - GDP| over these kappas is 8e-4, 5.7e-3 and 6.4e-3. The CLT is
  # an approximation, so agreement is loose by nature; at q >= 0.05 or sigma < 1 it drifts further.
  kappas = KAPPAS
  pld = rr.rero_bound(noise_multiplier=sigma, sampling_rate=q, steps=steps, kappa=kappas)
  gdp = rr.rero_bound(noise_multiplier=sigma, sampling_rate=q, steps=steps, kappa=kappas,
                      method="gdp")
  np.testing.assert_allclose(pld, gdp, atol=atol, rtol=0)


def test_finer_grid_gives_smaller_or_equal_bound():
  kw = dict(noise_multiplier=1.0, sampling_rate=0.01, steps=2000, kappa=KAPPAS)
  coarse = rr.rero_bound(**kw, value_discretization_interval=1e-2)
  default = rr.rero_bound(**kw)
  assert np.all(coarse >= default - 1e-9)
  assert np.max(coarse - default) < 0.05


def test_prior_free_bounds_at_a_point():
  assert rr.expected_mse_optimal_attack(0.5, 4.0) == pytest.approx(1.0)
  p = rr.psnr_success_probability(20.0, n_dims=100, data_range=2.0, noise_std=0.1, x_norm_sq=1.0)
  assert 0.0 <= p <= 1.0


def test_summary_and_curve(tmp_path):
  s = rr.rero_summary(noise_multiplier=1.0, sampling_rate=0.01, steps=100, kappas=(0.01, 0.1),
                      delta=1e-5)
  assert s["method"] == "pld" and len(s["bounds"]) == 2 and s["epsilon"] > 0
  assert s["bounds"][0] < s["bounds"][1]
  curve = rr.rero_curve(sampling_rate=0.01, steps=100, delta=1e-5, kappas=(0.01, 0.1),
                        noise_multipliers=(0.5, 1.0, 2.0, 4.0))
  eps = np.asarray(curve["epsilons"])
  bounds = np.asarray(curve["bounds"])
  assert bounds.shape == (len(eps), 2) and len(eps) >= 3
  # Larger sigma -> smaller epsilon and smaller bound.
  assert np.all(np.diff(eps) < 0) and np.all(np.diff(bounds, axis=0) < 0)
  path = tmp_path / "rero.png"
  rr.plot_rero_curve(curve, path, mark_epsilon=float(eps[1]))
  assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
