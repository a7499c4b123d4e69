"""DP ablation grid: target epsilon x pretrained-or-scratch x noise multiplicity K x clip norm C x seeds.

  jaxldm ablate --config ablation:tiny --workdir runs/ablation \
      --config.base.autoencoder_workdir=runs/ae --config.base.pretrained_workdir=runs/ldm

Every grid point is one run of the DP LDM trainer (the ldm_dp preset) named by its settings
(WORKDIR/runs/eps10-pre-K2-C1-s0), evaluated with `jaxldm evaluate`; WORKDIR/ablation.csv and
WORKDIR/ablation.png (FID vs epsilon) are rebuilt from the runs' reports. Re-running skips finished
runs. A target epsilon of inf trains the NON-private LDM trainer (the ldm preset) on the private data.

Research runs: each seed s fixes dp.noise_seed = 2 s (sampling seed 2 s + 1), so a vmapped-seeds run
and a separate run draw the same batches and noise and can be compared exactly. The privacy ledger
records the seed as fixed (not OS entropy): do not release models from an ablation.
`base.overrides` are extra `key=value` overrides of the trainer config, e.g.
  --config.base.overrides='("train.steps=200", "data.shape=6,32,32")'
"""

from __future__ import annotations

import ml_collections

from jaxldm.config import select_variant

VARIANTS = ("tiny", "default")


def ablation_config(variant: str) -> ml_collections.ConfigDict:
  """The `jaxldm ablate` groups: the grid, the trainer configs each run starts from, the evaluation."""
  tiny = variant == "tiny"
  c = ml_collections.ConfigDict()

  c.grid = ml_collections.ConfigDict()
  c.grid.target_epsilon = (3.0, 10.0)  # Target epsilons (sigma calibrated to each over train.steps); inf = non-private.
  c.grid.pretrained = (True, False)  # Start from the public-pretrained LDM (base.pretrained_workdir) or from scratch.
  c.grid.noise_multiplicity = (2,) if tiny else (8, 32)  # K (timestep, noise) draws per example (DPDM).
  c.grid.l2_clip_norm = (1.0,)  # Per-example clip norms C.
  c.grid.seeds = (0,) if tiny else (0, 1, 2)  # Run seeds: init (scratch), DP noise seed 2 s and sampling seed 2 s + 1.

  c.base = ml_collections.ConfigDict()
  c.base.ldm_dp = "ldm_dp:tiny" if tiny else "ldm_dp:default"  # Trainer config of the DP runs (preset or file[:variant]).
  c.base.ldm = "ldm:tiny" if tiny else "ldm:default"  # Trainer config of epsilon = inf runs (preset or file[:variant]).
  c.base.autoencoder_workdir = "runs/ae"  # Trained (frozen, public) autoencoder.
  c.base.pretrained_workdir = "runs/ldm"  # Public-pretrained LDM (used by pretrained=True runs).
  c.base.data_root = "runs/phantoms/private"  # Private training data of every run.
  c.base.scratch_stats_from = "runs/phantoms/public/attributes.csv"  # Public attribute CSV for scratch runs' attribute mean/std.
  c.base.overrides = ()  # Extra "key=value" overrides of every run's trainer config (e.g. "train.steps=200").
  c.base.nonprivate_overrides = ()  # Extra overrides of the epsilon = inf runs only, applied after base.overrides.

  c.eval = ml_collections.ConfigDict()
  c.eval.real = "runs/phantoms/heldout"  # Held-out REAL volumes: FID reference and memorization validation set.
  c.eval.n = 16 if tiny else 64  # Samples drawn per run.
  c.eval.features = "ssl3d"  # Feature extractor: ssl3d, medicalnet or slice2d.
  c.eval.feature_weights = "runs/ssl"  # Its weights (ssl3d: the SSL workdir); "" = the extractor's default.
  c.eval.steps = 20 if tiny else 50  # DDIM steps.
  c.eval.guidance = 1.0  # Classifier-free guidance scale.
  c.eval.batch_size = 8  # Volumes per sampler / extractor call.
  c.eval.seed = 0  # Sampling, bootstrap and KID subset seed (the same for every run: paired comparison).

  c.vmap_seeds = not tiny  # Seeds of a setting in ONE vmapped program (2-core CPU: 1.27x slower per step than separate: off).
  return c


def get_config(arg=None):
  return ablation_config(select_variant(arg, VARIANTS, default="default"))  # See ablation_config.
