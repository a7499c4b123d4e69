"""Trainer of the second stage: the attribute-conditioned latent diffusion UNet, plain or DP-SGD.

  jaxldm train --config configs/ldm.py:tiny --workdir runs/ldm --config.autoencoder_workdir=runs/ae
  jaxldm train --config configs/ldm_dp.py:tiny --workdir runs/ldm_dp \
      --config.autoencoder_workdir=runs/ae --config.pretrained_workdir=runs/ldm

Both modes share the per-example loss (`jaxldm.diffusion.diffusion_loss`). Non-private: shuffled
fixed-size batches, the mean of per-example losses. Private (`dp.enabled`): Poisson-sampled batches
padded to one static size, `jaxldm.privacy.noise.private_grad` (per-example clipping, noise once per
batch, division by the expected batch size), a privacy ledger in the workdir, and a stop before the
budget would be exceeded. The autoencoder is frozen (trained on public data).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxldm import fitting
from jaxldm.config import ConfigError, to_dict
from jaxldm.data.dataset import read_attributes
from jaxldm.data.defaults import build_dataset
from jaxldm.diffusion import diffusion_loss, make_schedule
from jaxldm.infer import checkpoints, generate
from jaxldm.infer.autoencoder import encode_latents, latent_decoder, load_autoencoder
from jaxldm.infer.ldm import build_unet, unet_apply
from jaxldm.infer.pictures import save_mid_slices
from jaxldm.models import conv, layers
from jaxldm.privacy import clipping
from jaxldm.train import common, dp, loop, partition


# ---------------------------------------------------------------------------------------------
# Building blocks (also used by `jaxldm sample`)
# ---------------------------------------------------------------------------------------------
def attribute_stats(config, attributes: np.ndarray, mask: np.ndarray, columns, dataset=None) -> tuple[list, list]:
  """Mean/std used to standardise attributes. In DP runs they must not come from the private data."""
  source = config.conditioning.stats_from
  if config.dp.enabled and source not in ("data", "pretrained") and dataset is not None:
    _check_public_csv(source, dataset)
  if source == "data":
    if config.dp.enabled:
      raise ConfigError("config key 'conditioning.stats_from': 'data' would compute attribute statistics "
                        "from the private data outside the DP mechanism; use 'pretrained' or a public CSV path")
    vals, msk = attributes, mask
  elif source == "pretrained":
    if not config.pretrained_workdir:
      raise ConfigError("config key 'conditioning.stats_from': 'pretrained' needs config.pretrained_workdir")
    info = json.loads((pathlib.Path(config.pretrained_workdir) / "ldm.json").read_text())
    if list(info["attributes"]) != list(columns):
      raise ConfigError(f"the pretrained model's attributes {info['attributes']} differ from data.attributes {list(columns)}")
    return info["attribute_mean"], info["attribute_std"]
  else:
    vals, msk = read_attributes(source, columns, strict_ids=False)
  mean, std = [], []
  for j in range(len(columns)):
    present = vals[msk[:, j] > 0, j]
    mean.append(float(present.mean()) if present.size else 0.0)
    std.append(float(present.std()) if present.size > 1 and present.std() > 0 else 1.0)
  return mean, std


def _check_public_csv(source: str, dataset) -> None:
  """Refuses a statistics CSV that is the private data's attribute table (or a copy of its rows)."""
  path = pathlib.Path(source)
  private_csv = dataset.root / "attributes.csv"
  same_file = path.is_file() and private_csv.is_file() and (
      path.resolve() == private_csv.resolve() or path.read_bytes() == private_csv.read_bytes())
  same_rows = False
  if not same_file and path.is_file() and len(dataset.columns):
    try:
      vals, msk = read_attributes(source, dataset.columns, subject_ids=dataset.subject_ids, strict_ids=False)
      same_rows = bool(msk.sum()) and np.array_equal(vals * msk, dataset.attributes * dataset.attribute_mask)
    except Exception:  # A CSV keyed differently is not the private table.
      same_rows = False
  if same_file or same_rows:
    raise ConfigError(f"config key 'conditioning.stats_from': {source} holds the private data's attribute rows; "
                      "statistics from it would leave the DP mechanism un-noised. Use 'pretrained' or a "
                      "CSV of public data")


# ---------------------------------------------------------------------------------------------
# Steps
# ---------------------------------------------------------------------------------------------
def make_steps(unet, tx, schedule, config, frozen_spec: str):
  d = config.diffusion
  loss_kw = dict(schedule=schedule, prediction=d.prediction, noise_multiplicity=d.noise_multiplicity,
                 cond_drop_prob=d.cond_drop_prob)
  apply_fn = unet_apply(unet)

  def per_example_loss(trainable, frozen, example, rng):
    return diffusion_loss(apply_fn, partition.merge(trainable, frozen), example, rng, **loss_kw)

  def finish(state, trainable, frozen, grads, opt_state, metrics):
    updates, opt_state = tx.update(grads, opt_state, trainable)
    trainable = jax.tree_util.tree_map(lambda p, u: p + u, trainable, updates)
    params = partition.merge(trainable, frozen)
    ema = fitting.ema_update(state.ema_params, params, config.optim.ema_decay)
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema), metrics

  def nonprivate_step(state, batch, rng):
    # RNG: example i of this step uses fold_in(rng, i); its K draws fold in further (see the loss).
    trainable, frozen = partition.split(state.params, frozen_spec)
    n = batch["latent"].shape[0]
    keys = jax.vmap(lambda i: jax.random.fold_in(rng, i))(jnp.arange(n))

    def mean_loss(tr):
      return jax.vmap(lambda ex, k: per_example_loss(tr, frozen, ex, k))(batch, keys).mean()

    # Non-private: each convolution runs on the whole batch (one batched kernel gradient).
    loss, grads = jax.value_and_grad(conv.merging_examples(mean_loss))(trainable)
    return finish(state, trainable, frozen, grads, state.opt_state,
                  {"loss": loss, "grad_norm": fitting.global_norm(grads)})

  def loss_of(state):  # What the private step differentiates, and the loss of ONE example.
    trainable, frozen = partition.split(state.params, frozen_spec)
    return trainable, lambda tr, ex, k: per_example_loss(tr, frozen, ex, k)

  def finish_private(state, grads, metrics):
    trainable, frozen = partition.split(state.params, frozen_spec)
    return finish(state, trainable, frozen, grads, state.opt_state, metrics)

  # RNG of the private step: rng = fold_in(noise base key, step); the privacy engine splits it into
  # per-example keys (fold_in example index) and the one noise key of this logical batch.
  return nonprivate_step, (loss_of, finish_private)


# ---------------------------------------------------------------------------------------------
# Jitted steps, shared by runs of the same shapes in one process (ablations)
# ---------------------------------------------------------------------------------------------
def step_key(config, private: bool, num_attributes: int, latent_channels: int, vmapped: bool) -> dict:
  """What the compiled step depends on (`common.cached_jit`). Seeds, paths, the budget and the DP
  mechanism's sigma, expected batch size and C are not in it: they are traced arguments, so runs at
  different epsilons or clip norms share one program."""
  return {"trainer": "ldm", "model": to_dict(config.model), "diffusion": to_dict(config.diffusion),
          "optim": fitting.optimizer_key(config.optim, config.train.steps), "trainable": config.train.trainable,
          "private": private, "dp": dp.program_key(config.dp, private),
          "num_attributes": num_attributes, "latent_channels": latent_channels, "vmapped": vmapped}


def jitted_step(config, private: bool, num_attributes: int, latent_channels: int, *, vmapped: bool = False):
  """The jitted train step, built once per `step_key` (a second run of the same shapes reuses it).

  Private: step(state, batch, mask, num_microbatches, rng, noise_multiplier, expected_batch_size,
  l2_clip_norm) (the last three: `dp.PrivateRun.mechanism()`); non-private: step(state, batch, rng).
  vmapped (private only): every argument but the last three has a leading seed axis
  (`jaxldm.train.ldm_seeds`).
  """
  def build():
    unet = build_unet(config.model, num_attributes, latent_channels)
    tx = fitting.make_optimizer(config.optim, config.train.steps, private=private)
    schedule = make_schedule(config.diffusion.schedule, config.diffusion.num_timesteps,
                             config.diffusion.beta_start, config.diffusion.beta_end)
    nonprivate_step, (loss_of, finish) = make_steps(unet, tx, schedule, config, config.train.trainable)
    if not private:
      return nonprivate_step
    return dp.private_step(loss_of, finish, config.dp, vmapped=vmapped)  # Compiled (dp.private_step).

  key = step_key(config, private, num_attributes, latent_channels, vmapped)
  if private:
    return common.cached(key, build)
  return common.cached_jit(key, build, donate_argnums=0)


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Prepared:
  """Everything before the loop of one run (also used by `jaxldm.train.ldm_seeds`)."""
  config: ml_collections.ConfigDict
  run: loop.Run             # Restored: its checkpointer, start step, DP run and sample hook.
  state: fitting.TrainState  # Replicated, restored from the latest checkpoint if any.
  examples: dict            # latent/attributes/attribute_mask arrays of the n training examples.
  columns: list
  mesh: Any
  data_fingerprint: str = ""  # Of the training data (docs/privacy.md, "Stages compose").


def unet_inputs(latent_shape, num_attributes: int) -> tuple:
  """One example's worth of the UNet's inputs (latent, timestep, attributes, attribute mask), for
  initialising or shaping its parameters."""
  return (jnp.zeros((1, *latent_shape)), jnp.zeros((1,), jnp.int32), jnp.zeros((1, num_attributes)),
          jnp.ones((1, num_attributes)))


def initial_state(config: ml_collections.ConfigDict, params, private: bool) -> fitting.TrainState:
  """Step 0 from `params` (drawn or pretrained): the optimizer's state for the `train.trainable` part
  and the EMA copy. The trainer and `jaxldm bench trainer` start from this same state."""
  trainable, _ = partition.split(params, config.train.trainable)
  tx = fitting.make_optimizer(config.optim, config.train.steps, private=private)
  return fitting.new_state(params, tx, trainable=trainable)


def prepare(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> Prepared:
  """Setup, data, model, privacy, state and checkpoint of one run (the sections before the loop)."""
  # --- autoencoder (frozen); a missing one is refused before anything is written -----------
  ae_model, ae_params, ae_info = load_autoencoder(config.autoencoder_workdir)
  workdir, console = common.prepare_workdir(workdir)
  private = bool(config.dp.enabled)
  scale = float(ae_info["scale_factor"])

  # --- data ---------------------------------------------------------------------------------
  dataset = build_dataset(config.data, progress=True)
  volumes, attributes, attr_mask = dataset.arrays()
  if list(volumes.shape[1:]) != list(ae_info["data_shape"]):
    raise ConfigError(f"config key 'data.shape': {tuple(volumes.shape[1:])} differs from the autoencoder's "
                      f"{tuple(ae_info['data_shape'])}")
  columns = list(dataset.columns)
  fingerprint = dataset.fingerprint()
  upstream = []
  if private:  # Inputs trained on this private data: DP ones compose, non-private ones are refused.
    upstream = dp.upstream_stages("autoencoder_workdir", config.autoencoder_workdir, ae_info, fingerprint)
    if config.pretrained_workdir:
      pre_info = json.loads((pathlib.Path(config.pretrained_workdir) / "ldm.json").read_text())
      upstream = dp.merge_stages(upstream, dp.upstream_stages("pretrained_workdir", config.pretrained_workdir,
                                                              pre_info, fingerprint))
  mean, std = attribute_stats(config, attributes, attr_mask, columns, dataset)
  attributes = ((attributes - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)) * attr_mask
  latents = encode_latents(ae_model, ae_params, volumes, scale, config.train.batch_size)
  n = len(latents)
  console.print(f"data: {n} volumes -> latents {tuple(latents.shape[1:])}, {len(columns)} attributes"
                + (" [bold](private)[/]" if private else ""))
  examples = {"latent": latents.astype(np.float32), "attributes": attributes.astype(np.float32),
              "attribute_mask": attr_mask.astype(np.float32)}

  # --- model --------------------------------------------------------------------------------
  unet = build_unet(config.model, len(columns), latents.shape[-1])
  init_key = jax.random.PRNGKey(config.seed)
  dummy = unet_inputs(latents.shape[1:], len(columns))
  if config.pretrained_workdir:  # Restored over the init's shapes: no init program to compile.
    params, _ = checkpoints.restore_params(pathlib.Path(config.pretrained_workdir) / "checkpoints",
                                           layers.abstract_params(unet, *dummy))
    console.print(f"initialised from the pretrained LDM in {config.pretrained_workdir}")
  else:
    params = layers.init_params(unet, init_key, *dummy)
  if private:
    clipping.check_no_batch_stats(params)  # Batch statistics would couple examples (invariant 1).
  trainable, frozen = partition.split(params, config.train.trainable)
  console.print(f"latent UNet: {common.count_params(params):,} parameters, "
                f"{common.count_params(trainable):,} trainable ({config.train.trainable})")
  schedule = make_schedule(config.diffusion.schedule, config.diffusion.num_timesteps,
                           config.diffusion.beta_start, config.diffusion.beta_end)

  info = {"attributes": columns, "attribute_mean": mean, "attribute_std": std,
          "autoencoder_workdir": str(pathlib.Path(config.autoencoder_workdir).absolute()),
          "scale_factor": scale, "latent_shape": list(latents.shape[1:]), "model": to_dict(config.model),
          "diffusion": to_dict(config.diffusion), "private": private, "data_fingerprint": fingerprint}

  # --- privacy ------------------------------------------------------------------------------
  steps = config.train.steps
  mesh = common.make_mesh(config.train.num_devices)
  dp_run = None
  if private:
    pinned = dp.pinned_settings(config.dp, fingerprint, **{
        "train.trainable": config.train.trainable,
        "diffusion.noise_multiplicity": int(config.diffusion.noise_multiplicity)})
    dp_run = dp.setup(config.dp, workdir, n, steps, console, mesh.devices.size, pinned=pinned, upstream=upstream)

  # --- state and checkpoint -----------------------------------------------------------------
  state = initial_state(config, params, private)
  decode = latent_decoder(ae_model, scale)
  d = config.diffusion
  sampler = generate.sampler(unet, (d.schedule, d.num_timesteps, d.beta_start, d.beta_end), d.prediction,
                             guidance_scale=float(config.sampling.guidance_scale), method="ddim",
                             num_steps=config.sampling.num_steps, shared_noise=False)

  def sample_hook(state, done):  # From the EMA parameters only: nothing private is decoded.
    _sample_grid(sampler, decode, checkpoints.fetch(state.ema_params), ae_params, latents.shape[1:], len(columns),
                 workdir / "samples" / f"samples_{done:06d}.png", config.seed + done, step=done,
                 guidance=config.sampling.guidance_scale)

  run = loop.Run(workdir, config, console, dp_run=dp_run, sample=sample_hook)
  state = loop.restore(run, state, mesh, records={"ldm.json": info})
  return Prepared(config=config, run=run, state=state, examples=examples, columns=columns, mesh=mesh,
                  data_fingerprint=fingerprint)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> dict:
  p = prepare(config, workdir)
  run = p.run

  # --- step ---------------------------------------------------------------------------------
  step_fn = jitted_step(config, run.dp_run is not None, len(p.columns), p.examples["latent"].shape[-1])
  if run.dp_run is not None:
    step = loop.poisson_step(step_fn, p.examples, run.dp_run, p.mesh)
  else:
    step = loop.shuffled_step(step_fn, p.examples, seed=config.seed, batch_size=config.train.batch_size,
                              mesh=p.mesh)

  # --- loop ---------------------------------------------------------------------------------
  loop.train(run, p.state, step, description="ldm")
  record = {"steps": run.step, "private": run.dp_run is not None, "data_fingerprint": p.data_fingerprint,
            **run.privacy()}
  if run.primary:
    checkpoints.write_json(run.workdir / "run.json", record)
  return record


def _sample_grid(sampler, decode, params, ae_params, latent_shape, num_attributes, path, seed, *, step,
                 guidance):
  """Three samples at the attributes' mean (standardised 0) and one unconditional: nothing private.

  The mean is the standardisation's (the pretrained model's or a public CSV's in a DP run), never
  computed from private data here; tiles and title say what each was conditioned on.
  """
  n = 4
  attrs = mask = None
  titles = ["unconditional"] * n
  if num_attributes:
    attrs = jnp.zeros((n, num_attributes))
    mask = jnp.ones((n, num_attributes)).at[-1].set(0.0)  # Last tile: every attribute missing.
    titles = ["attributes at mean"] * (n - 1) + ["unconditional"]
  z = sampler(params, (n,) + tuple(latent_shape), jax.random.PRNGKey(seed), attributes=attrs, attribute_mask=mask)
  vols = np.asarray(decode(ae_params, z))[..., 0]
  save_mid_slices(np.clip(vols, -1, 1), path, columns=4, titles=titles,
                  suptitle=f"step {step}: EMA model, guidance {guidance:g}, mid slice")
