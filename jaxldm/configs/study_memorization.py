"""Study: does a non-private LDM on small data copy its training volumes, and does DP stop it?

epsilon {10, 1, inf} x public-pretrained x 3 seeds on the `jaxldm ablate` machinery (the ablation preset;
same fields), on the same 16 private phantoms as the study_pretraining preset. The DP cells are the
pretraining study's pretrained cells (same configs and seeds); epsilon = inf trains the non-private LDM
for 1000 steps (~500 epochs of the 16 volumes) instead of 600. Every run is evaluated by Dar et al.'s
criterion twice: in the contrastive encoder's image-feature space (capped by the autoencoder: see
the reports' "detection ceiling") and on the LDM's own latents (`latent_memorization` in report.json).

  make demo
  jaxldm data phantoms --out runs/study/private --n 16 --domain private --seed 3 --size tiny
  jaxldm ablate --config study_memorization:tiny --workdir runs/study_memorization

The table is WORKDIR/summary.md (mean and 95% CI over seeds); seeds fix the DP noise seed (research
runs, see the ablation preset).
"""

from __future__ import annotations

from jaxldm.config import preset


def get_config(arg=None):
  c = preset("study_pretraining", arg)  # Its base, private set, eval (the variant is checked there).
  tiny = arg == "tiny"
  c.grid.target_epsilon = (10.0, float("inf"), 1.0)  # inf = the non-private trainer: the memorization reference.
  c.grid.pretrained = (True,)  # Public-pretrained only (the better DP model, the one a user would release).
  c.base.nonprivate_overrides = ("train.steps=1000",) if tiny else ("train.steps=40000",)  # Longer non-private training.
  return c
