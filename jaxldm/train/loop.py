"""The training loop of every trainer: resume, steps, logs, samples, checkpoints and the DP ledger.

A trainer builds its data, model, initial state and step; this module runs them, so what every run
promises is written once:

  run = loop.Run(workdir, config, console, dp_run=dp_run, sample=sample)
  state = loop.restore(run, state, mesh, records={"ldm.json": info})   # resume checks, then records
  state = loop.train(run, state, loop.shuffled_step(step_fn, examples, seed=..., batch_size=..., mesh=mesh),
                     description="ldm")
  run.step, run.epsilon, run.stopped_for_budget, run.privacy()           # for the trainer's own record

Resume: the state is replicated over the mesh, then the latest checkpoint is restored INTO that
sharding, and the loop continues from its step. With the reproducibility contract of `common` (the
batch and every key of step s are pure functions of the seed and s; `shuffled_step`), a resumed run
ends exactly where an uninterrupted one would.

Who writes: process 0 alone writes config.json, the trainer's records and parameters.txt (only once
every resume check has passed, so a refused resume leaves the run's records as they were) and
metrics.jsonl; orbax checkpoints are written by every process together.

Cadence (the `train` config group): a metrics.jsonl line every `log_every` steps (means over the
steps since the previous line), a sample every `sample_every` steps (0 or no sample hook: never), a
checkpoint every `checkpoint_every` steps, and all of them at the last step. A non-finite loss or
gradient norm stops the run at its log line, before that step's checkpoint: the last good one stays.

DP (docs/privacy.md, "Exact accounting"): the loop stops BEFORE the first step the budget does not
allow, and the privacy ledger records the steps taken BEFORE anything computed from them leaves the
loop (a metrics line, a sample, a checkpoint), and once more at the end: after a crash it may
over-count, never under-count.
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Callable, Sequence
from typing import Any

import jax
import ml_collections

from jaxldm import fitting
from jaxldm.config import save_config
from jaxldm.infer import checkpoints
from jaxldm.train import common, distributed


@dataclasses.dataclass
class Run:
  """One run's side of the loop: its workdir, config, checkpoints, metrics log and DP ledger.

  Several runs may share one loop (`jaxldm.train.ldm_seeds` stacks S seeds in one state); then
  `state_of` and `metrics_of` pick this run's part of the loop's state and step metrics.
  """
  workdir: pathlib.Path
  config: ml_collections.ConfigDict         # The run's config (config.json); config.train sets the cadence.
  console: Any
  dp_run: Any = None                        # dp.PrivateRun of a private run, None otherwise.
  sample: Callable[[Any, int], None] | None = None  # sample(state, step): a picture (process 0 only).
  state_of: Callable[[Any], Any] | None = None      # This run's state (None: the loop's state itself).
  metrics_of: Callable[[Any], Any] | None = None    # This run's step metrics (None: all of them).
  # Set by `restore` and `train`:
  primary: bool = True                      # Process 0: writes the run's files.
  ckpt: common.Checkpointer | None = None
  log: common.MetricsLog | None = None
  start: int = 0                            # The step the run resumed from.
  step: int = 0                             # The step it ended at.
  epsilon: float | None = None              # Private runs: epsilon after the last step.
  stopped_for_budget: bool = False          # Private runs: the budget stopped the loop.

  def privacy(self) -> dict:
    """What the run record says about privacy (`dp.PrivateRun.record`); {} for a non-private run."""
    return {} if self.dp_run is None else self.dp_run.record(self.epsilon, self.stopped_for_budget)


def restore(run: Run, state, mesh: jax.sharding.Mesh, *, records: dict[str, dict] | None = None):
  """`state` replicated over `mesh` and restored from the run's latest checkpoint, if any.

  Then the resume checks (a private run: the checkpoint may not be ahead of the ledger), and only
  once they have passed, process 0 writes config.json, `records` ({file name: JSON record}),
  parameters.txt (of the parameters of `state` as given) and trims metrics.jsonl to the resumed step.

  Raises:
    ConfigError: a checkpoint that does not match the state, or one ahead of the privacy ledger.
  """
  run.primary = distributed.is_primary()
  params = state.params
  state = common.replicate(state, mesh)  # Before restoring: orbax restores into this sharding.
  run.ckpt = common.Checkpointer(run.workdir / "checkpoints", max_to_keep=run.config.train.keep_checkpoints)
  try:
    state = run.ckpt.restore_latest(state)
    run.start = run.step = int(state.step)
    if run.start:
      run.console.print(f"resuming from step {run.start}")
    if run.dp_run is not None:
      run.dp_run.resume_at(run.start)
  except BaseException:
    run.ckpt.close()
    raise
  if run.primary:  # Every resume check has passed: now the run's records may change.
    save_config(run.config, run.workdir / "config.json")
    for name, record in (records or {}).items():
      checkpoints.write_json(run.workdir / name, record)
    (run.workdir / "parameters.txt").write_text(common.parameter_overview(params))
    run.log = common.MetricsLog(run.workdir, run.start)
  return state


def shuffled_step(step_fn, examples, *, seed: int, batch_size: int, mesh: jax.sharding.Mesh):
  """`step(state, s)` for the loop from a non-private `step_fn(state, batch, key)`.

  The batch of step s (`fitting.batch_indices`: epoch-wise shuffles of `examples`, a pytree of
  arrays with the examples on the leading axis) and its key (`fitting.step_key`) are pure functions
  of (seed, s): the reproducibility contract that makes a resume exact.
  """
  n = len(jax.tree_util.tree_leaves(examples)[0])

  def step(state, s: int):
    idx = fitting.batch_indices(seed, s, n, batch_size)
    batch = common.shard_batch(jax.tree_util.tree_map(lambda a: a[idx], examples), mesh)
    return step_fn(state, batch, fitting.step_key(seed, s))

  return step


def poisson_step(step_fn, examples, dp_run, mesh: jax.sharding.Mesh):
  """`step(state, s)` for the loop from a private
  `step_fn(state, batch, mask, num_microbatches, rng, noise_multiplier, expected_batch_size, l2_clip_norm)`.

  The Poisson batch and noise key of step s come from the run's secret seeds and attempt
  (`dp.PrivateRun.step_inputs`); sigma, the expected batch size and C are the run's
  (`dp.PrivateRun.mechanism`), passed as traced arguments.
  """
  return lambda state, s: step_fn(state, *dp_run.step_inputs(examples, s, mesh), *dp_run.mechanism())


def train(runs: Run | Sequence[Run], state, step: Callable[[Any, int], tuple[Any, dict]], *, description: str):
  """Runs `step(state, s)` from the runs' start step to config.train.steps; returns the final state.

  Every run must have been through `restore` (same start step, same cadence). Each run's results
  are left on it: `step` (the last step taken), and for a private run `epsilon` and
  `stopped_for_budget`. Checkpointers are closed on the way out.

  Raises:
    TrainingError: a non-finite loss or gradient norm at a log line (named by its step).
  """
  runs = [runs] if isinstance(runs, Run) else list(runs)
  cfg = runs[0].config.train
  steps, start = cfg.steps, runs[0].start
  if any(r.start != start or r.config.train.steps != steps for r in runs):
    raise ValueError("runs sharing one loop must resume from the same step and train to the same step")
  private = [r for r in runs if r.dp_run is not None]
  allowed = min((r.dp_run.allowed_steps for r in private), default=steps)
  sample_every = cfg.get("sample_every", 0) if any(r.sample for r in runs) else 0
  averagers = [common.MetricAverager() for _ in runs]
  progress, task = fitting.progress_bar(steps, start, description + (" (DP)" if private else ""))
  rate_meter = common.RateMeter(start)
  done, stopped_for_budget = start, False
  try:
    with progress:
      for s in range(start, steps):
        if s >= allowed:  # Before the step: the budget never pays for a step it does not allow.
          stopped_for_budget = True
          break
        state, metrics = step(state, s)
        done = s + 1
        for r, averager in zip(runs, averagers):
          averager.add(_pick(r.metrics_of, metrics))
        log_now = done % cfg.log_every == 0 or done == steps
        sample_now = sample_every > 0 and (done % sample_every == 0 or done == steps)
        save_now = done % cfg.checkpoint_every == 0 or done == steps
        if log_now or sample_now or save_now:
          # The ledger first, then whatever leaves the loop (metrics, samples, checkpoints): after a
          # crash it may over-count, never under-count. A resume from an older checkpoint re-takes
          # steps with fresh batches and noise (a new attempt), and they are counted again.
          for r in private:
            r.epsilon = r.dp_run.record_steps(done)
        if log_now:
          info = []
          for r, averager in zip(runs, averagers):
            logged = averager.pop()  # Means over the steps since the last log line.
            fitting.check_finite(done, logged)
            if r.dp_run is not None:
              logged["epsilon"] = r.epsilon
            if r.primary:
              r.log.write(done, logged)
            info.append(common.progress_info(logged))
          progress.update(task, completed=done, rate=rate_meter(done), info=info[0] if len(runs) == 1 else "")
        else:
          progress.update(task, completed=done)
        if sample_now:  # Trainers sample nothing private (the autoencoder refuses it under DP).
          for r in runs:
            if r.sample is not None and r.primary:
              r.sample(_pick(r.state_of, state), done)
        if save_now:
          for r in runs:
            r.ckpt.save(done, _pick(r.state_of, state))
      for r in runs:
        r.step, r.stopped_for_budget = done, stopped_for_budget
        if r.dp_run is not None:
          r.epsilon = r.dp_run.record_steps(done)
        if r.ckpt.latest_step() != done:
          r.ckpt.save(done, _pick(r.state_of, state))
  finally:
    for r in runs:
      r.ckpt.close()
  for r in private:
    r.console.print(r.dp_run.summary(stopped_for_budget))
  return state


def _pick(select, tree):
  return tree if select is None else select(tree)
