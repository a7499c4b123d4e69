"""Study (issue 7): does public pretraining help DP finetuning? epsilon {1, 3, 10, inf} x {pretrained,
scratch} x 3 seeds, on the `jaxldm ablate` machinery (configs/ablation.py; same fields).

  jaxldm ablate --config configs/study_pretraining.py:tiny --workdir runs/study_pretraining \
      --config.base.autoencoder_workdir=runs/ae --config.base.pretrained_workdir=runs/ldm

epsilon = inf is the non-private LDM trainer (configs/ldm.py) on the same private data: the ceiling
each private curve is compared with. Seeds fix the DP noise seed (research runs, see ablation.py).
"""

import importlib.util
import pathlib


def _ablation_config(arg):
  path = pathlib.Path(__file__).with_name("ablation.py")
  spec = importlib.util.spec_from_file_location("_jaxldm_ablation_base", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def get_config(arg=None):
  c = _ablation_config(arg)  # The grid, base, eval and vmap_seeds fields of configs/ablation.py.
  c.grid.target_epsilon = (1.0, 3.0, 10.0, float("inf"))  # inf = non-private trainer on the private data.
  c.grid.pretrained = (True, False)  # Public-pretrained LDM vs from scratch: the question of the study.
  c.grid.noise_multiplicity = (c.grid.noise_multiplicity[0],)  # One K (the variant's first).
  c.grid.l2_clip_norm = (1.0,)  # One C.
  c.grid.seeds = (0, 1, 2)  # Three seeds: mean and min/max in the plot.
  return c
