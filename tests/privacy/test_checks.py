"""check_arg: the one range rule of the privacy modules' numeric arguments."""

import math

import numpy as np
import pytest

from jaxldm.privacy import accounting, noise, reconstruction, sampling
from jaxldm.privacy.checks import check_arg


def test_interval_ends_open_closed_and_infinite():
  assert check_arg("q", 1.0, "(0, 1]") == 1.0
  for bad in (0.0, 1.5, -0.1, math.nan):
    with pytest.raises(ValueError, match=r"^q must be in \(0, 1\], got "):
      check_arg("q", bad, "(0, 1]")
  assert check_arg("mu", math.inf, "[0, inf]") == math.inf
  with pytest.raises(ValueError, match=r"sigma must be a finite number >= 0, got inf\."):
    check_arg("sigma", math.inf, "[0, inf)")
  with pytest.raises(ValueError, match="psi must be a number, got nan"):
    check_arg("psi", math.nan, "[-inf, inf]")


def test_integers_arrays_and_non_numbers():
  assert check_arg("steps", 3.0, "[0, inf)", integer=True) == 3.0
  for bad in (2.5, -1, True, "3", None):
    with pytest.raises(ValueError, match="steps must be an integer >= 0"):
      check_arg("steps", bad, "[0, inf)", integer=True)
  np.testing.assert_array_equal(check_arg("kappa", [0.0, 0.5, 1.0], "[0, 1]"), [0.0, 0.5, 1.0])
  with pytest.raises(ValueError, match="kappa must be in"):
    check_arg("kappa", np.array([0.5, 1.2]), "[0, 1]")


def test_the_privacy_modules_share_the_rule():
  """Each module names the bad argument in the same words."""
  calls = [
      (lambda: accounting.epsilon(noise_multiplier=1.0, sampling_rate=1.5, steps=1, delta=1e-5), "sampling_rate"),
      (lambda: accounting.epsilon(noise_multiplier=1.0, sampling_rate=0.1, steps=1.5, delta=1e-5), "steps"),
      (lambda: sampling.PoissonBatcher(10, 0.0), "sampling_rate"),
      (lambda: sampling.PoissonBatcher(10, 0.5, microbatch_size=0), "microbatch_size"),
      (lambda: noise._check_nonnegative_if_concrete("expected_batch_size", 0.0, strict=True), "expected_batch_size"),
      (lambda: reconstruction.rero_bound(noise_multiplier=1.0, sampling_rate=1.5, steps=1, kappa=0.1),
       "sampling_rate"),
      (lambda: reconstruction.dpsgd_mu(1.0, 1.5, 10), "sampling_rate"),
  ]
  for call, name in calls:
    with pytest.raises(ValueError, match=rf"^{name} must be (an integer|a finite number|in) .*, got .*\.$"):
      call()
