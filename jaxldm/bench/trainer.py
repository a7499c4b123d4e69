"""`jaxldm bench trainer`: a DP trainer's OWN jitted steps, private and not, on synthetic data.

  jaxldm bench trainer --config ldm_dp:tiny --steps 30 --json trainer.json
  jaxldm bench trainer --config autoencoder_dp:tiny --json trainer.json

The LDM trainer (`trainer` "ldm": random latents and attributes, no autoencoder read) or the
autoencoder trainer (`trainer` "autoencoder": random volumes). What is timed is one iteration of the
trainer's loop (`jaxldm.train.ldm` / `jaxldm.train.autoencoder`'s `train_and_evaluate`), minus logging:

  private      state, metrics = step_fn(state, *dp_run.step_inputs(examples, step, mesh))
               (the Poisson batch of the step, padded to the batcher's static size, its mask and
               microbatch count, sharded over the mesh; then `ldm.jitted_step(config, True, ...)`:
               per-example gradients, clipping, noise, optimizer, EMA);
  nonprivate   the non-private step (`ldm.jitted_step(config, False, ...)`) on a uniformly drawn
               batch of the DP run's expected batch size, with K = 1 noise draw per example (what a
               non-private run does; `nonprivate_same_k` is the same with the DP config's K). The
               autoencoder has no K (K = 1): its non-private step is `autoencoder.jitted_step(config,
               False)` at the expected batch size, the critic off as under DP.

The timed steps are interleaved (step s of every variant back to back, the order rotating), so the
machine's drift from minute to minute falls on each alike: the ratios compare like with like.

`dp.setup` runs as in training (sigma given by --sigma so nothing is calibrated; ledger and secrets
go to a temporary directory that is removed). Latents, attributes, masks and volumes are random; no
model or data files are read. Reported: the MEAN step times (a Poisson step's cost varies with
its sampled size: the chunks of microbatch x devices rows it runs, so the run's time is steps x the
mean; the median of such a mixture says nothing about it), the medians next to them, and

  dp_over_k_nonprivate = mean private step / (K x mean non-private step at K = 1)

(K = diffusion.noise_multiplicity: the DP step does K forward/backward passes per example, the
non-private step one), and private / nonprivate_same_k (the DP cost at equal work). `rows_computed`
lists the rows each timed private step ran (its sampled size padded up to a multiple of microbatch x
devices): padding is part of the private step's price. The Poisson batches come from a fixed noise
seed, so two records (e.g. two microbatch sizes) time the same sampled sizes.
"""

from __future__ import annotations

import dataclasses
import datetime
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from jaxldm import fitting, hostmem
from jaxldm.config import ConfigError, load_config
from jaxldm.models import layers


def _examples(n: int, latent_shape, num_attributes: int, seed: int = 0) -> dict:
  rng = np.random.default_rng(seed)
  return {"latent": rng.standard_normal((n, *latent_shape)).astype(np.float32),
          "attributes": rng.standard_normal((n, num_attributes)).astype(np.float32),
          "attribute_mask": (rng.random((n, num_attributes)) > 0.2).astype(np.float32)}


def _latent_shape(spec: str, config) -> tuple[int, ...]:
  from jaxldm.bench.grads import _autoencoder_config_for
  from jaxldm.infer import autoencoder

  ae_config = _autoencoder_config_for(spec)
  ae = autoencoder.build_model(ae_config.model)
  shape = tuple(s // f for s, f in zip(config.data.shape, ae.downsampling))
  return shape + (ae_config.model.latent_channels,)


def _state(config, private: bool, latent_shape, num_attributes: int, mesh):
  from jaxldm.infer.ldm import build_unet
  from jaxldm.train import common, ldm

  unet = build_unet(config.model, num_attributes, latent_shape[-1])
  params = layers.init_params(unet, jax.random.PRNGKey(config.seed), *ldm.unet_inputs(latent_shape, num_attributes))
  return common.replicate(ldm.initial_state(config, params, private), mesh), common.count_params(params)


@dataclasses.dataclass
class _Trainer:
  """What the timing loop needs from one trainer."""
  examples: Any  # The Poisson batcher's examples (a pytree, examples on the leading axis).
  nonprivate_examples: Any  # What the non-private step's batches are drawn from.
  k: int  # Forward/backward passes per example in the private step (the LDM's noise multiplicity).
  state: Callable[[Any, bool], tuple[Any, int]]  # (config, private) -> (replicated state, parameter count)
  step: Callable[[Any, bool], Callable]  # (config, private) -> the trainer's jitted step
  info: dict  # Shapes for the record.


def _ldm_trainer(spec: str, config, n: int, mesh) -> _Trainer:
  from jaxldm.train import ldm

  latent_shape = _latent_shape(spec, config)
  num_attributes = len(config.data.attributes)
  data = _examples(n, latent_shape, num_attributes, config.seed)
  return _Trainer(
      examples=data, nonprivate_examples=data, k=int(config.diffusion.noise_multiplicity),
      state=lambda cfg, private: _state(cfg, private, latent_shape, num_attributes, mesh),
      step=lambda cfg, private: ldm.jitted_step(cfg, private, num_attributes, latent_shape[-1]),
      info={"latent_shape": list(latent_shape), "num_attributes": num_attributes})


def _autoencoder_trainer(config, n: int, mesh) -> _Trainer:
  from jaxldm.infer.autoencoder import build_model
  from jaxldm.train import autoencoder, common

  autoencoder.check_private(config)  # As the trainer: no critic, no reconstruction PNGs under DP.
  model = build_model(config.model)
  shape = tuple(config.data.shape)
  autoencoder.check_divisible(shape, model)
  volumes = np.random.default_rng(config.seed).standard_normal((n, *shape)).astype(np.float32)

  def state(cfg, private):
    initial = autoencoder.initial_state(cfg, model, shape, private)
    return common.replicate(initial, mesh), common.count_params(initial.params)

  return _Trainer(examples={"volume": volumes}, nonprivate_examples=volumes, k=1, state=state,
                  step=autoencoder.jitted_step, info={"volume_shape": list(shape)})


def _block(tree):
  jax.tree_util.tree_map(lambda x: x.block_until_ready(), tree)


def run(spec: str, overrides: Sequence[str] = (), *, steps: int = 30, warmup: int = 2,
        examples: int = 0, sigma: float = 1.0, same_k: bool = True, progress=None) -> dict:
  """Times the trainer's private and non-private steps; returns one record (see the module docstring)."""
  from rich.console import Console

  from jaxldm.train import common, dp

  config = load_config(spec, overrides)
  kind = config.get("trainer")
  if kind not in ("ldm", "autoencoder"):
    raise ConfigError(f"--config {spec}: bench trainer times the LDM or the autoencoder trainer (config key "
                      f"'trainer' 'ldm' or 'autoencoder'), got {kind!r}")
  if not config.dp.enabled:
    raise ConfigError(f"--config {spec}: dp.enabled is False; use a DP config such as ldm_dp:tiny or autoencoder_dp:tiny")
  if steps < 1:
    raise ConfigError(f"--steps {steps}: at least 1")
  expected = float(config.dp.expected_batch_size)
  n = examples or max(64, int(8 * expected))
  mesh = common.make_mesh(config.train.num_devices)
  num_devices = mesh.devices.size
  target = _ldm_trainer(spec, config, n, mesh) if kind == "ldm" else _autoencoder_trainer(config, n, mesh)
  k = target.k
  quiet = Console(quiet=True)

  # --- private: dp.setup as in training, in a throw-away workdir --------------------------------
  with config.unlocked():
    config.dp.noise_multiplier = sigma  # Given: no calibration (sigma is a traced argument anyway).
    config.dp.noise_seed = 0
  with tempfile.TemporaryDirectory(prefix="jaxldm_bench_trainer_") as tmp:
    dp_run = dp.setup(config.dp, tmp, n, config.train.steps, quiet, num_devices)
    if hasattr(dp_run, "resume_at"):  # A fresh run: step 0 (what the trainer calls after restoring).
      dp_run.resume_at(0)
  step_fn = target.step(config, True)
  state, n_params = target.state(config, True)
  sizes, rows = {}, {}

  def private_step(state, step):
    inputs = dp_run.step_inputs(target.examples, step, mesh)
    mask = np.asarray(jax.device_get(inputs[1]))
    sizes[step], rows[step] = int(mask.sum()), int(mask.size)
    return step_fn(state, *inputs, *dp_run.mechanism())

  runs = {"private": _start(private_step, state, warmup, progress, "private")}

  # --- non-private: the trainer's own step at the expected batch size ---------------------------
  batch_size = max(num_devices, int(round(expected / num_devices)) * num_devices)
  variants = [("nonprivate", 1)] + ([("nonprivate_same_k", k)] if same_k and k != 1 else [])
  for name, kk in variants:
    np_config = load_config(spec, overrides)
    with np_config.unlocked():
      np_config.dp.enabled = False
      if kind == "ldm":
        np_config.diffusion.noise_multiplicity = kk
      np_config.train.batch_size = batch_size
    np_fn = target.step(np_config, False)
    np_state, _ = target.state(np_config, False)

    def nonprivate_step(state, step, np_fn=np_fn, np_config=np_config):
      idx = fitting.batch_indices(np_config.seed, step, n, batch_size)
      batch = common.shard_batch(jax.tree_util.tree_map(lambda a: a[idx], target.nonprivate_examples), mesh)
      return np_fn(state, batch, fitting.step_key(np_config.seed, step))

    runs[name] = _start(nonprivate_step, np_state, warmup, progress, name)

  timings = _time_interleaved(runs, steps, warmup, progress)

  mean = {name: statistics.fmean(t["times_s"]) for name, t in timings.items()}
  med = {name: statistics.median(t["times_s"]) for name, t in timings.items()}
  timed = timings["private"]["steps"]
  record = {
      "kind": "jaxldm_bench_trainer", "trainer": kind, "config": spec, "overrides": list(overrides),
      "params": n_params, **target.info, "noise_multiplicity": k,
      "examples": n, "expected_batch_size": expected, "padded_batch": dp_run.batcher.max_size,
      "microbatch_size": int(config.dp.microbatch_size), "microbatch_loop": dp.microbatch_loop(config.dp),
      "sampled_batch_sizes": [sizes[s] for s in timed], "rows_computed": [rows[s] for s in timed],
      "nonprivate_batch": batch_size, "noise_multiplier": sigma, "steps": steps, "warmup": warmup,
      "num_devices": num_devices, "dtype": config.model.dtype, "statistic": "mean",
      "private_step_s": mean["private"], "nonprivate_step_s": mean["nonprivate"],
      "nonprivate_same_k_step_s": mean.get("nonprivate_same_k"),
      "median_step_s": med,
      "dp_over_k_nonprivate": mean["private"] / (k * mean["nonprivate"]),
      "dp_over_nonprivate_same_k": mean["private"] / mean["nonprivate_same_k"] if "nonprivate_same_k" in mean else (
          mean["private"] / mean["nonprivate"] if k == 1 else None),
      "first_call_s": {name: t["first_call_s"] for name, t in timings.items()},
      "times_s": {name: t["times_s"] for name, t in timings.items()},
      "backend": jax.default_backend(), "device_kind": jax.devices()[0].device_kind,
      "host_memory": hostmem.status(), "date": datetime.date.today().isoformat(), "jax": jax.__version__}
  return record


def _start(step, state, warmup: int, progress, name: str) -> dict:
  """The first call (compile included) and `warmup` untimed steps; the run's state threads on (the
  jitted steps donate it, as in training)."""
  t0 = time.perf_counter()
  state, metrics = step(state, 0)
  _block(metrics)
  first = time.perf_counter() - t0
  if progress:
    progress(f"{name}: first call {first:.1f} s")
  for s in range(1, 1 + warmup):
    state, metrics = step(state, s)
  _block((state, metrics))
  return {"step": step, "state": state, "first_call_s": first}


def _time_interleaved(runs: dict, steps: int, warmup: int, progress) -> dict:
  """`steps` timed steps of every run, interleaved: step s of each run back to back, the order rotating
  from step to step, so a slow stretch of the machine (this host's speed drifts by +-10% between
  minutes) falls on every run alike and the ratios of means compare like with like."""
  names = list(runs)
  times = {name: [] for name in names}
  timed = list(range(1 + warmup, 1 + warmup + steps))
  for i, s in enumerate(timed):
    for name in names[i % len(names):] + names[:i % len(names)]:
      run = runs[name]
      t0 = time.perf_counter()
      run["state"], metrics = run["step"](run["state"], s)
      _block(metrics)
      _block(run["state"].step)
      times[name].append(time.perf_counter() - t0)
  if progress:
    for name in names:
      progress(f"{name}: {statistics.fmean(times[name]) * 1e3:.1f} ms/step (mean)")
  return {name: {"first_call_s": runs[name]["first_call_s"], "times_s": times[name], "steps": timed}
          for name in names}


def table(record: dict):
  from rich.table import Table

  k = record["noise_multiplicity"]
  t = Table(title=f"trainer steps, {record['config']} on {record['device_kind']} ({record['num_devices']} devices)",
            caption=f"expected batch {record['expected_batch_size']:g} (padded {record['padded_batch']}, "
                    f"microbatch {record['microbatch_size']}), K = {k}, {record['params']:,} parameters")
  for col in ("step", "mean ms", "median ms", "first call s"):
    t.add_column(col, justify="left" if col == "step" else "right")
  for name, key in (("private (DP, batcher included)", "private"), ("nonprivate, K = 1", "nonprivate"),
                    (f"nonprivate, K = {k}", "nonprivate_same_k")):
    if key in record["times_s"]:
      times = record["times_s"][key]
      t.add_row(name, f"{statistics.fmean(times) * 1e3:,.1f}", f"{statistics.median(times) * 1e3:,.1f}",
                f"{record['first_call_s'][key]:.1f}")
  t.add_row(f"DP / ({k} x nonprivate), means", f"{record['dp_over_k_nonprivate']:.3f}", "", "")
  if record.get("dp_over_nonprivate_same_k") is not None and k != 1:
    t.add_row(f"DP / nonprivate at K = {k}, means", f"{record['dp_over_nonprivate_same_k']:.3f}", "", "")
  if record.get("rows_computed"):
    t.caption += (f"; private rows computed per step {statistics.fmean(record['rows_computed']):.1f} for "
                  f"{statistics.fmean(record['sampled_batch_sizes']):.1f} sampled")
  return t
