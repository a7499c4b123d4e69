"""Study: does public pretraining help DP finetuning, and does DP stop memorization?

epsilon {1, 3, 10, inf} x {pretrained on public, from scratch} x 3 seeds, on the `jaxldm ablate`
machinery (the ablation preset; same fields). The `tiny` variant reuses what `make demo` trained on
PUBLIC phantoms (runs/demo: autoencoder, contrastive encoder, pretrained LDM, held-out private
volumes) and finetunes on a SMALL private set of 16 phantoms, where a non-private LDM memorizes:

  make demo
  jaxldm data phantoms --out runs/study/private --n 16 --domain private --seed 3 --size tiny
  jaxldm ablate --config study_pretraining:tiny --workdir runs/study

DP runs: `ldm_dp:tiny` (100 steps, expected batch 4 of 16: q = 0.25, K = 2, C = 1, sigma
calibrated to each epsilon). epsilon = inf is the non-private LDM trainer (`ldm:tiny`) on
the same 16 volumes, trained longer (base.nonprivate_overrides): the ceiling each private curve is
compared with, and the memorization reference. Seeds fix the DP noise seed (research runs, see
the ablation preset). The results table is WORKDIR/summary.md (mean and 95% CI over seeds).
"""

from __future__ import annotations

from jaxldm.config import preset


def get_config(arg=None):
  c = preset("ablation", arg)  # grid, base, eval, vmap_seeds (the variant is checked there).
  tiny = arg == "tiny"
  c.grid.target_epsilon = (10.0, float("inf"), 3.0, 1.0)  # inf = non-private trainer; headline cells run first.
  c.grid.pretrained = (True, False)  # Public-pretrained LDM vs from scratch: the question of the study.
  c.grid.noise_multiplicity = (c.grid.noise_multiplicity[0],)  # One K (the variant's first).
  c.grid.l2_clip_norm = (1.0,)  # One C.
  c.grid.seeds = (0, 1, 2)  # Three seeds: mean and 95% CI per cell.
  if tiny:  # What `make demo` wrote (public stages) + the study's small private set.
    c.base.autoencoder_workdir = "runs/demo/autoencoder"  # The demo's public autoencoder.
    c.base.pretrained_workdir = "runs/demo/ldm"  # The demo's public-pretrained LDM.
    c.base.data_root = "runs/study/private"  # 16 private phantoms (jaxldm data phantoms ... --seed 3).
    c.base.scratch_stats_from = "runs/demo/phantoms/public/attributes.csv"  # Public attribute mean/std for scratch runs.
    c.base.overrides = ("dp.expected_batch_size=4", "dp.microbatch_size=4", "train.sample_every=0")  # q = 4/16.
    c.base.nonprivate_overrides = ("train.steps=600",)  # ~300 epochs of the 16 volumes (a CPU budget: see README Results).
    c.eval.real = "runs/demo/phantoms/heldout"  # The demo's 256 held-out private volumes.
    c.eval.feature_weights = "runs/demo/ssl"  # The demo's contrastive encoder (ssl3d features).
    c.eval.n = 32  # Copy rate resolution 1/32.
  return c
