"""The first stage at inference: building the 3D KL autoencoder, loading a trained one, and moving
volumes to and from its latent space.

Latents are posterior means times the run's scale factor (ldm.json), the space the latent UNet was
trained in; encode and decode run in fixed-size padded chunks, so each compiles once.
"""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxldm.config import ConfigError
from jaxldm.infer import checkpoints
from jaxldm.models import AutoencoderKL, conv, layers
from jaxldm.models.layers import as_triple

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def build_model(model_cfg: ml_collections.ConfigDict | dict) -> AutoencoderKL:
  m = dict(model_cfg)
  if m["dtype"] not in DTYPES:
    raise ConfigError(f"config key 'model.dtype': {m['dtype']!r} is not one of {', '.join(DTYPES)}")
  return AutoencoderKL(channels=tuple(m["channels"]), num_res_blocks=m["num_res_blocks"],
                       latent_channels=m["latent_channels"], kernel=as_triple(m["kernel"]),
                       stride=as_triple(m["stride"]), attention=m["attention"], dtype=DTYPES[m["dtype"]])


def load_autoencoder(workdir: str | pathlib.Path):
  """(model, EMA params, info) of a trained first stage."""
  workdir = pathlib.Path(workdir)
  info = checkpoints.stage_record(workdir, "autoencoder.json", "autoencoder", key="autoencoder_workdir")
  model = build_model(info["model"])
  target = layers.abstract_params(model, jnp.zeros((1, *info["data_shape"], 1)))
  params, _ = checkpoints.restore_params(workdir / "checkpoints", target)
  return model, params, info


# Jitted once per (model, scale, convolution route).
@conv.cached_per_route(maxsize=8)
def _jitted_encoder(model, scale: float):
  return jax.jit(lambda p, x: model.apply(p, x, method=AutoencoderKL.encode).mean * scale)


@conv.cached_per_route(maxsize=8)
def _jitted_decoder(model, scale: float):
  return jax.jit(lambda p, z: model.apply(p, z / scale, method=AutoencoderKL.decode))


def encode_latents(model, params, volumes: np.ndarray, scale: float, batch_size: int) -> np.ndarray:
  """Posterior means times the scale factor; one example at a time in effect (no batch coupling)."""
  encode = _jitted_encoder(model, float(scale))  # Traced once per model.
  out = []
  for valid, chunk in checkpoints.iterate_batches(volumes, batch_size):
    out.append(np.asarray(encode(params, jnp.asarray(chunk)[..., None]))[:valid])
  return np.concatenate(out)


def latent_decoder(model, scale: float):
  """Jitted (params, latents scaled as the UNet sees them) -> decoded volumes (B, D, H, W, 1)."""
  return _jitted_decoder(model, float(scale))


def decode_latents(model, params, latents: np.ndarray, scale: float, batch_size: int) -> np.ndarray:
  """Volumes (N, D, H, W) of scaled latents: the inverse direction of `encode_latents`."""
  decode = latent_decoder(model, scale)
  out = []
  for valid, chunk in checkpoints.iterate_batches(latents, batch_size):
    out.append(np.asarray(decode(params, jnp.asarray(chunk)))[:valid, ..., 0])
  return np.concatenate(out)
