"""S private LDM runs that differ only in their seed, trained in ONE compiled program.

  ldm_seeds.train_seeds([config_s0, config_s1], [workdir_s0, workdir_s1])

Each run is prepared exactly as `ldm.train_and_evaluate` prepares it (`ldm.prepare`: its own workdir,
init, privacy ledger, secret seeds, Poisson batcher and checkpoints), then the S train states are
stacked on a leading axis and one `jax.vmap` of the trainer's private step advances all of them:
every seed gets its own Poisson batch (padded to the same static size, since q and N are equal), its
own noise key and its own ledger (the same q, sigma and steps, hence the same epsilon). With the same
dp.noise_seed per seed, the result equals S separate runs (tests/test_ablate.py) at the cost of one
compilation and S-wide kernels. The runs share one `jaxldm.train.loop`: each keeps its own metrics
log, samples, checkpoints and ledger, recorded before any of them is written. Used by `jaxldm
ablate` (configs/ablation.py: vmap_seeds).
"""

from __future__ import annotations

import functools
import pathlib

import jax
import jax.numpy as jnp
import ml_collections

from jaxldm.config import ConfigError, to_dict
from jaxldm.infer import checkpoints
from jaxldm.train import common, ldm, loop

_SEED_KEYS = ("seed",)  # Top-level keys allowed to differ (plus dp.noise_seed).


def _without_seeds(config: ml_collections.ConfigDict) -> dict:
  d = to_dict(config)
  for key in _SEED_KEYS:
    d.pop(key, None)
  d["dp"].pop("noise_seed", None)
  return d


@jax.jit
def _stack(trees):
  """The runs' trees stacked leaf by leaf; one compiled program (op by op, a stack per new leaf shape)."""
  return jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *trees)


def train_seeds(configs: list[ml_collections.ConfigDict], workdirs: list[str | pathlib.Path]) -> list[dict]:
  """Trains the runs together; returns each run's record (as `ldm.train_and_evaluate` would).

  Raises:
    ConfigError: the configs are not private, or differ in more than `seed` and `dp.noise_seed`.
  """
  if len(configs) != len(workdirs) or not configs:
    raise ValueError("one workdir per config, at least one")
  reference = _without_seeds(configs[0])
  for c in configs:
    if not c.dp.enabled:
      raise ConfigError("config key 'dp.enabled': vmapped seeds train private runs only")
    if _without_seeds(c) != reference:
      raise ConfigError("vmapped seeds: the configs must differ only in 'seed' and 'dp.noise_seed'")
  preps = [ldm.prepare(c, w) for c, w in zip(configs, workdirs)]
  if len({p.run.start for p in preps}) > 1:  # Interrupted at different steps: resume one by one.
    for p in preps:
      p.run.ckpt.close()
    return [ldm.train_and_evaluate(c, w) for c, w in zip(configs, workdirs)]

  # --- steps --------------------------------------------------------------------------------
  p0, config = preps[0], configs[0]
  mechanism = p0.run.dp_run.mechanism()
  assert all(p.run.dp_run.mechanism() == mechanism for p in preps)  # Same q, steps, target, C: same calibration.
  step_fn = ldm.jitted_step(config, True, len(p0.columns), p0.examples["latent"].shape[-1], vmapped=True)

  def step(state, s):
    rows = max(p.run.dp_run.rows_needed(s) for p in preps)  # One shape for the stacked seeds.
    inputs = [p.run.dp_run.step_inputs(p.examples, s, p.mesh, rows) for p in preps]
    return step_fn(state, *(_stack([inp[k] for inp in inputs]) for k in range(4)), *mechanism)

  # --- loop: run i's state and metrics are row i of the stacked ones -------------------------
  for i, p in enumerate(preps):
    p.run.metrics_of = functools.partial(_row, i)
    p.run.state_of = functools.partial(_run_state, i, p.mesh)
  loop.train([p.run for p in preps], _stack([p.state for p in preps]), step,
             description=f"ldm x {len(preps)} seeds")
  records = []
  for p in preps:
    record = {"steps": p.run.step, "private": True, **p.run.privacy(), "vmapped_seeds": len(preps)}
    if p.run.primary:
      checkpoints.write_json(p.run.workdir / "run.json", record)
    records.append(record)
  return records


@jax.jit
def _row(i, tree):
  """Run i's leaves of the stacked tree; i is traced: one program for every run."""
  return jax.tree_util.tree_map(lambda x: x[i], tree)


def _run_state(i: int, mesh, state):
  """Run i's state, replicated over its mesh as a run of its own holds it (what its checkpoint saves)."""
  return common.replicate(_row(i, state), mesh)
