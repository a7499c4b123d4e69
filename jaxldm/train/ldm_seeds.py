"""S private LDM runs that differ only in their seed, trained in ONE compiled program.

  ldm_seeds.train_seeds([config_s0, config_s1], [workdir_s0, workdir_s1])

Each run is prepared exactly as `ldm.train_and_evaluate` prepares it (`ldm.prepare`: its own workdir,
init, privacy ledger, secret seeds, Poisson batcher and checkpoints), then the S train states are
stacked on a leading axis and one `jax.vmap` of the trainer's private step advances all of them:
every seed gets its own Poisson batch (padded to the same static size, since q and N are equal), its
own noise key and its own ledger (the same q, sigma and steps, hence the same epsilon). With the same
dp.noise_seed per seed, the result equals S separate runs (tests/test_ablate.py) at the cost of one
compilation and S-wide kernels. Used by `jaxldm ablate` (configs/ablation.py: vmap_seeds).
"""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import ml_collections

from jaxldm.config import ConfigError, to_dict
from jaxldm.train import common, ldm

_SEED_KEYS = ("seed",)  # Top-level keys allowed to differ (plus dp.noise_seed).


def _without_seeds(config: ml_collections.ConfigDict) -> dict:
  d = to_dict(config)
  for key in _SEED_KEYS:
    d.pop(key, None)
  d["dp"].pop("noise_seed", None)
  return d


def _stack(trees):
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
  if len({p.start for p in preps}) > 1:  # Interrupted at different steps: resume one by one.
    for p in preps:
      p.ckpt.close()
    return [ldm.train_and_evaluate(c, w) for c, w in zip(configs, workdirs)]

  # --- steps --------------------------------------------------------------------------------
  p0, config = preps[0], configs[0]
  steps, start = config.train.steps, p0.start
  sigma, ebs = p0.dp_run.noise_multiplier, p0.dp_run.expected_batch_size
  assert all(p.dp_run.noise_multiplier == sigma for p in preps)  # Same q, steps, target: same calibration.
  allowed = min(p.dp_run.allowed_steps for p in preps)
  step_fn = ldm.jitted_step(config, True, len(p0.columns), p0.examples["latent"].shape[-1], vmapped=True)
  state = _stack([p.state for p in preps])
  logs = [common.MetricsLog(p.workdir, start) if p.primary else None for p in preps]
  averagers = [common.MetricAverager() for _ in preps]
  unstack = lambda tree, i: common.replicate(jax.tree_util.tree_map(lambda x: x[i], tree), preps[i].mesh)

  # --- loop ---------------------------------------------------------------------------------
  progress, task = common.progress_bar(steps, start, f"ldm (DP) x {len(preps)} seeds")
  stopped_for_budget = False
  epsilons = [None] * len(preps)
  with progress:
    for step in range(start, steps):
      if step >= allowed:
        stopped_for_budget = True
        break
      rows = max(p.dp_run.rows_needed(step) for p in preps)  # One shape for the stacked seeds.
      inputs = [p.dp_run.step_inputs(p.examples, step, p.mesh, rows) for p in preps]
      state, metrics = step_fn(state, *(_stack([inp[k] for inp in inputs]) for k in range(4)), sigma, ebs)
      done = step + 1
      for i, averager in enumerate(averagers):
        averager.add(jax.tree_util.tree_map(lambda m: m[i], metrics))
      log_now = done % config.train.log_every == 0 or done == steps
      sample_now = config.train.sample_every > 0 and (done % config.train.sample_every == 0 or done == steps)
      save_now = done % config.train.checkpoint_every == 0 or done == steps
      if log_now or sample_now or save_now:  # Ledgers first (see ldm.train_and_evaluate).
        epsilons = [p.dp_run.record_steps(done) for p in preps]
      if log_now:
        for i, (p, averager) in enumerate(zip(preps, averagers)):
          m = averager.pop()
          common.check_finite(done, m)
          m["epsilon"] = epsilons[i]
          if p.primary:
            logs[i].write(done, m)
      progress.update(task, completed=done)
      for i, p in enumerate(preps):
        if sample_now and p.primary:
          p.sample_fn(common.fetch(jax.tree_util.tree_map(lambda x: x[i], state.ema_params)),
                      p.workdir / "samples" / f"samples_{done:06d}.png", p.config.seed + done)
        if save_now:
          p.ckpt.save(done, unstack(state, i))
    final_step = int(state.step[0])
    records = []
    for i, p in enumerate(preps):
      epsilon = p.dp_run.record_steps(final_step)
      if p.ckpt.latest_step() != final_step:
        p.ckpt.save(final_step, unstack(state, i))
      p.ckpt.close()
      record = {"steps": final_step, "private": True, **p.dp_run.record(epsilon, stopped_for_budget),
                "vmapped_seeds": len(preps)}
      p.console.print(p.dp_run.summary(stopped_for_budget))
      if p.primary:
        common.write_json(p.workdir / "run.json", record)
      records.append(record)
  return records
