"""Trainer of the self-supervised 3D encoder: NT-Xent contrastive learning (Dar et al. 2023).

  jaxldm data phantoms --out runs/phantoms/public --n 64 --domain public --size tiny
  jaxldm train --config configs/ssl.py:tiny --workdir runs/ssl

Positives are a volume and an augmented copy of it (small in-plane affine, flips, intensity
jitter and gamma, noise); every other volume of the batch is a negative. The encoder's embedding
(before the projection head) is the frozen feature of `jaxldm.eval.features.get_extractor("ssl3d")`
and the embedding of the memorization detector.

Writes into the workdir: config.json, checkpoints/ (orbax, resumable), metrics.jsonl and
encoder.json (model config, data shape and intensity range, and a version string that hashes the
parameters, so every feature statistic can name exactly which encoder made it).
"""

from __future__ import annotations

import functools
import math
import pathlib
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxldm import fitting
from jaxldm.config import ConfigError, to_dict
from jaxldm.data.defaults import build_dataset
from jaxldm.eval.memorization import nearest_neighbours
from jaxldm.infer import checkpoints
from jaxldm.infer.ssl import ENCODER_FILE, build_model, embed_volumes, params_version
from jaxldm.models import layers
from jaxldm.models.ssl_encoder import SSLEncoder
from jaxldm.train import common, loop

# ---------------------------------------------------------------------------------------------
# Augmentations: pure JAX on ONE (D, H, W) volume, vmapped over the batch inside the jitted step.
# ---------------------------------------------------------------------------------------------
class Augment(NamedTuple):
  """Ranges of the random transforms (each drawn uniformly in [-range, range] unless noted)."""
  rotation_deg: float = 10.0   # In-plane rotation (about the slice axis D).
  scale: float = 0.1           # In-plane zoom: factor in [1 - scale, 1 + scale].
  shift: float = 0.05          # In-plane shift as a fraction of H and W.
  flip_axes: tuple[int, ...] = (1, 2)  # Axes of (D, H, W) each flipped with probability 1/2.
  gamma: float = 0.2           # Gamma exp(U(-gamma, gamma)) on the min-max normalised volume.
  contrast: float = 0.1        # Contrast factor in [1 - contrast, 1 + contrast] about the mean.
  brightness: float = 0.1      # Added offset, in units of the volume's intensity range / 2.
  noise_std: float = 0.03      # Gaussian noise std drawn in [0, noise_std], same units.

  @classmethod
  def from_config(cls, c: ml_collections.ConfigDict | dict) -> Augment:
    c = dict(c)
    flip_axes = tuple(int(a) for a in c.pop("flip_axes"))
    if any(a not in (0, 1, 2) for a in flip_axes):
      raise ConfigError(f"config key 'augment.flip_axes': {flip_axes} must be axes of (D, H, W): 0, 1 or 2")
    for name in ("rotation_deg", "scale", "shift", "gamma", "contrast", "brightness", "noise_std"):
      if float(c[name]) < 0:
        raise ConfigError(f"config key 'augment.{name}': must be >= 0, got {c[name]}")
    if float(c["scale"]) >= 1:
      raise ConfigError(f"config key 'augment.scale': must be < 1 (a zoom factor 1 +- scale), got {c['scale']}")
    return cls(flip_axes=flip_axes, **{k: float(v) for k, v in c.items() if k in cls._fields})


def augment(volume: jax.Array, key: jax.Array, aug: Augment) -> jax.Array:
  """A random augmented copy of one (D, H, W) volume; the same in-plane transform on every slice.

  In-plane only, because thick-slice MRI has no meaningful through-plane rotation at 10 mm
  spacing; geometry uses linear interpolation with edge replication (no artificial borders that
  would make "was augmented" trivially detectable).
  """
  k_rot, k_scale, k_shift, k_flip, k_gamma, k_con, k_bri, k_std, k_noise = jax.random.split(key, 9)
  d, h, w = volume.shape
  volume = volume.astype(jnp.float32)

  # 1. In-plane affine: output voxel p samples the input at c + R(-theta) (p - c - t) / s.
  theta = jax.random.uniform(k_rot, (), minval=-aug.rotation_deg, maxval=aug.rotation_deg) * (math.pi / 180)
  zoom = 1.0 + jax.random.uniform(k_scale, (), minval=-aug.scale, maxval=aug.scale)
  shift = jax.random.uniform(k_shift, (2,), minval=-aug.shift, maxval=aug.shift) * jnp.array([h, w])
  cy, cx = (h - 1) / 2.0, (w - 1) / 2.0
  yy, xx = jnp.meshgrid(jnp.arange(h, dtype=jnp.float32), jnp.arange(w, dtype=jnp.float32), indexing="ij")
  dy, dx = yy - cy - shift[0], xx - cx - shift[1]
  cos, sin = jnp.cos(theta), jnp.sin(theta)
  src_y = (cos * dy + sin * dx) / zoom + cy
  src_x = (-sin * dy + cos * dx) / zoom + cx
  coords = [jnp.broadcast_to(jnp.arange(d, dtype=jnp.float32)[:, None, None], (d, h, w)),
            jnp.broadcast_to(src_y, (d, h, w)), jnp.broadcast_to(src_x, (d, h, w))]
  volume = jax.scipy.ndimage.map_coordinates(volume, coords, order=1, mode="nearest")

  # 2. Flips.
  flip_keys = jax.random.split(k_flip, max(1, len(aug.flip_axes)))
  for axis, k in zip(aug.flip_axes, flip_keys):
    volume = jnp.where(jax.random.bernoulli(k), jnp.flip(volume, axis), volume)

  # 3. Intensity: gamma on the min-max normalised volume, then contrast about the mean, brightness.
  lo, hi = volume.min(), volume.max()
  half_range = jnp.maximum((hi - lo) / 2.0, 1e-6)
  u = jnp.clip((volume - lo) / (2.0 * half_range), 0.0, 1.0)
  gamma = jnp.exp(jax.random.uniform(k_gamma, (), minval=-aug.gamma, maxval=aug.gamma))
  volume = lo + (u ** gamma) * (2.0 * half_range)
  mean = volume.mean()
  contrast = 1.0 + jax.random.uniform(k_con, (), minval=-aug.contrast, maxval=aug.contrast)
  brightness = jax.random.uniform(k_bri, (), minval=-aug.brightness, maxval=aug.brightness) * half_range
  volume = mean + (volume - mean) * contrast + brightness

  # 4. Noise with a random std.
  std = jax.random.uniform(k_std, (), minval=0.0, maxval=aug.noise_std) * half_range
  return volume + std * jax.random.normal(k_noise, volume.shape)


def two_views(volumes: jax.Array, rng: jax.Array, aug: Augment, both: bool) -> tuple[jax.Array, jax.Array]:
  """(view_a, view_b) of a (B, D, H, W) batch. Example i's view v uses fold_in(fold_in(rng, i), v).

  both=False is Dar et al.'s pairing (the volume itself and one augmented copy); both=True is
  SimCLR's (two augmented copies).
  """
  keys = jax.vmap(lambda i: jax.random.fold_in(rng, i))(jnp.arange(volumes.shape[0]))
  aug_view = lambda v: jax.vmap(lambda x, k: augment(x, jax.random.fold_in(k, v), aug))(volumes, keys)
  view_b = aug_view(1)
  view_a = aug_view(0) if both else volumes.astype(jnp.float32)
  return view_a, view_b


# ---------------------------------------------------------------------------------------------
# Loss
# ---------------------------------------------------------------------------------------------
def nt_xent(z_a: jax.Array, z_b: jax.Array, temperature: float) -> tuple[jax.Array, jax.Array]:
  """NT-Xent (Chen et al. 2020) over 2B projections; returns (loss, top-1 accuracy of the positive).

  Row i of z_a and row i of z_b are a positive pair; each of the 2B embeddings is classified
  against the other 2B - 1 (its positive and 2B - 2 negatives) by cosine similarity / temperature.
  """
  n = z_a.shape[0]
  z = jnp.concatenate([z_a, z_b]).astype(jnp.float32)
  z = z / jnp.maximum(jnp.linalg.norm(z, axis=-1, keepdims=True), 1e-8)
  logits = z @ z.T / temperature
  logits = jnp.where(jnp.eye(2 * n, dtype=bool), -jnp.inf, logits)
  targets = (jnp.arange(2 * n) + n) % (2 * n)
  positive = jnp.take_along_axis(logits, targets[:, None], axis=1)[:, 0]
  loss = (jax.nn.logsumexp(logits, axis=1) - positive).mean()
  accuracy = (jnp.argmax(logits, axis=1) == targets).mean()
  return loss, accuracy


# ---------------------------------------------------------------------------------------------
# Train step
# ---------------------------------------------------------------------------------------------
def make_train_step(model: SSLEncoder, tx, config: ml_collections.ConfigDict):
  aug = Augment.from_config(config.augment)
  temperature, both = float(config.loss.temperature), bool(config.augment.both_views)

  def train_step(state: fitting.TrainState, volumes, rng):
    # RNG: view v of example i of this step uses fold_in(fold_in(rng, i), v).
    view_a, view_b = two_views(volumes, rng, aug, both)

    def loss_fn(params):
      x = jnp.concatenate([view_a, view_b])[..., None]
      _, proj = model.apply(params, x)
      return nt_xent(proj[:volumes.shape[0]], proj[volumes.shape[0]:], temperature)

    (loss, accuracy), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = jax.tree_util.tree_map(lambda p, u: p + u, state.params, updates)
    ema = fitting.ema_update(state.ema_params, params, config.optim.ema_decay)
    metrics = {"loss": loss, "accuracy": accuracy, "grad_norm": fitting.global_norm(grads)}
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema), metrics

  return train_step


def jitted_step(config: ml_collections.ConfigDict):
  """The jitted train step, built once per process for the settings it closes over
  (`common.cached_jit`): runs that differ only in seeds, data or length (constant schedule) share it."""
  key = {"trainer": "ssl", "model": config.model.to_dict(), "augment": config.augment.to_dict(),
         "loss": config.loss.to_dict(), "optim": fitting.optimizer_key(config.optim, config.train.steps)}
  return common.cached_jit(key, lambda: make_train_step(build_model(config.model), fitting.make_optimizer(
      config.optim, config.train.steps), config), donate_argnums=0)


@functools.lru_cache(maxsize=8)
def _jitted_copies(aug: Augment):
  """volumes, key -> one augmented copy of each (volume i keyed by fold_in(key, i)), one program per
  augmentation settings (and volume shape): a run's evaluation does not trace it again."""
  def copies(volumes, key):
    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(volumes.shape[0]))
    return jax.vmap(lambda v, k: augment(v, k, aug))(volumes, keys)
  return jax.jit(copies)


def retrieval_accuracy(model, params, volumes: np.ndarray, config, *, seed: int, max_volumes: int = 256) -> float:
  """Fraction of augmented copies whose nearest original (Pearson r of embeddings) is their source.

  A direct check of what the detector relies on: a copy is closer to its source than to anything
  else. Measured on (up to `max_volumes` of) the training volumes with a fixed augmentation seed.
  """

  volumes = np.asarray(volumes[:max_volumes])
  if len(volumes) < 2:
    return float("nan")
  copies = np.asarray(_jitted_copies(Augment.from_config(config.augment))(jnp.asarray(volumes),
                                                                        jax.random.PRNGKey(seed)))
  bs = config.train.batch_size
  idx, _ = nearest_neighbours(embed_volumes(model, params, copies, bs), embed_volumes(model, params, volumes, bs))
  return float(np.mean(idx == np.arange(len(volumes))))


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------
def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> dict:
  workdir, console = common.prepare_workdir(workdir)

  # --- data ---------------------------------------------------------------------------------
  dataset = build_dataset(config.data, progress=True)
  volumes, _, _ = dataset.arrays()
  n = len(volumes)
  if n < 2:
    raise ConfigError(f"config key 'data.root': {config.data.root} has {n} volume(s); contrastive "
                      "training needs at least 2 (every other volume of a batch is a negative)")
  if config.train.batch_size < 2:
    raise ConfigError("config key 'train.batch_size': must be >= 2 (the other volumes are the negatives)")
  console.print(f"data: {n} volumes {tuple(volumes.shape[1:])} from {config.data.root}")

  # --- model --------------------------------------------------------------------------------
  model = build_model(config.model)
  Augment.from_config(config.augment)  # Validate before any compile.
  init_key = jax.random.PRNGKey(config.seed)
  params = layers.init_params(model, init_key, jnp.zeros((1,) + volumes.shape[1:] + (1,), jnp.float32))
  tx = fitting.make_optimizer(config.optim, config.train.steps)
  state = fitting.new_state(params, tx)
  console.print(f"ssl encoder: {common.count_params(params):,} parameters")

  # --- step ---------------------------------------------------------------------------------
  mesh = common.make_mesh(config.train.num_devices)
  train_step = jitted_step(config)
  step = loop.shuffled_step(train_step, volumes, seed=config.seed, batch_size=config.train.batch_size, mesh=mesh)

  # --- loop ---------------------------------------------------------------------------------
  run = loop.Run(workdir, config, console)
  state = loop.restore(run, state, mesh)
  state = loop.train(run, state, step, description="ssl encoder")

  # --- freeze: version and a retrieval check ------------------------------------------------
  params = jax.device_get(state.ema_params)
  version = params_version(params)
  retrieval = retrieval_accuracy(model, params, volumes, config, seed=config.seed + 1)
  info = {"version": f"ssl3d-{version}", "params": "ema_params", "steps": run.step,
          "model": to_dict(config.model), "data_shape": list(volumes.shape[1:]),
          "intensity_range": list(config.data.intensity_range), "embedding_dim": int(config.model.channels[-1]),
          "augment": to_dict(config.augment), "retrieval_top1": retrieval}
  if run.primary:
    checkpoints.write_json(workdir / ENCODER_FILE, info)
  console.print(f"encoder ssl3d-{version}: augmented-copy retrieval top-1 {retrieval:.3f} on "
                f"{min(n, 256)} training volumes; wrote {workdir / ENCODER_FILE}")
  return info
