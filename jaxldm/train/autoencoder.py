"""Trainer of the first stage: the 3D KL autoencoder (optionally with a PatchGAN critic), plain or DP-SGD.

  jaxldm train --config configs/autoencoder.py:tiny --workdir runs/ae
  jaxldm train --config configs/autoencoder_dp.py:tiny --workdir runs/ae_dp   # on private data

Writes into the workdir: config.json, checkpoints/ (orbax, resumable), metrics.jsonl,
samples/ (PNG of reconstructions) and autoencoder.json (model config + latent scale factor, which the
LDM stage reads).

Private (`dp.enabled`): the same per-example `generator_loss` goes through the shared DP engine
(`jaxldm.train.dp`: Poisson batches, per-example clipping, noise once per batch, privacy ledger,
budget stop). Whatever would read the private data outside that mechanism is refused up front
(`check_private`): the adversarial critic, reconstruction PNGs, and the 1/std latent scale.
"""

from __future__ import annotations

import functools
import pathlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxldm import fitting
from jaxldm.config import ConfigError, to_dict
from jaxldm.data.defaults import build_dataset
from jaxldm.infer import checkpoints
from jaxldm.infer.autoencoder import build_model, encode_latents
from jaxldm.infer.pictures import save_mid_slices
from jaxldm.models import AutoencoderKL, PatchDiscriminator3D, conv, kl_divergence, layers
from jaxldm.models.layers import as_triple
from jaxldm.privacy import clipping
from jaxldm.train import common, dp, loop

def check_divisible(shape, model: AutoencoderKL) -> None:
  for axis, (size, f) in enumerate(zip(shape, model.downsampling)):
    if size % f:
      raise ConfigError(f"config key 'data.shape': axis {axis} has {size} voxels, not divisible by the "
                       f"autoencoder's down-sampling {f} (model.stride ** (len(model.channels) - 1))")


# ---------------------------------------------------------------------------------------------
# Per-example losses (ONE example, no batch axis): reused unchanged by DP training.
# ---------------------------------------------------------------------------------------------
def generator_loss(model, disc, params, disc_params, example, rng, *, kl_weight, adv_weight, adv_loss):
  """1. L1 reconstruction, 2. KL to N(0, I) per input voxel, 3. adversarial term (if weighted)."""
  x = example["volume"][None, ..., None]
  recon, posterior = model.apply(params, x, rng)
  l1 = jnp.abs(recon - x).mean()
  kl = kl_divergence(posterior)[0] / x.size
  loss = l1 + kl_weight * kl
  adv = jnp.zeros(())
  if disc is not None:
    logits = disc.apply(disc_params, recon)
    adv = -logits.mean() if adv_loss == "hinge" else jax.nn.softplus(-logits).mean()
    loss = loss + adv_weight * adv
  return loss, {"l1": l1, "kl": kl, "adv": adv, "recon": recon[0, ..., 0]}


def discriminator_loss(disc, disc_params, real, fake, adv_loss):
  real_logits = disc.apply(disc_params, real[None, ..., None])
  fake_logits = disc.apply(disc_params, fake[None, ..., None])
  if adv_loss == "hinge":
    return jax.nn.relu(1.0 - real_logits).mean() + jax.nn.relu(1.0 + fake_logits).mean()
  return jax.nn.softplus(-real_logits).mean() + jax.nn.softplus(fake_logits).mean()


# ---------------------------------------------------------------------------------------------
# Train step
# ---------------------------------------------------------------------------------------------
def make_train_step(model, disc, tx, disc_tx, config):
  loss_cfg = config.loss
  adv_on = disc is not None

  def train_step(state: fitting.TrainState, volumes, rng):
    # RNG: example i of this step uses fold_in(rng, i) (posterior sampling).
    keys = jax.vmap(lambda i: jax.random.fold_in(rng, i))(jnp.arange(volumes.shape[0]))
    active = state.step >= loss_cfg.adversarial_start
    adv_weight = jnp.where(active, loss_cfg.adversarial_weight, 0.0) if adv_on else 0.0
    disc_params = state.extra["disc_params"] if adv_on else None

    def batch_loss(params):
      per_example = functools.partial(generator_loss, model, disc if adv_on else None, params, disc_params,
                                      kl_weight=loss_cfg.kl_weight, adv_weight=adv_weight,
                                      adv_loss=loss_cfg.adversarial_loss)
      losses, aux = jax.vmap(lambda v, k: per_example({"volume": v}, k))(volumes, keys)
      return losses.mean(), aux

    # Non-private: each convolution runs on the whole batch (one batched kernel gradient).
    (loss, aux), grads = jax.value_and_grad(conv.merging_examples(batch_loss), has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = jax.tree_util.tree_map(lambda p, u: p + u, state.params, updates)
    ema = fitting.ema_update(state.ema_params, params, config.optim.ema_decay)
    metrics = {"loss": loss, "grad_norm": fitting.global_norm(grads), "l1": aux["l1"].mean(),
               "kl": aux["kl"].mean(), "adv": aux["adv"].mean()}
    extra = state.extra
    if adv_on:
      fake = jax.lax.stop_gradient(aux["recon"])
      d_loss_fn = lambda dp: jax.vmap(lambda r, f: discriminator_loss(disc, dp, r, f, loss_cfg.adversarial_loss))(volumes, fake).mean()
      d_loss, d_grads = jax.value_and_grad(conv.merging_examples(d_loss_fn))(extra["disc_params"])
      d_updates, d_opt = disc_tx.update(d_grads, extra["disc_opt_state"], extra["disc_params"])
      new_dp = jax.tree_util.tree_map(lambda p, u: p + u, extra["disc_params"], d_updates)
      # Before adversarial_start the critic stays as initialised.
      keep = lambda new, old: jax.tree_util.tree_map(lambda a, b: jnp.where(active, a, b), new, old)
      extra = {"disc_params": keep(new_dp, extra["disc_params"]), "disc_opt_state": keep(d_opt, extra["disc_opt_state"])}
      metrics["disc_loss"] = d_loss
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema, extra=extra)
    return new_state, metrics

  return train_step


def make_private_step(model, tx, config):
  """DP-SGD step: Poisson batch, per-example clipping of `generator_loss`, noise, Adam.

  No critic: it would be trained on the private volumes outside the mechanism (`check_private`).
  """
  loss_cfg = config.loss

  def loss_fn(params, example, rng):
    loss, aux = generator_loss(model, None, params, None, example, rng, kl_weight=loss_cfg.kl_weight,
                               adv_weight=0.0, adv_loss=loss_cfg.adversarial_loss)
    return loss, {"l1": aux["l1"], "kl": aux["kl"]}  # Scalars only: no per-example reconstruction.

  def loss_of(state: fitting.TrainState):
    # RNG: the privacy engine gives example i fold_in(fold_in(rng, EXAMPLE_STREAM), i) (posterior
    # sampling); the noise key of the logical batch is separate. sigma, the expected batch size and C
    # are traced (`dp.PrivateRun.mechanism`).
    return state.params, loss_fn

  def finish(state: fitting.TrainState, grads, metrics):
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = jax.tree_util.tree_map(lambda p, u: p + u, state.params, updates)
    ema = fitting.ema_update(state.ema_params, params, config.optim.ema_decay)
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema), metrics

  return dp.private_step(loss_of, finish, config.dp, has_aux=True)  # Compiled (dp.private_step).


def jitted_step(config: ml_collections.ConfigDict, private: bool):
  """The jitted train step, built once per process for the settings it closes over
  (`common.cached_jit`): runs that differ only in seeds, data, length (constant schedule) or the DP
  mechanism's sigma, expected batch size and C share it.

  Private: step(state, batch, mask, num_microbatches, rng, noise_multiplier, expected_batch_size,
  l2_clip_norm); non-private: step(state, volumes, rng).
  """
  key = {"trainer": "autoencoder", "private": private, "model": config.model.to_dict(),
         "loss": config.loss.to_dict(), "optim": fitting.optimizer_key(config.optim, config.train.steps),
         "disc": config.disc.to_dict() if config.loss.adversarial_weight > 0 else None,
         "dp": dp.program_key(config.dp, private) if private else None}

  def build():
    model = build_model(config.model)
    tx = fitting.make_optimizer(config.optim, config.train.steps, private=private)
    if private:
      return make_private_step(model, tx, config)
    disc = disc_tx = None
    if config.loss.adversarial_weight > 0:
      disc = make_critic(config)
      disc_tx = fitting.make_optimizer(config.optim, config.train.steps)
    return jax.jit(make_train_step(model, disc, tx, disc_tx, config), donate_argnums=0)

  return common.cached(key, build)


def initial_state(config: ml_collections.ConfigDict, model, volume_shape, private: bool) -> fitting.TrainState:
  """Step 0 of a run: the model's parameters drawn from `config.seed`, the optimizer's state, the EMA
  copy and, with an adversarial term, the critic's parameters (key folded with 1) and optimizer state.
  The trainer and `jaxldm bench trainer` start from this same state."""
  init_key = jax.random.PRNGKey(config.seed)
  dummy = jnp.zeros((1, *volume_shape, 1), jnp.float32)
  params = layers.init_params(model, init_key, dummy)
  if private:
    clipping.check_no_batch_stats(params)  # Batch statistics would couple examples (invariant 1).
  extra = None
  if config.loss.adversarial_weight > 0:
    disc_params = layers.init_params(make_critic(config), jax.random.fold_in(init_key, 1), dummy)
    disc_tx = fitting.make_optimizer(config.optim, config.train.steps)
    extra = {"disc_params": disc_params, "disc_opt_state": fitting.init_optimizer(disc_tx, disc_params)}
  tx = fitting.make_optimizer(config.optim, config.train.steps, private=private)
  return fitting.new_state(params, tx, extra=extra)


def make_critic(config: ml_collections.ConfigDict) -> PatchDiscriminator3D:
  return PatchDiscriminator3D(channels=tuple(config.disc.channels), kernel=as_triple(config.disc.kernel),
                              stride=as_triple(config.disc.stride))


def check_private(config: ml_collections.ConfigDict) -> None:
  """Refuses settings that would let private data out of the DP mechanism (before any step)."""
  if config.loss.adversarial_weight > 0:
    raise ConfigError("config key 'loss.adversarial_weight': the PatchGAN critic would be trained on the "
                      "private volumes without clipping or noise; set it to 0 for DP training")
  if config.train.sample_every > 0:
    raise ConfigError("config key 'train.sample_every': reconstruction PNGs would show private volumes; "
                      "set it to 0 for DP training")
  if not config.scale_factor > 0:
    raise ConfigError("config key 'scale_factor': estimating 1/std of the latents would read the private "
                      "data outside the mechanism; give a value > 0 (e.g. from a public-data autoencoder)")


def estimate_scale_factor(model, params, volumes: np.ndarray, batch_size: int) -> tuple[float, list[int]]:
  """1 / std of the posterior means over the data (Rombach et al.), so latents have unit variance."""
  # The posterior means through the inference encoder (jitted once per model), summed batch by batch.
  means = encode_latents(model, params, volumes, 1.0, batch_size)
  total, total_sq, count, latent_shape = 0.0, 0.0, 0, list(means.shape[1:])
  for start in range(0, len(means), batch_size):
    z = np.asarray(means[start:start + batch_size], dtype=np.float64)
    total += z.sum()
    total_sq += np.square(z).sum()
    count += z.size
  mean = total / count
  std = float(np.sqrt(max(total_sq / count - mean ** 2, 1e-12)))
  return 1.0 / std, latent_shape


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------
def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> dict:
  workdir, console = common.prepare_workdir(workdir)
  private = "dp" in config and bool(config.dp.enabled)
  if private:
    check_private(config)

  # --- data ---------------------------------------------------------------------------------
  dataset = build_dataset(config.data, progress=True)
  volumes, _, _ = dataset.arrays()
  fingerprint = dataset.fingerprint()
  n = len(volumes)
  console.print(f"data: {n} volumes {tuple(volumes.shape[1:])} from {config.data.root}"
                + (" [bold](private)[/]" if private else ""))

  # --- model --------------------------------------------------------------------------------
  model = build_model(config.model)
  check_divisible(volumes.shape[1:], model)
  state = initial_state(config, model, volumes.shape[1:], private)
  console.print(f"autoencoder: {common.count_params(state.params):,} parameters")

  # --- privacy ------------------------------------------------------------------------------
  steps, bs = config.train.steps, config.train.batch_size
  mesh = common.make_mesh(config.train.num_devices)
  dp_run = None
  if private:
    dp_run = dp.setup(config.dp, workdir, n, steps, console, mesh.devices.size,
                      pinned=dp.pinned_settings(config.dp, fingerprint))

  # --- step ---------------------------------------------------------------------------------
  step_fn = jitted_step(config, private)
  if private:
    step = loop.poisson_step(step_fn, {"volume": volumes}, dp_run, mesh)
  else:
    step = loop.shuffled_step(step_fn, volumes, seed=config.seed, batch_size=bs, mesh=mesh)
  reconstruct = jax.jit(lambda p, x: model.apply(p, x)[0])

  def sample(state, done):  # Never under DP (check_private): these are training volumes.
    x = jnp.asarray(volumes[:4])[..., None]
    recon = np.asarray(reconstruct(checkpoints.fetch(state.ema_params), x))[..., 0]
    save_mid_slices(np.concatenate([volumes[:4], recon]), workdir / "samples" / f"recon_{done:06d}.png",
                           titles=["real"] * 4 + ["recon"] * 4, columns=4)

  # --- loop ---------------------------------------------------------------------------------
  run = loop.Run(workdir, config, console, dp_run=dp_run, sample=None if private else sample)
  state = loop.restore(run, state, mesh)
  state = loop.train(run, state, step, description="autoencoder")

  # --- latent scale -------------------------------------------------------------------------
  ema_params = checkpoints.fetch(state.ema_params)
  latent_shape = list(jax.eval_shape(lambda p, x: model.apply(p, x, method=AutoencoderKL.encode).mean,
                                     ema_params, jnp.zeros((1, *volumes.shape[1:], 1))).shape[1:])
  if config.get("scale_factor", 0.0) > 0:
    scale = float(config.scale_factor)
  else:
    scale, latent_shape = estimate_scale_factor(model, ema_params, volumes, bs)
  info = {"scale_factor": scale, "latent_shape": latent_shape, "data_shape": list(volumes.shape[1:]),
          "model": to_dict(config.model), "steps": run.step, "private": private,
          "data_fingerprint": fingerprint}
  if private:
    info["privacy"] = run.privacy()
  if run.primary:
    checkpoints.write_json(workdir / "autoencoder.json", info)
  console.print(f"latent {tuple(latent_shape)}, scale factor {scale:.4f}; wrote {workdir / 'autoencoder.json'}")
  return info
