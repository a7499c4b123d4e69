"""The self-supervised 3D encoder at inference: building it, naming its weights, embedding volumes.

`params_version` hashes the weights, so every feature statistic (`jaxldm.eval.features`, ssl3d) can
name exactly which encoder computed it; encoder.json in a finished run records that version.
"""

from __future__ import annotations

import hashlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxldm.config import ConfigError
from jaxldm.infer import checkpoints
from jaxldm.models import conv
from jaxldm.models.layers import as_triple
from jaxldm.models.ssl_encoder import SSLEncoder

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
ENCODER_FILE = "encoder.json"


def build_model(model_cfg: ml_collections.ConfigDict | dict) -> SSLEncoder:
  m = dict(model_cfg)
  if m["dtype"] not in DTYPES:
    raise ConfigError(f"config key 'model.dtype': {m['dtype']!r} is not one of {', '.join(DTYPES)}")
  return SSLEncoder(channels=tuple(m["channels"]), num_res_blocks=m["num_res_blocks"],
                    kernel=as_triple(m["kernel"]), stride=as_triple(m["stride"]),
                    projection_dim=m["projection_dim"], dtype=DTYPES[m["dtype"]])


def params_version(params) -> str:
  """A short content hash of a parameter tree: equal iff the weights (and their names) are equal."""
  digest = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    leaf = np.asarray(leaf)
    digest.update(jax.tree_util.keystr(path).encode())
    digest.update(f"{leaf.dtype}{leaf.shape}".encode())
    digest.update(np.ascontiguousarray(leaf).tobytes())
  return digest.hexdigest()[:16]


# Jitted once per (model, convolution route): every evaluation and training record that embeds volumes
# with the same encoder reuses the trace.
@conv.cached_per_route(maxsize=8)
def _jitted_embed(model: SSLEncoder):
  return jax.jit(lambda p, x: model.apply(p, x[..., None], method=SSLEncoder.embed))


def embed_volumes(model: SSLEncoder, params, volumes: np.ndarray, batch_size: int) -> np.ndarray:
  """(N, D, H, W) -> (N, F) embeddings, in fixed-size (padded) batches: one compilation."""
  embed = _jitted_embed(model)
  out = [np.asarray(embed(params, jnp.asarray(chunk, jnp.float32)))[:valid]
         for valid, chunk in checkpoints.iterate_batches(np.asarray(volumes), batch_size)]
  return np.concatenate(out)
