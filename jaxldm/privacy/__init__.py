"""The differential-privacy engine: DP-SGD for any per-example `loss_fn(params, example, rng)`.

Modules, each with one job (they do not import the models, and barely each other):
  clipping   per-example gradients, clipping, masked sums; knows its sensitivity
  noise      Gaussian noise once per logical batch, divided by the expected batch size
  sampling   Poisson batch selection on the host, padded to static shapes with masks
  accounting epsilon and noise calibration via dp-accounting (PLD, RDP)
  ledger     the run's JSON privacy record, resumable, with budget checks
  audit      an empirical lower bound on epsilon from a white-box canary audit
"""

from jaxldm.privacy import accounting
from jaxldm.privacy import audit
from jaxldm.privacy import clipping
from jaxldm.privacy import ledger
from jaxldm.privacy import noise
from jaxldm.privacy import sampling

__all__ = ['accounting', 'audit', 'clipping', 'ledger', 'noise', 'sampling']
