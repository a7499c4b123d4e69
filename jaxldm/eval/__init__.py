"""Evaluation: what comes out of a trained model, measured against real data.

Modules (numpy/scipy on features or volumes; none imports JAX or the models, so importing this
package stays cheap):
  fid           FID, KID, precision/recall, MS-SSIM diversity, cached reference statistics
  memorization  copy detection by embedding correlation (Dar et al. 2023)
  safeguard     release only samples far from every training sample (Shi et al. 2023)

Feature extractors, controllability and downstream-utility evaluators, which do need models, are
meant to live in their own modules and are not imported here.
"""

from jaxldm.eval import fid
from jaxldm.eval import memorization
from jaxldm.eval import safeguard

__all__ = ["fid", "memorization", "safeguard"]
